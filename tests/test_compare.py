"""The compare stage: its cost notes, KL of a model with itself, and the stage end to
end on tiny checkpoints with a tiny reward model (tests/fakes.py builds them). The
paired statistics are tested in tests/test_evaluation.py, the blind A/B test in
tests/test_compare_argilla.py.
"""

import json
import shutil

import numpy as np
import pytest

from align import comparison, judge, reports, runs
from tests.conftest import assert_ok, run_stage
from tests.fakes import compare_args, make_compare_run, make_policy_stage, make_reward_stage


# ----------------------------------------------------------------------------- cost notes


def test_cost_notes_flag_length_hacking_and_style_drift():
    assert comparison.cost_notes(0.1, {"concise": -0.05}, 0.2, 0.1) == []
    notes = comparison.cost_notes(0.5, {"concise": -0.3, "no_sign_off": 0.2}, 0.2, 0.1)
    assert notes == ["responses +50% longer: check for length hacking", "style drift: concise -30%"]


def test_a_mean_that_fell_only_through_fewer_cut_answers_is_not_called_brevity():
    brevity = comparison.cost_notes(-0.35, {}, 0.2, 0.1, finished_length_change=-0.30)
    assert brevity == ["responses -35% shorter: check the gain is not brevity alone"]
    fewer_cut = comparison.cost_notes(-0.35, {}, 0.2, 0.1, finished_length_change=-0.06)
    assert fewer_cut == ["responses -35% shorter from fewer answers cut at the cap (finished answers -6%)"]


def _rows(model: str, finished: list[int], cut: int, cap: int = 256) -> list[dict]:
    tokens = finished + [cap] * cut
    return [{"prompt_id": f"p{i}", "model": model, "reward": 0.0, "tokens": t, "words": t,
             "finish_reason": "length" if i >= len(finished) else "stop", "style": {"concise": True},
             "style_score": 1.0} for i, t in enumerate(tokens)]


def test_finished_answer_length_is_reported_beside_the_mean():
    """SFT: 6 answers of 80 tokens and 4 cut at 256; aligned: 9 of 76 and 1 cut. The mean falls 38%,
    the finished answers 5%, and the verdict line shows both with the cut shares."""
    rows = {"sft": _rows("sft", [80] * 6, 4), "dpo": _rows("dpo", [76] * 9, 1)}
    options = {**comparison.STATISTICS, "seed": 0, "bootstrap_resamples": 200}
    summaries = {m: comparison.summarize_model(r, 200, 0, 0.95) for m, r in rows.items()}
    assert summaries["sft"]["finished_tokens_mean"] == 80 and summaries["dpo"]["finished_tokens_mean"] == 76
    result = comparison.compare_pair("dpo", "sft", rows, summaries, None, options)
    assert result["length_change"] == pytest.approx((9 * 76 + 256) / (6 * 80 + 4 * 256) - 1)
    assert result["finished_length_change"] == pytest.approx(-0.05)
    assert "length -38% (finished answers -5%; cut at the cap: sft 40%, dpo 10%) -> " in result["verdict_line"]
    assert result["verdict_line"].count(" -> ") == 1
    assert any("fewer answers cut at the cap" in note for note in result["notes"])


def test_a_shorter_policy_that_wins_by_length_alone_is_named_in_the_verdict():
    """Rewards that only favour short answers (-0.5 per unit of log length) and a policy that only
    got shorter: the plain difference is clearly above 0, the length-adjusted one is 0, and the
    verdict line says the length change may explain it; so does the report's table."""
    import math

    def rows(model: str, scale: float) -> list[dict]:
        return [{"prompt_id": f"p{p}", "model": model, "reward": -0.5 * math.log1p(int(t * scale)), "tokens": int(t * scale),
                 "words": 1, "finish_reason": "stop", "style": {"concise": True}, "style_score": 1.0, "sample": i,
                 "prompt": [{"role": "user", "content": f"q{p}"}], "text": f"answer {i}"}
                for p in range(20) for i, t in enumerate((40 + p, 70 + 2 * p))]

    by_model = {"sft": rows("sft", 1.0), "dpo": rows("dpo", 0.3)}
    options = {**comparison.STATISTICS, "seed": 0, "bootstrap_resamples": 300}
    summaries = {m: comparison.summarize_model(r, 300, 0, 0.95) for m, r in by_model.items()}
    result = comparison.compare_pair("dpo", "sft", by_model, summaries, None, options)
    assert result["reward_difference"]["low"] > 0.4 and result["verdict"] == "better"
    adjusted = result["length_adjusted_difference"]
    assert adjusted["slope"] == pytest.approx(-0.5, abs=0.02) and abs(adjusted["difference"]) < 0.02
    assert "length-adjusted reward" in result["verdict_line"] and "may explain the difference" in result["verdict_line"]
    section = "\n".join(reports._comparison_section({"models": summaries, "options": {"example_rows": 2}}, result, by_model["sft"] + by_model["dpo"]))
    assert "| length-adjusted reward difference | -0.0" in section or "| length-adjusted reward difference | +0.0" in section


