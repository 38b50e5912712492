"""The RLOO stage end to end on the tiny model (slow tier): TRL's real RLOOTrainer, rollouts from
a real vLLM engine through align/rloo.py, the reward model as a Python reward function.

The policy is the cold-or-dry SFT run of tests/test_dpo.py and the reward model its hand-built
token counter (score ~ +1 per "cold", -1 per "dry"), so working RLOO must raise the held-out
reward within a few steps. Rollouts are capped at 8 tokens: the tiny SFT model never learned to
stop, so every rollout is cut and must carry exactly the truncation penalty.
"""

from __future__ import annotations

import json
import statistics

import pytest

from tests.conftest import assert_ok, run_stage
from tests.fakes import read_rows

pytestmark = pytest.mark.slow

PENALTY = 1.0
STEPS, BATCH, GENERATIONS, CAP = 8, 16, 4, 8
RLOO_ARGS = ("--max_steps", str(STEPS), "--per_device_train_batch_size", str(BATCH), "--gradient_accumulation_steps",
             "1", "--num_generations",
             str(GENERATIONS), "--max_completion_length", str(CAP), "--learning_rate", "0.003", "--warmup_steps", "0",
             "--eval_max_new_tokens", "16", "--eval_samples_per_prompt", "4", "--truncation_penalty", str(PENALTY),
             "--precision", "fp32", "--generation_backend", "vllm", "--generation_dtype", "fp32",
             "--kv_cache_gib", "0.25", "--save_steps", "100")


@pytest.fixture(scope="module")
def rloo_run(runs_root, cold_dry) -> dict:
    run = cold_dry["run"]
    result = run_stage("rloo", "--run", run, "--ranked_files", str(cold_dry["ranked"]), "--eval_file",
                       str(cold_dry["prompts"]), *RLOO_ARGS)
    assert_ok(result)
    folder = runs_root / run / "rloo"
    return {"result": result, "folder": folder, "manifest": json.loads((folder / "manifest.json").read_text()),
            "steps": read_rows(folder / "logs" / "steps.jsonl"),
            "rollouts": read_rows(folder / "rollouts" / "rollouts.jsonl")}


def test_held_out_reward_rises_beyond_the_noise(rloo_run):
    folder, metrics = rloo_run["folder"], rloo_run["manifest"]["metrics"]
    sft_rows = read_rows(folder / "samples" / "eval_sft.jsonl")
    rloo_rows = read_rows(folder / "samples" / "eval_rloo.jsonl")
    assert len(sft_rows) == len(rloo_rows) == 8 * 4
    sft_mean = statistics.fmean(row["reward"] for row in sft_rows)
    rloo_mean = statistics.fmean(row["reward"] for row in rloo_rows)
    noise = statistics.stdev(row["reward"] for row in sft_rows) / len(sft_rows) ** 0.5
    assert rloo_mean > sft_mean + 3 * noise, (sft_mean, rloo_mean, noise)
    assert metrics["mean_reward_sft"] == pytest.approx(sft_mean)
    assert metrics["mean_reward_rloo"] == pytest.approx(rloo_mean)
    assert metrics["kl"] > 0
    assert metrics["verdict"] in ("better", "inconclusive", "worse") and "rloo" in metrics["verdict_line"]
    assert sum(r["response"].count("cold") for r in rloo_rows) > sum(r["response"].count("cold") for r in sft_rows)


def test_rollouts_come_from_the_trained_policy(rloo_run):
    """The generator gets the policy's weights after every step: the rollouts' reward climbs from the
    first step to the last (a generator left on the SFT weights would sample the same distribution
    throughout), and the first step, before any update, has KL 0 to the reference."""
    steps, rollouts = rloo_run["steps"], rloo_run["rollouts"]
    assert [row["step"] for row in steps] == list(range(1, STEPS + 1))
    assert len(rollouts) == STEPS * BATCH == rloo_run["manifest"]["metrics"]["sampled_responses"]
    by_step = {}
    for row in rollouts:
        by_step.setdefault(row["step"], []).append(row["reward"])
    assert sorted(by_step) == list(range(STEPS)) and all(len(v) == BATCH for v in by_step.values())
    first = statistics.fmean(by_step[0] + by_step[1])
    last = statistics.fmean(by_step[STEPS - 2] + by_step[STEPS - 1])
    noise = statistics.stdev(by_step[0] + by_step[1]) / (2 * BATCH) ** 0.5
    assert last > first + 3 * noise, (first, last, noise, {step: statistics.fmean(v) for step, v in by_step.items()})
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["kl"] > 0


def test_every_cut_rollout_carries_exactly_the_penalty(rloo_run):
    rollouts = rloo_run["rollouts"]
    assert rollouts and all(row["finish_reason"] == "length" and row["tokens"] == CAP for row in rollouts)
    for row in rollouts:
        assert row["reward"] == pytest.approx(row["reward_model_score"] - PENALTY, abs=1e-6)
    # TRL's own logged reward is the mean of what the reward function returned, penalty included
    mean_first = statistics.fmean(row["reward"] for row in rollouts if row["step"] == 0)
    assert rloo_run["steps"][0]["reward"] == pytest.approx(mean_first, abs=1e-4)


