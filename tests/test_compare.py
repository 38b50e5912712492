"""The compare stage: its math against hand-computed cases, KL of a model with itself,
and the stage end to end on tiny checkpoints with a tiny reward model.

The tiny checkpoints are real stage outputs (written through `align.runs.stage_output`,
manifests and all): `sft` is the tiny random Llama, `dpo` the same weights moved by a
small seeded perturbation (a nearby model, as alignment produces), `reward` a tiny
random sequence classifier with one label. Real generation, real scoring, real forward
passes; only the weights are random.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from align import comparison, runs
from tests.conftest import assert_ok, run_stage

# ----------------------------------------------------------------------------- tiny stage outputs


def make_policy_stage(run: str, stage: str, source: Path, noise: float = 0.0, seed: int = 0) -> Path:
    """A finished `stage` whose model is `source`, optionally perturbed by seeded Gaussian noise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with runs.stage_output(run, stage, {"built_by": "tests/test_compare.py", "noise": noise}, seed) as out:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        if noise:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * noise)
        model.save_pretrained(out.model_dir)
        AutoTokenizer.from_pretrained(source).save_pretrained(out.model_dir)
    return out.path


def make_reward_stage(run: str, source: Path, gate_passed: bool = True) -> Path:
    """A finished `reward` stage holding a tiny random 1-label sequence classifier."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(source))
    config = AutoConfig.from_pretrained(source, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(7)
    with runs.stage_output(run, "reward", {"built_by": "tests/test_compare.py"}, 7) as out:
        AutoModelForSequenceClassification.from_config(config).save_pretrained(out.model_dir)
        AutoTokenizer.from_pretrained(source).save_pretrained(out.model_dir)
        out.metrics["gate_passed"] = gate_passed
    return out.path


def compare_args(prompts: Path, *extra: str) -> list[str]:
    """Small, fast settings: hf backend, short responses, few resamples."""
    return ["--prompts_file", str(prompts), "--backend", "hf", "--max_new_tokens", "12", "--samples_per_prompt", "2",
            "--bootstrap_resamples", "400", "--kl_batch_size", "16", *extra]  # fmt: skip


def make_compare_run(run: str, tiny_model_dir: Path, prompts: Path, *extra: str):
    """sft, dpo and reward stages of `run`, then `python -m stages.compare` on them; returns the process."""
    make_policy_stage(run, "sft", tiny_model_dir)
    make_policy_stage(run, "dpo", tiny_model_dir, noise=0.02, seed=1)
    make_reward_stage(run, tiny_model_dir)
    return run_stage("compare", "--run", run, *compare_args(prompts, *extra))


# ----------------------------------------------------------------------------- math, hand-computed


def test_prompt_means_average_samples_of_a_prompt():
    assert comparison.prompt_means([[1.0, 3.0], [2.0], [-1.0, 0.0, 4.0]]).tolist() == [2.0, 2.0, 1.0]
    with pytest.raises(ValueError):
        comparison.prompt_means([[1.0], []])


def test_paired_difference_hand_computed():
    # differences 1, 1, 1: every resample has mean 1, so the interval collapses on it
    d = comparison.paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0], resamples=500)
    assert (d["difference"], d["low"], d["high"]) == (1.0, 1.0, 1.0)
    assert d["aligned"] == 3.0 and d["baseline"] == 2.0 and d["prompts"] == 3
    # differences 0 and 1: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% percentiles are 0 and 1, and the mean is 0.5
    d = comparison.paired_difference([0.0, 1.0], [0.0, 0.0], resamples=4000, seed=3)
    assert (d["difference"], d["low"], d["high"]) == (0.5, 0.0, 1.0)
    # the share of resamples with mean 0.5 is about 1/2 (binomial check of the resampling itself)
    from align.evaluation import bootstrap_mean_ci

    assert bootstrap_mean_ci([0.0, 1.0], 4000, 3, confidence=0.4)[1:] == (0.5, 0.5)


def test_win_rate_counts_ties_apart_hand_computed():
    # per prompt: win, loss, tie, win, tie  -> 2 wins, 1 loss, 2 ties; rate 2/3
    w = comparison.prompt_win_rate([3.0, 1.0, 2.0, 5.0, 0.5], [1.0, 2.0, 2.0, 4.0, 0.5])
    assert (w["wins"], w["losses"], w["ties"], w["n"]) == (2, 1, 2, 5)
    assert w["rate"] == pytest.approx(2 / 3)
    assert w["rate_ties_half"] == pytest.approx(3 / 5)
    # Wilson 95% for 2 of 3, by hand: z = 1.959964; centre (p + z^2/2n)/(1 + z^2/n); half-width z*sqrt(p(1-p)/n + z^2/4n^2)/(1 + z^2/n)
    z, n, p = 1.959964, 3, 2 / 3
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (w["low"], w["high"]) == (pytest.approx(centre - half, abs=1e-5), pytest.approx(centre + half, abs=1e-5))
    assert w["low"] == pytest.approx(0.2077, abs=1e-4) and w["high"] == pytest.approx(0.9385, abs=1e-4)
    # a tolerance turns small differences into ties
    w = comparison.prompt_win_rate([1.05, 1.0], [1.0, 1.2], tie_tolerance=0.1)
    assert (w["wins"], w["losses"], w["ties"]) == (0, 1, 1)


def test_verdict_rules():
    up = {"difference": 0.4, "low": 0.1, "high": 0.7}
    across = {"difference": 0.1, "low": -0.1, "high": 0.3}
    down = {"difference": -0.4, "low": -0.7, "high": -0.1}
    wins_up = {"wins": 30, "losses": 10, "low": 0.6, "high": 0.85}
    wins_across = {"wins": 12, "losses": 10, "low": 0.35, "high": 0.7}
    wins_down = {"wins": 10, "losses": 30, "low": 0.15, "high": 0.4}
    assert comparison.decide(up, wins_up) == "better"
    assert comparison.decide(down, wins_down) == "worse"
    assert comparison.decide(across, wins_up) == "inconclusive"
    assert comparison.decide(up, wins_across) == "inconclusive"
    assert comparison.decide(up, {"wins": 0, "losses": 0, "low": 0.0, "high": 1.0}) == "inconclusive"


def test_cost_notes_flag_length_hacking_and_style_drift():
    assert comparison.cost_notes(0.1, {"concise": -0.05}, 0.2, 0.1) == []
    notes = comparison.cost_notes(0.5, {"concise": -0.3, "no_sign_off": 0.2}, 0.2, 0.1)
    assert notes == ["responses +50% longer: check for length hacking", "style drift: concise -30%"]


def test_human_comparison_majority_per_pair_and_reward_model_agreement():
    mapping = [{"pair_id": f"p{i}", "aligned": "dpo", "baseline": "sft", "reward": {"dpo": r, "sft": 0.0}}
               for i, r in enumerate([1.0, 1.0, -1.0, 1.0])]  # fmt: skip

    def answer(pid, winner, who):
        return {"pair_id": pid, "models": {"A": "sft", "B": "dpo"}, "winner": winner, "annotator": who}

    answers = [answer("p0", "dpo", "ann"), answer("p0", "dpo", "bob"),  # dpo
               answer("p1", "dpo", "ann"), answer("p1", "sft", "bob"),  # split -> tie
               answer("p2", "sft", "ann"),                              # sft
               answer("p3", "tie", "ann")]  # fmt: skip
    human = comparison.human_comparison(answers, mapping, "dpo", "sft")
    assert (human["wins"], human["losses"], human["ties"]) == (1, 1, 2)
    assert human["rate"] == 0.5 and human["answers"] == 6 and human["pairs_answered"] == 4
    assert human["annotators"] == ["ann", "bob"]
    # decided pairs: p0 (humans dpo, reward dpo) and p2 (humans sft, reward sft): agreement 2/2
    assert human["reward_model_agreement"] == 1.0 and human["reward_model_agreement_pairs"] == 2
    with pytest.raises(ValueError, match="mapping"):
        comparison.human_comparison([{**answer("p0", "dpo", "x"), "models": {"A": "x", "B": "y"}}], mapping, "dpo", "sft")


def test_ab_items_pair_the_same_sample_and_hide_the_models():
    prompt = [{"role": "user", "content": "Q?"}]

    def row(model, pid, sample, text, reward):
        return {"model": model, "prompt_id": pid, "sample": sample, "prompt": prompt, "text": text, "reward": reward}

    rows = [row("sft", "p1", 0, "s10", 0.1), row("sft", "p1", 1, "s11", 0.2), row("dpo", "p1", 0, "d10", 0.5),
            row("dpo", "p1", 1, "d11", 0.0), row("sft", "p2", 0, "same", 0.3), row("dpo", "p2", 0, "same", 0.3)]  # fmt: skip
    items, mapping, identical = comparison.ab_items("r", rows, "dpo", "sft", samples_per_prompt=2)
    assert identical == 1  # p2: identical responses, nothing to judge
    assert [m["prompt_id"] for m in mapping] == ["p1", "p1"] and [m["sample"] for m in mapping] == [0, 1]
    assert items[0]["responses"] == {"dpo": "d10", "sft": "s10"} and items[1]["responses"] == {"dpo": "d11", "sft": "s11"}
    assert mapping[0]["reward"] == {"dpo": 0.5, "sft": 0.1}
    assert all(item["pair_id"].startswith("ab-") and "dpo" not in item["pair_id"] for item in items)
    # new responses (a new compare run) give new record ids: old answers never attach to new texts
    changed = [dict(r, text=r["text"] + "!") if r["model"] == "dpo" else r for r in rows]
    assert comparison.ab_items("r", changed, "dpo", "sft", 2)[0][0]["pair_id"] != items[0]["pair_id"]
    assert len(comparison.ab_items("r", rows, "dpo", "sft", samples_per_prompt=1)[0]) == 1


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
    for name in (comparison.REPORT_MD, comparison.REPORT_HTML, comparison.REPORT_JSON, comparison.SAMPLES,
                 *comparison.PLOTS.values(), "manifest.json"):  # fmt: skip
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    for plot in comparison.PLOTS.values():
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["checkpoints"]) == {"sft", "dpo"} and manifest["reward_model"]["stage"] == "reward"
    assert manifest["metrics"]["verdicts"]["dpo"] in comparison.VERDICTS


def test_report_numbers_agree_with_the_samples(compare_run, tiny_data):
    folder = compare_run["folder"]
    results = json.loads((folder / comparison.REPORT_JSON).read_text())
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
    assert entry["kl"]["mean"] > 0 and entry["kl"]["samples"] == len(prompts)  # k3 >= 0; models differ
    for model in ("sft", "dpo"):
        m = results["models"][model]
        model_rows = [r for r in rows if r["model"] == model]
        assert m["tokens_mean"] == pytest.approx(np.mean([r["tokens"] for r in model_rows]))
        assert set(m["style_pass_rates"]) == set(model_rows[0]["style"]) and len(m["style_pass_rates"]) == 5
    assert entry["length_change"] == pytest.approx(
        results["models"]["dpo"]["tokens_mean"] / results["models"]["sft"]["tokens_mean"] - 1)

    report = (folder / comparison.REPORT_MD).read_text()
    assert f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" in report
    assert entry["verdict_line"] in report
    assert "Why sampled decoding" in report and "temperature 0.7" in report
    for plot in comparison.PLOTS.values():
        assert f"]({plot})" in report
    assert "### Examples (dpo vs sft)" in report and "Not collected yet" in report


def test_model_compared_with_itself_gives_zero_kl_and_all_ties(compare_run, tiny_data):
    """Same checkpoint twice, same seed: identical responses, so every prompt ties and the KL is 0."""
    run, sft = compare_run["run"], str(runs.stage_dir(compare_run["run"], "sft"))
    result = run_stage("compare", "--run", "self", "--reward_checkpoint", str(runs.stage_dir(run, "reward")),
                       "--checkpoints", sft, sft, *compare_args(tiny_data["prompts"], "--max_prompts", "4"))  # fmt: skip
    assert_ok(result)
    results = json.loads((runs.stage_dir("self", "compare") / comparison.REPORT_JSON).read_text())
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
