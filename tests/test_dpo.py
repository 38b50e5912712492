"""The DPO stage end to end on the tiny model: offline on human pairs, and on-policy rounds
that must raise the reward of the policy's samples (real TRL DPOTrainer, real vLLM).

The reward model of these tests is built by hand so its score is a known function: a
real LlamaForSequenceClassification (saved in Hugging Face format, scored through
align.scoring like any trained reward model) whose score is

    SCALE * (number of "cold" tokens - number of "dry" tokens) / (sequence length in tokens)

The tiny policy comes from the real SFT stage (LoRA, as by default), trained on answers
that are "cold" or "dry" half the time each, so its samples differ in exactly the tokens
the reward model counts and on-policy DPO has something to chase. Its embeddings are
scaled up (std 0.15 instead of 0.02): with tiny random embeddings no LoRA update of a
2-layer model can make any token likely, so neither SFT nor DPO could move it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from align import dpo_rounds, online, runs
from tests.conftest import assert_ok, build_tiny_model, run_stage
from tests.fakes import SCALE, build_token_reward_model, make_reward_run, read_rows, rewarded_tokens

def test_token_reward_model_scores_the_known_function(tmp_path, tiny_model_dir):
    from align.models import load_tokenizer
    from align.scoring import RewardScorer, reward_ids, reward_text

    tokenizer = load_tokenizer(str(tiny_model_dir))
    values = rewarded_tokens(tokenizer)
    build_token_reward_model(tiny_model_dir, tmp_path / "rm", values)
    scorer = RewardScorer(tmp_path / "rm")
    prompt = [{"role": "user", "content": "How should I store rice?"}]
    responses = ["drydry", "Keep it so.", "cold", "coldcoldcold"]
    scores = scorer.score([prompt] * 4, responses)
    for response, score in zip(responses, scores):
        ids = reward_ids(tokenizer, reward_text(tokenizer, prompt, response))
        expected = SCALE * sum(values.get(token, 0.0) for token in ids) / len(ids)
        assert score == pytest.approx(expected, abs=0.02 * SCALE)
    assert scores[1] == pytest.approx(0.0, abs=1e-4) and scores == sorted(scores)


def test_select_pairs_keeps_best_vs_worst_above_the_margin():
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    responses = [["a", "b", "c"], ["a", "b"], ["same", "same"], ["x", "y"]]
    scores = [[0.1, 2.0, -1.0], [0.0, 0.3], [5.0, -5.0], [1.0, 1.0]]
    pairs, counts = dpo_rounds.select_pairs(prompts, responses, scores, min_margin=0.5)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "c")]
    assert pairs[0]["margin"] == pytest.approx(3.0) and pairs[0]["prompt"] == prompts[0]
    assert counts == {"prompts": 4, "pairs": 1, "dropped_small_margin": 2, "dropped_identical": 1,
                      "pair_margin_mean": pytest.approx(3.0)}
    assert len(dpo_rounds.select_pairs(prompts, responses, scores, min_margin=0.0)[0]) == 2  # a tie is no pair
    with pytest.raises(ValueError):
        dpo_rounds.select_pairs(prompts, responses[:3], scores, 0.5)


def test_cut_answers_never_enter_a_pair():
    """A length-biased score would make the longest answer - here one cut at the cap - the best;
    cut answers are left out, so the pair is made of finished answers only."""
    prompts = [[{"role": "user", "content": "q"}], [{"role": "user", "content": "r"}]]
    responses = [["short.", "medium answer.", "long answer cut mid"], ["cut one", "cut two"]]
    scores = [[0.1, 0.9, 3.0], [2.0, 1.0]]
    finished = [[True, True, False], [False, False]]
    lengths = [[3, 6, 16], [16, 16]]
    pairs, counts = dpo_rounds.select_pairs(prompts, responses, scores, 0.5, finished=finished, lengths=lengths)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("medium answer.", "short.")]
    assert counts["cut_samples_left_out"] == 3 and counts["dropped_too_few_finished"] == 1
    assert counts["pair_chosen_longer_fraction"] == 1.0
    kept, _ = dpo_rounds.select_pairs(prompts, responses, scores, 0.5)  # the old rule, as a control
    assert ("long answer cut mid", "short.") in [(p["chosen"], p["rejected"]) for p in kept]


def test_length_matched_pairs_differ_little_in_length():
    prompts = [[{"role": "user", "content": "q"}]]
    responses = [["a", "bb", "ccc", "dddd"]]
    scores = [[0.0, 1.0, 1.2, 4.0]]  # the longest scores best: best vs worst pairs 40 vs 10 tokens
    lengths = [[10, 30, 32, 40]]
    (pair,), _ = dpo_rounds.select_pairs(prompts, responses, scores, 0.5, lengths=lengths)
    assert (pair["chosen"], pair["rejected"]) == ("dddd", "a")
    (pair,), counts = dpo_rounds.select_pairs(prompts, responses, scores, 0.5, lengths=lengths,
                                               selection="length_matched", length_tolerance=0.25)
    assert (pair["chosen"], pair["rejected"]) == ("dddd", "bb")  # 40 vs 30: within 25% of 40
    assert pair["margin"] == pytest.approx(3.0)
    none, counts = dpo_rounds.select_pairs(prompts, [["a", "b"]], [[0.0, 5.0]], 0.5, lengths=[[10, 40]],
                                           selection="length_matched")
    assert none == [] and counts["dropped_small_margin"] == 1


def test_margin_in_standard_deviations_keeps_the_same_pairs_on_any_reward_scale():
    """`std` margins scale with the round's scores: the same pairs on a reward model whose scores
    are 10x larger, where an absolute margin keeps every pair on one scale and none on the other."""
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    responses = [["a", "b"], ["c", "d"], ["e", "f"]]
    scores = [[0.0, 0.2], [0.0, 0.1], [0.0, 0.05]]
    spread = statistics.pstdev([0.0, 0.2, 0.0, 0.1, 0.0, 0.05])
    assert dpo_rounds.margin_threshold(scores, 0.5, "reward") == 0.5
    assert dpo_rounds.margin_threshold(scores, 1.0, "std") == pytest.approx(spread)
    kept = {}
    for scale in (1.0, 10.0):
        scaled = [[value * scale for value in row] for row in scores]
        margin = dpo_rounds.margin_threshold(scaled, 1.0, "std")
        kept[scale] = [p["chosen"] for p in dpo_rounds.select_pairs(prompts, responses, scaled, margin)[0]]
        assert len(dpo_rounds.select_pairs(prompts, responses, scaled, 0.5)[0]) == (0 if scale == 1 else 3)
    assert kept[1.0] == kept[10.0] == ["b", "d"]  # gaps 0.2 and 0.1 pass 1 std (0.073), 0.05 does not
    # the cut answers are left out of the spread, as they are of the pairs
    finished = [[True, True], [True, True], [False, False]]
    assert dpo_rounds.margin_threshold(scores, 1.0, "std", finished) == pytest.approx(
        statistics.pstdev([0.0, 0.2, 0.0, 0.1]))
    assert dpo_rounds.margin_threshold([[1.0]], 1.0, "std") == 0.0  # one score: no spread to measure


def test_round_prompts_rotate_through_a_seeded_shuffle():
    prompts = list(range(10))
    first, second, third = (online.round_prompts(prompts, i, 4, seed=1) for i in range(3))
    assert len(first) == len(second) == 4 and not set(first) & set(second)
    assert set(first) | set(second) | set(third) == set(prompts)  # wraps around after 10
    assert online.round_prompts(prompts, 0, 4, seed=1) == first
    assert sorted(online.round_prompts(prompts, 0, 50, seed=1)) == prompts


# ---------------------------------------------------------------------------
# The stage, end to end

DPO_ARGS = ("--max_new_tokens", "16", "--eval_max_new_tokens", "16", "--eval_samples_per_prompt", "4",
            "--prompts_per_round", "16", "--samples_per_prompt", "4", "--min_reward_margin", "0.3",
            "--per_device_train_batch_size", "8", "--learning_rate", "0.003", "--num_train_epochs", "2",
            "--warmup_steps", "0", "--logging_steps", "1", "--kl_max_samples", "32", "--generation_backend", "vllm",
            "--kv_cache_gib", "0.25")


def dpo_manifest(runs_root, run: str) -> dict:
    return json.loads((runs_root / run / "dpo" / "manifest.json").read_text())


def test_on_policy_round_raises_the_reward_of_fresh_samples(runs_root, cold_dry):
    run = cold_dry["run"]
    # The tiny policy never stops within 16 tokens, so every sample is cut: pair them anyway
    # (`keep`), as the test is about the learning signal; the next tests are about the cut.
    result = run_stage("dpo", "--run", run, "--mode", "on_policy", "--rounds", "1", "--ranked_files",
                       str(cold_dry["ranked"]), "--eval_file", str(cold_dry["prompts"]), *DPO_ARGS,
                       "--truncated_answers", "keep")
    assert_ok(result)
    folder = runs_root / run / "dpo"
    facts = dpo_manifest(runs_root, run)
    metrics = facts["metrics"]
    # Lineage: SFT is the parent, the reward model is recorded beside it.
    assert facts["status"] == "complete" and facts["parent"]["stage"] == "sft"
    assert facts["reward_model"]["stage"] == "reward" and facts["reward_model"]["manifest_sha256"]
    # The done-when number: held-out samples of the DPO policy score higher than the SFT model's,
    # by more than the noise (3 standard errors of the SFT samples' mean).
    sft_rows = read_rows(folder / "samples" / "eval_sft.jsonl")
    dpo_rows = read_rows(folder / "samples" / "eval_dpo.jsonl")
    assert len(sft_rows) == len(dpo_rows) == 8 * 4
    # The SFT samples are the ones stored for later stages beside the SFT checkpoint (align.online.HeldOut.sample_sft).
    source = metrics["heldout_sft_source"]
    stored = json.loads(Path(source.split(" in " if source.startswith("drawn") else "reused ", 1)[1]).read_text())
    assert [row["response"] for row in sft_rows] == [sample["text"] for group in stored["samples"] for sample in group]
    sft_mean = statistics.fmean(row["reward"] for row in sft_rows)
    dpo_mean = statistics.fmean(row["reward"] for row in dpo_rows)
    noise = statistics.stdev(row["reward"] for row in sft_rows) / len(sft_rows) ** 0.5
    assert dpo_mean > sft_mean + 3 * noise, (sft_mean, dpo_mean, noise)
    assert metrics["mean_reward_sft"] == pytest.approx(sft_mean) and metrics["mean_reward_dpo"] == pytest.approx(dpo_mean)
    assert metrics["beats_sft"] is True and metrics["kl"] > 0
    # It learned what the reward model counts: more "cold" than before.
    assert sum(r["response"].count("cold") for r in dpo_rows) > sum(r["response"].count("cold") for r in sft_rows)
    # Per-round and per-step metrics, time split, TensorBoard, the summary line.
    (round_row,) = metrics["rounds"]
    assert round_row["pairs"] >= 1 and round_row["train_steps"] >= 1
    for key in ("fresh_mean_reward", "fresh_style_score", "fresh_response_tokens", "fresh_kl", "train_loss",
                "train_rewards_accuracies", "train_rewards_margins", "train_logps_chosen", "train_logps_rejected"):
        assert key in round_row, key
    steps = read_rows(folder / "logs" / "steps.jsonl")
    assert any("rewards/margins" in row and "logps/chosen" in row for row in steps)
    for phase in ("generate", "score", "train", "sync", "eval"):
        assert metrics[f"time_{phase}_s"] > 0, phase
    # Cost accounting (align/cost.py): model FLOPs of every computing phase, below this machine's peak.
    phases = metrics["cost"]["phases"]
    assert set(phases) == {"generate", "score", "train", "eval", "total"}  # sync pushes weights: no model FLOPs
    for name, row in phases.items():
        assert row["tokens"] > 0 and 0 < row["peak_fraction"] < 1, (name, row)
        if name != "total":  # the stage's own phase times
            assert row["seconds"] == pytest.approx(metrics[f"time_{name}_s"], abs=0.02), name
    assert "compute generate" in result.stdout and " of peak (" in result.stdout
    assert list((folder / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert (folder / "model" / "config.json").is_file() and not (folder / "model" / "adapter_config.json").exists()
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert "[dpo] mode on_policy" in result.stdout and "mean reward SFT" in result.stdout


def test_offline_mode_trains_on_the_human_pairs(runs_root, cold_dry):
    run = cold_dry["run"]
    result = run_stage("dpo", "--run", run, "--mode", "offline", "--ranked_files", str(cold_dry["ranked"]),
                       "--eval_file", str(cold_dry["prompts"]), "--precompute_ref_log_probs", "false",
                       "--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.1", *DPO_ARGS)
    assert_ok(result)
    folder = runs_root / run / "dpo"
    facts = dpo_manifest(runs_root, run)
    assert facts["config"]["mode"] == "offline" and facts["config"]["loss_type"] == ["sigmoid", "sft"]
    assert facts["pair_report"]["pairs"] == 16
    assert len(read_rows(folder / "rounds" / "offline-pairs.jsonl")) == 16
    metrics = facts["metrics"]
    assert metrics["train_steps"] == 4  # 16 pairs / batch 8 x 2 epochs
    assert metrics["rounds"][0]["train_rewards_accuracies"] > 0.5
    assert metrics["mean_reward_dpo"] > metrics["mean_reward_sft"]
    card = (folder / "model" / "README.md").read_text()  # the model card (align/model_card.py)
    assert metrics["verdict_line"] in card and "| mode | offline |" in card and facts["reward_model"]["manifest_sha256"] in card


@pytest.mark.slow  # two stage processes
def test_bad_config_and_missing_parents_fail_clearly(runs_root, tiny_data):
    result = run_stage("dpo", "--run", "nowhere", "--mode", "online")
    assert result.returncode == 2 and "mode: expected one of on_policy, offline, got 'online'" in result.stderr
    result = run_stage("dpo", "--run", "nowhere", "--ranked_files", str(tiny_data["ranked"]),
                       "--eval_file", str(tiny_data["prompts"]))
    assert result.returncode == 2 and "runs/nowhere/sft" in result.stderr and "make sft" in result.stderr
    assert not (runs_root / "nowhere" / "dpo").exists()


def make_stopping_policy_run(run: str, tokenizer_dir) -> Path:
    """A finished `sft` stage whose tiny model says "cold" or "dry" and stops with probability ~0.15
    after every token, whatever came before: every layer is zero, so the logits are the tied
    embeddings times the normalised embedding of the last token, and every embedding row is a
    multiple of one unit vector (others ~0.1, eos ~14.7, "cold"/"dry" ~15.8 after RMSNorm)."""
    import torch
    from transformers import AutoModelForCausalLM

    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    with runs.stage_output(run, "sft", {"built_by": "tests/test_dpo.py: stopping policy"}, seed=0) as out:
        build_tiny_model(out.model_dir, tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(out.model_dir)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                elif "embed_tokens" not in name:
                    param.zero_()
            direction = torch.ones(model.config.hidden_size) / model.config.hidden_size ** 0.5
            scales = torch.full((model.config.vocab_size,), 0.01)
            for word in ("cold", "dry"):
                scales[tokenizer(word, add_special_tokens=False)["input_ids"][0]] = 1.4
            scales[tokenizer.eos_token_id] = 1.3
            model.get_input_embeddings().weight.copy_(scales[:, None] * direction[None, :])
        model.save_pretrained(out.model_dir)
    return runs.stage_dir(run, "sft")


def test_cut_answers_never_win_a_pair_for_length_alone(runs_root, cold_dry, default_model_dir):
    """A length-biased reward model (every "cold" AND every "dry" token scores, so a longer answer
    scores higher) and a cap that cuts part of the samples: no cut answer enters a pair, while the
    old rule (cut answers scored as if they had ended) would have made one the chosen answer."""
    run = "length-biased"
    sft = make_stopping_policy_run(run, default_model_dir)
    make_reward_run(run, sft / "model", words={"cold": 1.0, "dry": 1.0})
    result = run_stage("dpo", "--run", run, "--rounds", "1", "--ranked_files", str(cold_dry["ranked"]),
                       "--eval_file", str(cold_dry["prompts"]), *DPO_ARGS, "--max_new_tokens", "4",
                       "--eval_max_new_tokens", "4", "--min_reward_margin", "0.1")
    assert_ok(result)
    folder = runs_root / run / "dpo" / "rounds"
    samples, pairs = read_rows(folder / "round-1-samples.jsonl"), read_rows(folder / "round-1-pairs.jsonl")
    finish = {(json.dumps(row["prompt"]), row["response"]): row["finish_reason"] for row in samples}
    cut = sum(reason == "length" for reason in finish.values())
    assert 0 < cut < len(finish), f"{cut} of {len(finish)} distinct samples cut: the test needs both kinds"
    assert pairs, "no pair at all"
    for pair in pairs:
        key = json.dumps(pair["prompt"])
        assert finish[(key, pair["chosen"])] == finish[(key, pair["rejected"])] == "stop", pair
    # The control: the same samples, the reward model's own scores, cut answers allowed.
    by_prompt: dict[str, list[dict]] = {}
    for row in samples:
        by_prompt.setdefault(json.dumps(row["prompt"]), []).append(row)
    groups = list(by_prompt.values())
    old_pairs, _ = dpo_rounds.select_pairs([g[0]["prompt"] for g in groups], [[r["response"] for r in g] for g in groups],
                                           [[r["reward_model_score"] for r in g] for g in groups], 0.1)
    assert any(finish[(json.dumps(p["prompt"]), p["chosen"])] == "length"
               and finish[(json.dumps(p["prompt"]), p["rejected"])] == "stop" for p in old_pairs)
    # Held out, a cut answer scores exactly truncation_penalty below the reward model.
    heldout = read_rows(runs_root / run / "dpo" / "samples" / "eval_sft.jsonl")
    for row in heldout:
        expected = row["reward_model_score"] - (1.0 if row["finish_reason"] == "length" else 0.0)
        assert row["reward"] == pytest.approx(expected)
    assert {row["finish_reason"] for row in heldout} == {"stop", "length"}


def test_reward_model_that_failed_its_gate_is_refused_on_request(runs_root, cold_dry):
    run = "gate-failed"
    with runs.stage_output(run, "reward", {"built_by": "tests/test_dpo.py"}, seed=0) as out:
        out.metrics.update(gate_passed=False, gate_reasons=["pairwise_accuracy 0.400 < min_accuracy 0.6"])
    common = ("--run", run, "--sft_dir", str(runs_root / cold_dry["run"] / "sft"), "--ranked_files",
              str(cold_dry["ranked"]), "--eval_file", str(cold_dry["prompts"]))
    result = run_stage("dpo", *common, "--reward_gate_policy", "refuse")
    assert result.returncode == 2
    assert "FAILED its quality gate" in result.stderr and "reward_gate_policy: warn" in result.stderr
    assert not (runs_root / run / "dpo").exists()