# ----------------------------------------------------------------------------- KL of a model with itself


def test_kl_of_a_model_with_itself_is_zero_and_positive_for_another(runs_root, tiny_model_dir):
    """Samples of model A scored by A (loaded twice) and by a perturbed copy B, through align.logprobs."""
    from align import logprobs
    from align.generation import SamplingSettings, create_generator, render_prompts
    from align.models import load_causal_lm, load_tokenizer

    conversations = [[{"role": "user", "content": f"How do I store {food}?"}] for food in ("rice", "eggs", "bread")]
    with create_generator(str(tiny_model_dir), "hf", "fp32", quiet=True) as generator:
        samples = generator.generate(conversations, SamplingSettings(n=2, temperature=1.0, max_new_tokens=10, seed=0))
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    prompts = [ids for ids in render_prompts(tokenizer, conversations) for _ in range(2)]
    completions = [sample.token_ids for group in samples for sample in group]

    def scored(model):
        return logprobs.completion_logprobs(model, prompts, completions, tokenizer.pad_token_id, batch_size=4)

    policy, same = scored(load_causal_lm(str(tiny_model_dir))), scored(load_causal_lm(str(tiny_model_dir)))
    for estimator in ("k1", "k3"):
        assert max(abs(v) for v in logprobs.kl_per_sequence(policy, same, estimator)) < 1e-6
    other_dir = make_policy_stage("kl-other", "dpo", tiny_model_dir, noise=0.05, seed=2) / "model"
    other = scored(load_causal_lm(str(other_dir)))
    assert np.mean(logprobs.kl_per_sequence(policy, other, "k3")) > 1e-4


# ----------------------------------------------------------------------------- the stage end to end


@pytest.fixture(scope="module")
def compare_run(runs_root, tiny_model_dir, tiny_data):
    run = "cmp"
    result = make_compare_run(run, tiny_model_dir, tiny_data["prompts"])
    assert_ok(result)
    return {"run": run, "folder": runs_root / run / "compare", "result": result}


def test_compare_writes_report_plots_json_and_verdict(compare_run):
    folder, result = compare_run["folder"], compare_run["result"]
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("[compare] dpo vs sft:")]
    assert len(verdicts) == 1, result.stdout[-3000:]
    assert "reward " in verdicts[0] and "win rate " in verdicts[0] and "KL " in verdicts[0] and "length " in verdicts[0]
    assert verdicts[0].split(" -> ")[1].split(" (")[0] in comparison.VERDICTS.values()
    for name in (reports.REPORT_MD, reports.REPORT_HTML, reports.REPORT_JSON, comparison.SAMPLES,
                 *reports.PLOTS.values(), "manifest.json"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    for plot in reports.PLOTS.values():
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["checkpoints"]) == {"sft", "dpo"} and manifest["reward_model"]["stage"] == "reward"
    assert manifest["metrics"]["verdicts"]["dpo"] in comparison.VERDICTS
    # Cost accounting: sampling both models, scoring, the KL passes (fp32 by default)
    phases = manifest["metrics"]["cost"]["phases"]
    assert set(phases) == {"generate", "score", "kl", "total"} and phases["kl"]["dtype"] == "float32"
    assert all(row["tokens"] > 0 and 0 < row["peak_fraction"] < 1 for row in phases.values()), phases
    assert "compute generate" in result.stdout