def test_outputs_manifest_and_summary(rloo_run, runs_root, cold_dry):
    folder, manifest = rloo_run["folder"], rloo_run["manifest"]
    assert (folder / "model" / "config.json").is_file() and (folder / "adapter" / "adapter_config.json").is_file()
    assert (folder / "model" / "README.md").is_file()
    assert manifest["parent"]["stage"] == "sft" and manifest["reward_model"]["stage"] == "reward"
    assert manifest["metrics"]["train_steps"] == STEPS
    assert manifest["generation_backend"].startswith("vllm")
    assert any((folder / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    out = rloo_run["result"].stdout
    summary_line = next(line for line in out.splitlines() if line.startswith(f"[rloo] steps {STEPS} | mean reward SFT"))
    # Cost accounting (align/cost.py): every computing phase counted, below this machine's peak. Each
    # sampled batch is run three times in torch: the old policy's and the reference's log-probs
    # (beta 0.05), then forward + backward once (num_iterations 1), over exactly the tokens sampled.
    phases = manifest["metrics"]["cost"]["phases"]
    assert {"generate", "score", "train", "eval", "total"} <= set(phases), phases
    assert all(row["tokens"] > 0 and 0 < row["peak_fraction"] < 1 for row in phases.values()), phases
    assert phases["train"]["tokens"] == 3 * phases["generate"]["tokens"], phases
    assert "compute generate" in summary_line and "of peak" in summary_line, summary_line
    # a second identical command is up to date: nothing retrained
    again = run_stage("rloo", "--run", cold_dry["run"], "--ranked_files", str(cold_dry["ranked"]), "--eval_file",
                      str(cold_dry["prompts"]), *RLOO_ARGS)
    assert_ok(again)
    assert "up to date" in again.stdout + again.stderr


def test_trl_vllm_flag_is_refused_in_one_line(cold_dry):
    result = run_stage("rloo", "--run", cold_dry["run"], "--use_vllm", "true", "--max_steps", "1")
    assert result.returncode == 2
    assert "use_vllm" in result.stderr and "generation_backend" in result.stderr
    assert "Traceback" not in result.stderr


def test_micro_batches_train_what_one_batch_trains(runs_root, cold_dry):
    """The default trains a step's 16 samples 4 at a time (gradient accumulation 4) to halve the
    memory; that must be the same step as one batch of 16: TRL's RLOO loss is a mean over
    sequences and the Trainer divides each micro-batch's by the accumulation. 2 steps from the same
    seed (fp32, hf backend): the same rollouts (all 16 sampled at once either way), the same
    gradient norms; a run with another seed is the control."""
    common = ["--ranked_files", str(cold_dry["ranked"]), "--eval_file", str(cold_dry["prompts"]),
              "--sft_dir", str(runs_root / cold_dry["run"] / "sft"), "--reward_dir",
              str(runs_root / cold_dry["run"] / "reward"), "--max_steps", "2", "--num_generations", "4",
              "--max_completion_length", "8", "--learning_rate", "0.003", "--warmup_steps", "0",
              "--generation_backend", "hf", "--precision", "fp32", "--eval_limit", "2",
              "--eval_max_new_tokens", "4", "--eval_samples_per_prompt", "1", "--report_to", "none",
              "--save_steps", "100"]
    runs = {"whole": ("16", "1", "7"), "micro": ("4", "4", "7"), "other-seed": ("16", "1", "8")}
    for name, (batch, accumulation, seed) in runs.items():
        assert_ok(run_stage("rloo", "--run", f"rloo-{name}", "--per_device_train_batch_size", batch,
                            "--gradient_accumulation_steps", accumulation, "--seed", seed, *common))

    def norms(name: str) -> list[float]:
        return [row["grad_norm"] for row in read_rows(runs_root / f"rloo-{name}" / "rloo" / "logs" / "steps.jsonl")]

    def rollouts(name: str) -> list:
        return [(row["step"], row["response"], row["reward"])
                for row in read_rows(runs_root / f"rloo-{name}" / "rloo" / "rollouts" / "rollouts.jsonl")]

    manifest = json.loads((runs_root / "rloo-micro" / "rloo" / "manifest.json").read_text())
    assert manifest["effective_batch"] == 16 and len(rollouts("micro")) == 32
    assert rollouts("micro") == rollouts("whole")
    whole, micro, other = norms("whole"), norms("micro"), norms("other-seed")
    assert len(whole) == len(micro) == 2
    assert micro == pytest.approx(whole, rel=1e-4), (whole, micro)
    assert other != pytest.approx(whole, rel=1e-2), (whole, other)
