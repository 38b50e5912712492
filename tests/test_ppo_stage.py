"""The PPO stage end to end on the tiny model (slow tier): real vLLM rollouts, real torch training.

The policy is the cold-or-dry SFT run of tests/test_dpo.py and the reward model its hand-built
token counter (score ~ +1 per "cold", -1 per "dry"), so a working PPO must raise the held-out
reward within a few updates. One stage run serves most tests (module fixture). Rollouts are
capped at 3 tokens: the tiny SFT model never learned to stop (it emits no eos within 16 tokens),
so every rollout is cut and must carry the truncation penalty.
"""

from __future__ import annotations

import json
import statistics

import pytest

from align import runs
from tests.conftest import assert_ok, run_stage
from tests.fakes import read_rows

pytestmark = pytest.mark.slow

PENALTY = 1.0
PPO_ARGS = ("--updates", "3", "--prompts_per_update", "16", "--samples_per_prompt", "4", "--max_new_tokens", "3",
            "--eval_max_new_tokens", "16", "--eval_samples_per_prompt", "4", "--learning_rate", "0.002",
            "--critic_learning_rate", "0.003", "--micro_batch_size", "16", "--forward_batch_size", "16",
            "--truncation_penalty", str(PENALTY), "--push_check_tokens", "8", "--precision", "fp32",
            "--generation_backend", "vllm", "--generation_dtype", "fp32", "--kv_cache_gib", "0.25",
            # Every update trains the policy (the critic-only warm-up itself: tests/test_ppo.py), at a policy
            # lr that reaches the clip: at 0.001, with the unclipped critic now the default, no step clipped
            # (ratios within 2% of 1); at 0.002 the 12 steps' clip fraction averages ~0.12
            "--critic_warmup_updates", "0")


@pytest.fixture(scope="module")
def ppo_run(runs_root, cold_dry) -> dict:
    run = cold_dry["run"]
    result = run_stage("ppo", "--run", run, "--ranked_files", str(cold_dry["ranked"]), "--eval_file",
                       str(cold_dry["prompts"]), *PPO_ARGS)
    assert_ok(result)
    folder = runs_root / run / "ppo"
    return {"result": result, "folder": folder, "manifest": json.loads((folder / "manifest.json").read_text()),
            "updates": read_rows(folder / "logs" / "updates.jsonl"),
            "steps": read_rows(folder / "logs" / "steps.jsonl")}