def test_report_numbers_agree_with_the_samples(compare_run, tiny_data):
    folder = compare_run["folder"]
    results = json.loads((folder / reports.REPORT_JSON).read_text())
    rows = comparison.read_samples(folder)
    prompts = [json.loads(line)["prompt_id"] for line in tiny_data["prompts"].read_text().splitlines()]
    assert results["prompts"] == len(prompts) and results["model_order"] == ["sft", "dpo"]
    assert len(rows) == 2 * len(prompts) * 2  # models x prompts x samples
    assert {row["model"] for row in rows} == {"sft", "dpo"}

    def prompt_rewards(model):
        return [np.mean([r["reward"] for r in rows if r["model"] == model and r["prompt_id"] == p]) for p in prompts]

    sft, dpo = np.array(prompt_rewards("sft")), np.array(prompt_rewards("dpo"))
    entry = results["comparisons"][0]
    d, w = entry["reward_difference"], entry["win_rate"]
    assert d["difference"] == pytest.approx(float(np.mean(dpo - sft)))
    assert d["low"] <= d["difference"] <= d["high"]
    assert (w["wins"], w["losses"], w["ties"]) == (int((dpo > sft).sum()), int((dpo < sft).sum()), int((dpo == sft).sum()))
    # k3 >= 0; models differ; at temperature 1 the KL reuses the comparison samples (2 per prompt: the
    # default kl_samples_per_prompt follows samples_per_prompt)
    assert entry["kl"]["mean"] > 0 and entry["kl"]["samples"] == 2 * len(prompts)
    for model in ("sft", "dpo"):
        m = results["models"][model]
        model_rows = [r for r in rows if r["model"] == model]
        assert m["tokens_mean"] == pytest.approx(np.mean([r["tokens"] for r in model_rows]))
        assert set(m["style_pass_rates"]) == set(model_rows[0]["style"]) and len(m["style_pass_rates"]) == 5
    assert entry["length_change"] == pytest.approx(
        results["models"]["dpo"]["tokens_mean"] / results["models"]["sft"]["tokens_mean"] - 1)

    report = (folder / reports.REPORT_MD).read_text()
    assert f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" in report
    assert entry["verdict_line"] in report
    assert "Why sampled decoding" in report and "temperature 1.0" in report and "max_new_tokens 12" in report
    for plot in reports.PLOTS.values():
        assert f"]({plot})" in report
    assert "### Examples (dpo vs sft)" in report and "Not collected yet" in report


def test_model_compared_with_itself_gives_zero_kl_and_all_ties(compare_run, tiny_data):
    """Same checkpoint twice, same seed: identical responses, so every prompt ties and the KL is 0."""
    run, sft = compare_run["run"], str(runs.stage_dir(compare_run["run"], "sft"))
    result = run_stage("compare", "--run", "self", "--reward_dir", str(runs.stage_dir(run, "reward")),
                       "--checkpoints", sft, sft, *compare_args(tiny_data["prompts"], "--max_prompts", "4"))
    assert_ok(result)
    results = json.loads((runs.stage_dir("self", "compare") / reports.REPORT_JSON).read_text())
    entry = results["comparisons"][0]
    assert entry["kl"]["mean"] == 0 and entry["kl"]["k1_mean"] == 0
    assert entry["win_rate"]["ties"] == 4 and entry["win_rate"]["wins"] == entry["win_rate"]["losses"] == 0
    assert entry["reward_difference"]["difference"] == 0 and entry["verdict"] == "inconclusive"
    assert "-> inconclusive" in result.stdout


def test_bad_inputs_fail_cleanly_without_output(compare_run, runs_root, tiny_data, tmp_path):
    run = compare_run["run"]
    # no aligned stage in this run
    lonely = "lonely"
    shutil.copytree(runs_root / run / "sft", runs_root / lonely / "sft")
    result = run_stage("compare", "--run", lonely, *compare_args(tiny_data["prompts"]))
    assert result.returncode == 2 and "runs/lonely/dpo" in result.stderr and "make dpo" in result.stderr
    # a broken prompts file names file:line
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt_id": "a", "prompt": [{"role": "user", "content": "hi"}]}\n{"prompt_id": "b"}\n')
    result = run_stage("compare", "--run", run, *compare_args(bad))
    assert result.returncode == 2 and f"{bad}:2: prompt" in result.stderr
    # a sample count below 1 is named (kl_samples_per_prompt: null means samples_per_prompt)
    result = run_stage("compare", "--run", run, "--kl_samples_per_prompt", "0")
    assert result.returncode == 2 and "kl_samples_per_prompt: must be >= 1, got 0" in result.stderr
    # an unknown config key is named
    result = run_stage("compare", "--run", run, "--samples_per_promt", "3")
    assert result.returncode == 2 and "samples_per_prompt" in result.stderr
    # a reward model that failed its gate is refused when asked to
    gate_run = "gate"
    for stage in ("sft", "dpo"):
        shutil.copytree(runs_root / run / stage, runs_root / gate_run / stage)
    make_reward_stage(gate_run, runs_root / run / "sft" / "model", gate_passed=False)
    result = run_stage("compare", "--run", gate_run, "--reward_gate_policy", "refuse", *compare_args(tiny_data["prompts"]))
    assert result.returncode == 2 and "FAILED its quality gate" in result.stderr
    assert not (runs_root / gate_run / "compare").exists() and not (runs_root / lonely / "compare").exists()


def test_renamed_and_mistyped_keys_are_refused_with_the_right_name(tmp_path):
    """One spelling per knob: an old key (command line or YAML) names its new spelling; a bad choice is refused."""
    result = run_stage("compare", "--backend", "hf")
    assert result.returncode == 2 and "--backend is now called --generation_backend" in result.stderr
    old = tmp_path / "old.yaml"
    old.write_text("dtype: bf16\nreward_checkpoint: runs/x/reward\n")
    result = run_stage("compare", "--config", str(old))
    assert result.returncode == 2 and "'dtype' is now called 'generation_dtype'" in result.stderr
    result = run_stage("compare", "--kl_dtype", "float32")
    assert result.returncode == 2 and "kl_dtype" in result.stderr and "fp32" in result.stderr
    result = run_stage("compare", "--kl_estimator", "k2")
    assert result.returncode == 2 and "kl_estimator" in result.stderr and "k2" in result.stderr


# ----------------------------------------------------------------------------- the LLM judge


def test_an_llm_judge_behind_a_real_vllm_server_judges_both_orders(compare_run, runs_root, tiny_data, vllm_server):
    """The tiny model serves as the judge (vLLM's OpenAI server, answers constrained to A | B | tie):
    every answer pair is asked in both orders, the report's numbers follow from judge.jsonl, and the
    agreement is taken against the reward model's picks in samples.jsonl."""
    run = "cmp-judge"
    (runs_root / run).mkdir()
    for stage in ("sft", "dpo", "reward"):
        (runs_root / run / stage).symlink_to(runs_root / compare_run["run"] / stage)
    result = run_stage("compare", "--run", run, "--judge_url", vllm_server,
                       *compare_args(tiny_data["prompts"], "--max_prompts", "4"))
    assert_ok(result)
    folder = runs.stage_dir(run, "compare")
    calls = [json.loads(line) for line in (folder / "judge.jsonl").read_text().splitlines()]
    assert len(calls) == 4 * 2  # prompts x samples, each pair asked twice
    assert all(call["first"] in judge.LABELS and call["second"] in judge.LABELS for call in calls)
    assert all(call["verdict"] == judge.combine(call["first"], call["second"]) for call in calls)

    rows = comparison.read_samples(folder)
    reward = {(r["model"], r["prompt_id"], r["sample"]): r["reward"] for r in rows}
    for call in calls:
        difference = reward[("dpo", call["prompt_id"], call["sample"])] - reward[("sft", call["prompt_id"], call["sample"])]
        assert call["reward_model"] == ("tie" if difference == 0 else "aligned" if difference > 0 else "baseline")
    results = json.loads((folder / reports.REPORT_JSON).read_text())
    (entry,) = results["comparisons"]
    assert entry["judge"] == pytest.approx(judge.judge_summary(calls))
    assert results["judge"]["structured"] is True and results["judge"]["model"]
    report = (folder / reports.REPORT_MD).read_text()
    assert "### LLM judge" in report and "| **LLM-judge win rate** |" in report
    assert "[compare] dpo vs sft: LLM judge win rate" in result.stdout
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    assert metrics["dpo_judge_wins"] == entry["judge"]["wins"]


def test_an_unreachable_judge_is_one_line_before_any_work(compare_run, runs_root, tiny_data):
    from tests.conftest import free_port

    result = run_stage("compare", "--run", compare_run["run"], "--force", "--judge_url", f"http://127.0.0.1:{free_port()}",
                       *compare_args(tiny_data["prompts"], "--max_prompts", "2"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1:] == [line for line in result.stderr.splitlines()
                                                       if line.startswith("error:")], result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: judge_url: http://127.0.0.1:") and "unreachable" in line
    assert "Traceback" not in result.stderr
    assert not list((runs_root / compare_run["run"]).glob("compare.failed-*"))


def test_by_default_every_finished_aligned_stage_is_compared_in_one_report(compare_run, runs_root, tiny_model_dir,
                                                                           tiny_data):
    """A run with DPO and PPO (no RLOO): one report, sft first, a comparison and a verdict line for each."""
    run = "cmp-all"
    (runs_root / run).mkdir()
    for stage in ("sft", "dpo", "reward"):
        (runs_root / run / stage).symlink_to(runs_root / compare_run["run"] / stage)
    make_policy_stage(run, "ppo", tiny_model_dir, noise=0.02, seed=2)
    result = run_stage("compare", "--run", run, *compare_args(tiny_data["prompts"], "--max_prompts", "2"))
    assert_ok(result)
    results = json.loads((runs.stage_dir(run, "compare") / reports.REPORT_JSON).read_text())
    assert results["model_order"] == ["sft", "dpo", "ppo"]
    assert [(c["aligned"], c["baseline"]) for c in results["comparisons"]] == [("dpo", "sft"), ("ppo", "sft")]
    assert sum(line.startswith(("[compare] dpo vs sft:", "[compare] ppo vs sft:")) for line in result.stdout.splitlines()) == 2