def test_first_update_starts_at_the_reference(ppo_run):
    """LoRA B starts at 0: the policy IS the reference at update 1 (KL 0) and the first minibatch's
    ratio is exactly 1 (old log-probs recomputed in torch, dropout off), so nothing clips."""
    first = ppo_run["updates"][0]
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["objective/kl_k3"] == pytest.approx(0.0, abs=1e-6)
    step = ppo_run["steps"][0]
    assert step["update"] == 1 and step["epoch"] == 0 and step["minibatch"] == 0
    assert step["val/ratio"] == pytest.approx(1.0, abs=1e-5) and step["policy/clipfrac_avg"] == 0.0
    assert step["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-6)
    # vLLM in fp32 samples the trainer's distribution
    assert first["rollout/logprob_abs_diff_mean"] < 1e-3


def test_held_out_reward_rises_beyond_the_noise(ppo_run):
    folder, metrics = ppo_run["folder"], ppo_run["manifest"]["metrics"]
    sft_rows = read_rows(folder / "samples" / "eval_sft.jsonl")
    ppo_rows = read_rows(folder / "samples" / "eval_ppo.jsonl")
    assert len(sft_rows) == len(ppo_rows) == 8 * 4
    sft_mean = statistics.fmean(row["reward"] for row in sft_rows)
    ppo_mean = statistics.fmean(row["reward"] for row in ppo_rows)
    noise = statistics.stdev(row["reward"] for row in sft_rows) / len(sft_rows) ** 0.5
    assert ppo_mean > sft_mean + 3 * noise, (sft_mean, ppo_mean, noise)
    assert metrics["mean_reward_sft"] == pytest.approx(sft_mean)
    assert metrics["mean_reward_ppo"] == pytest.approx(ppo_mean)
    assert metrics["kl"] > 0
    assert sum(r["response"].count("cold") for r in ppo_rows) > sum(r["response"].count("cold") for r in sft_rows)


def test_clip_statistics_are_sane(ppo_run):
    steps = ppo_run["steps"]
    assert len(steps) == 3 * 2 * 2  # updates x epochs x minibatches
    clipfrac = statistics.fmean(step["policy/clipfrac_avg"] for step in steps)
    assert 0 < clipfrac < 0.3, clipfrac
    assert all(step["policy/approxkl_avg"] < 0.1 for step in steps)
    assert all(abs(step["val/ratio"] - 1) < 0.05 for step in steps)
    assert ppo_run["manifest"]["metrics"]["clipfrac_mean"] == pytest.approx(clipfrac)


def test_a_cut_answer_scores_exactly_the_truncation_penalty_lower(ppo_run):
    rows = [row for update in range(1, 4)
            for row in read_rows(ppo_run["folder"] / "rollouts" / f"update-{update}-samples.jsonl")]
    assert len(rows) == 3 * 16 * 4
    assert any(row["finish_reason"] == "length" and row["tokens"] == 3 for row in rows), "nothing was cut"
    for row in rows:
        expected = row["reward_model_score"] - (PENALTY if row["finish_reason"] == "length" else 0.0)
        assert row["reward"] == expected, row  # exactly: align.scoring.effective_reward
    for update in ppo_run["updates"]:  # and the penalised score is the one PPO's reward is shaped from
        assert update["objective/scores_penalized"] == pytest.approx(
            update["objective/scores"] - PENALTY * update["response/clip_ratio"], abs=1e-5)
        assert update["objective/rlhf_reward"] == pytest.approx(
            update["objective/scores_penalized"] + update["objective/non_score_reward"], abs=1e-5)


def test_after_a_push_the_engine_samples_the_merged_policy(ppo_run):
    """Greedy answers of vLLM after the last push equal HF greedy answers of the saved merged model."""
    import torch

    from align import ppo
    from align.generation import render_prompts
    from align.models import load_causal_lm, load_tokenizer

    checks = read_rows(ppo_run["folder"] / "logs" / "push_check.jsonl")
    assert all(row["sync/greedy_agreement"] == 1.0 for row in ppo_run["updates"])
    last = [row for row in checks if row["update"] == 3]
    assert last
    model_dir = str(ppo_run["folder"] / "model")
    tokenizer = load_tokenizer(model_dir)
    merged = load_causal_lm(model_dir).eval()
    with torch.no_grad():
        hf = ppo.greedy_ids(merged, render_prompts(tokenizer, [row["prompt"] for row in last]), 8,
                            tokenizer.eos_token_id)
    assert hf == [row["generator_ids"] for row in last]


def test_outputs_lineage_logs_and_tensorboard(ppo_run, runs_root, cold_dry):
    folder, facts = ppo_run["folder"], ppo_run["manifest"]
    assert facts["status"] == "complete" and facts["parent"]["stage"] == "sft"
    assert facts["reward_model"]["stage"] == "reward" and facts["reward_model"]["manifest_sha256"]
    assert (folder / "model" / "config.json").is_file() and not (folder / "model" / "adapter_config.json").exists()
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert list((folder / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    metrics = facts["metrics"]
    for phase in ("generate", "score", "forward", "train", "sync", "eval"):
        assert metrics[f"time_{phase}_s"] > 0, phase
    assert metrics["train_steps"] == 12 and len(metrics["updates"]) == 3 and metrics["verdict"]
    # Cost accounting: every computing phase counted; training runs policy and critic forward + backward
    phases = metrics["cost"]["phases"]
    # (sync: the greedy agreement check after each push samples the engine)
    assert set(phases) == {"generate", "score", "forward", "train", "sync", "eval", "total"}
    assert all(row["tokens"] > 0 and 0 < row["peak_fraction"] < 1 for row in phases.values()), phases
    assert phases["train"]["flops"] > phases["forward"]["flops"] / 3  # 3 forwards (old, ref, value) vs 2 fwd+bwd
    for key in ("objective/scores", "objective/rlhf_reward", "objective/non_score_reward", "objective/entropy",
                "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "critic/vf_explained_var",
                "response/finished_fraction", "grad_norm/policy", "grad_norm/critic", "kl_coef"):
        assert key in ppo_run["updates"][-1], key
    stdout = ppo_run["result"].stdout
    assert stdout.count("[ppo] update ") == 3 and "mean reward SFT" in stdout
    assert metrics["verdict_notes"] is not None and "ppo" in stdout.splitlines()[-1].lower()
    card = (folder / "model" / "README.md").read_text()  # the model card (align/model_card.py)
    assert metrics["verdict_line"] == stdout.splitlines()[-1] and metrics["verdict_line"] in card
    assert "| updates | 3 |" in card and facts["reward_model"]["manifest_sha256"] in card


def test_reward_model_that_failed_its_gate_is_refused_on_request(runs_root, cold_dry):
    run = "ppo-gate-failed"
    with runs.stage_output(run, "reward", {"built_by": "tests/test_ppo_stage.py"}, seed=0) as out:
        out.metrics.update(gate_passed=False, gate_reasons=["pairwise_accuracy 0.400 < min_accuracy 0.6"])
    result = run_stage("ppo", "--run", run, "--sft_dir", str(runs_root / cold_dry["run"] / "sft"), "--ranked_files",
                       str(cold_dry["ranked"]), "--eval_file", str(cold_dry["prompts"]),
                       "--reward_gate_policy", "refuse")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "FAILED its quality gate" in result.stderr
    assert not (runs_root / run / "ppo").exists()
