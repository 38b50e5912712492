"""Several processes (issue 13): 2 real ranks on CPU (torchrun, gloo) against 1 on the same global
batch, for SFT, reward, DPO (offline and on-policy), RLOO and PPO; the single-process tools refusing a multi-process launch; the
accelerate configs for GPU users, parsed and turned into launch commands by accelerate itself.

Why the 2-rank and 1-rank loss curves must agree: the same seed gives the same LoRA init and
shuffled order; accelerate hands rank 0 and rank 1 consecutive per-device batches of that order, so
step k of 2 ranks x 2 sees the same 4 examples as step k of 1 rank x 4, and DDP averages the two
gradients into the full batch's. Dropout is off (its masks come from each rank's own generator).
What remains should be float32 summation order. Measured (4 steps, warmup makes step 1's learning
rate 0, so steps 1-2 score the initial model): steps 1-2 agree to 2e-7 relative; steps 3-4, after
the first real updates, to 2e-4 (SFT) and 3e-4 (reward). Reward: the gradient norms of steps 1-2 agree
to the 4 digits logged, so its drift is Adam's first updates (about lr x sign(gradient)) turning
float noise into whole steps. SFT: the step-1 gradient norm differs by 1.2% (1.920 vs 1.943) on the
same examples and the same LoRA init (checked: identical adapters after a 0-learning-rate step):
an SFT-specific difference, not explained yet (issue 13). Narrowed down by hand: 1 rank x 2 with
2 accumulation steps reproduces 1 rank x 4 exactly (1.920, 1.936), so micro-batch padding and the
token normalisation inside a process are exact; 2 ranks give 1.943, 1.925 with
average_tokens_across_devices true and false alike, so that flag changes nothing across ranks
(transformers does see DDP: parallel_mode DISTRIBUTED, world_size 2). LOSS_TOLERANCE (1e-3 relative) is ~3x the largest difference seen.
How large a real mistake would be is measured in the same test: a 1-rank run that only shuffles
differently (`data_seed`), i.e. a rank training on the wrong examples, must differ by over
ORDER_MARGIN times the 2-rank difference: reward 40x (1.2e-2), SFT only ~4x (8e-4: the tiny SFT
examples differ by one topic word, so the random model's loss barely depends on which it sees).
A doubled gradient would not show: Adam's update ignores the gradient's scale.
Offline DPO (the cold-or-dry pairs, learning rate 0.008, `loss_type [sigmoid, sft]` at beta 0.1
pinned: at beta 0.2 the same steps amplify float noise to 1.3e-3): 2 ranks within 4.9e-5 of 1
rank; the other data order moves the curve by 5.4e-4 (11x: the pairs all look alike, so which
ones a step sees matters little; ORDER_MARGIN 4). At 0.02 the policy moves so fast that float
noise alone reaches 1.2e-3, over LOSS_TOLERANCE; at 0.003 the other order moved it only 9x the
noise. Those figures predate the fp32 pin, now set as for on-policy DPO below: on a bf16 CPU,
TRL's LM head runs its backward in bf16 (align.training.bf16_lm_head_products_on_cpu), which
rounds a batch of 2 unlike one of 4. In fp32 on the AMX Xeon the other order read 4.2x.
On-policy DPO (2 rounds of 16 prompts x 4 samples, hf backend): rank 0 alone samples, seeded per
round, so round 1's samples and pairs equal the 1-rank run's byte for byte; its 4 steps agree to
3e-6 relative (another data order: 1.9e-1). Round 2 samples the pushed policy, equal to the 1-rank
one up to float noise, and that noise flips an occasional sampled token: 63 of 64 samples equal
(another order: 44), so round 2 is compared by its samples, not its pairs or losses. Two settings
are pinned there and why: fp32 (bf16 autocast, this CPU's default, rounds differently for a batch
of 2 than of 4: 1.3-1.5e-3 by step 4 at learning rates 0.008 and 0.004), and the DPO loss alone:
TRL's SFT term (the stage's default `loss_type: [sigmoid, sft]`) is a token mean over each rank's
own chosen answers, so with answers of different lengths 2 ranks weight the tokens differently
from 1 rank (6.6e-3 by step 4 in fp32). That is TRL's loss under DDP, not a bug of ours (README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_ok, run_stage

LOSS_TOLERANCE = 1e-3  # relative, per logged step (see the module docstring)
ORDER_MARGIN = {"sft": 2, "reward": 10, "dpo": 4, "rloo": 4, "ppo": 4}  # another shuffle must move the curve this much more than 2 ranks do
MAX_STEPS = 4
GLOBAL_BATCH = 4


def run_ranks(stage: str, ranks: int, *args: str, timeout: int = 1200) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m torch.distributed.run --standalone --nproc_per_node <ranks> -m stages.<stage> ARGS`,
    one thread per rank; (result, wall seconds). `--` ends torchrun's own options: without it, its
    parser takes the stage's `--run` for an abbreviation of its `--run-path` and stops (README)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", f"stages.{stage}", "--", *args]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=timeout)
    return result, time.time() - started


def run_single(stage: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.time()
    result = run_stage(stage, *args)
    return result, time.time() - started


def three_runs(stage: str, common: list[str], name: str = "") -> tuple[subprocess.CompletedProcess, float, float]:
    """1 rank x 4, the same with another data order (`data_seed` 8), 2 ranks x 2: runs dist-<name>-1,
    -order and -2 (name: the stage's), each asserted to finish; (the 2-rank result, 1-rank seconds,
    2-rank seconds)."""
    name = name or stage
    single, single_s = run_single(stage, "--run", f"dist-{name}-1", "--per_device_train_batch_size", "4", *common)
    assert_ok(single)
    shuffled, _ = run_single(stage, "--run", f"dist-{name}-order", "--per_device_train_batch_size", "4",
                             "--data_seed", "8", *common)
    assert_ok(shuffled)
    ranks, ranks_s = run_ranks(stage, 2, "--per_device_train_batch_size", "2", "--run", f"dist-{name}-2", *common)
    assert_ok(ranks)
    return ranks, single_s, ranks_s


def finished_output(runs_root: Path, run: str, stage: str) -> dict:
    """The one output folder of the run (nothing temporary or failed left), its manifest."""
    assert sorted(path.name for path in (runs_root / run).iterdir()) == [stage]
    return json.loads((runs_root / run / stage / "manifest.json").read_text())


def largest_difference(curve: list, other: list) -> float:
    assert [step for step, _ in curve] == [step for step, _ in other] == list(range(1, MAX_STEPS + 1))
    return max(abs(a - b) / abs(a) for (_, a), (_, b) in zip(curve, other))


def assert_same_curve(stage: str, single: list, ranks: list, shuffled: list) -> None:
    """2 ranks within LOSS_TOLERANCE of 1 rank at every step, and far closer than another data order."""
    two_ranks = largest_difference(single, ranks)
    assert two_ranks <= LOSS_TOLERANCE, f"1 rank {single}\n2 ranks {ranks}"
    assert largest_difference(single, shuffled) > ORDER_MARGIN[stage] * max(two_ranks, 1e-6), (single, shuffled)


def assert_two_ranks_ran(manifest: dict, folder: Path, stage: str) -> None:
    """World size 2 from the manifest, and from the line every rank contributed to stage.log."""
    assert manifest["world_size"] == 2 and manifest["effective_batch"] == GLOBAL_BATCH
    log = (folder / "logs" / "stage.log").read_text()
    (line,) = [line for line in log.splitlines() if line.startswith(f"[{stage}] 2 processes:")]
    assert "rank 0 pid" in line and "rank 1 pid" in line, line
    assert f"[{stage}] effective batch 4 = 2 per device x 1 accumulation x 2 processes" in log


def report(stage: str, single: tuple, ranks: tuple, shuffled: list, batch: int = GLOBAL_BATCH,
           control: str = "other data order") -> None:
    """The curves and wall times, for `pytest -s` (the numbers the module docstring quotes)."""
    print(f"\n[{stage}] 1 rank x {batch}: {single[0]} ({single[1]:.0f} s)"
          f"\n[{stage}] 2 ranks x {batch // 2}: {ranks[0]} ({ranks[1]:.0f} s)"
          f"\n[{stage}] 1 rank, {control}: {shuffled}")


# SFT groups rows by length by default (transformers' sampler; reward can, with the same key), and the
# sampler sizes its mega-batches by the per-device batch: 2 ranks x 2 then order rows unlike 1 rank x 4.
# These tests compare the gradient arithmetic on one global batch, so they pin plain random batches.
RANDOM_BATCHES = ("--train_sampling_strategy", "random")


@pytest.mark.slow
def test_sft_two_ranks_match_one_rank_on_the_same_global_batch(runs_root, tiny_model_dir, tiny_data):
    common = ["--model_name_or_path", str(tiny_model_dir), "--train_file", str(tiny_data["sft"]),
              "--eval_file", str(tiny_data["prompts"]), "--max_steps", str(MAX_STEPS), "--logging_steps", "1",
              "--learning_rate", "0.003", "--lora_dropout", "0", "--seed", "7", *RANDOM_BATCHES]
    ranks, single_s, ranks_s = three_runs("sft", common)

    one = finished_output(runs_root, "dist-sft-1", "sft")
    two = finished_output(runs_root, "dist-sft-2", "sft")
    assert one["world_size"] == 1 and one["effective_batch"] == GLOBAL_BATCH
    assert_two_ranks_ran(two, runs_root / "dist-sft-2" / "sft", "sft")
    assert two["status"] == "complete" and two["metrics"]["train_steps"] == MAX_STEPS
    other_order = finished_output(runs_root, "dist-sft-order", "sft")["metrics"]["loss_curve"]
    assert_same_curve(two["stage"], one["metrics"]["loss_curve"], two["metrics"]["loss_curve"], other_order)
    folder = runs_root / "dist-sft-2" / "sft"
    assert (folder / "model" / "model.safetensors").is_file() and (folder / "adapter").is_dir()
    assert not (folder / "trainer").exists() and (folder / "model" / "README.md").is_file()
    assert ranks.stdout.count("[sft] eval loss") == 1, ranks.stdout  # one summary, from rank 0
    report("sft", (one["metrics"]["loss_curve"], single_s), (two["metrics"]["loss_curve"], ranks_s), other_order)

    # Up to date: both ranks reach the same decision, one line, the folder untouched.
    again, _ = run_ranks("sft", 2, "--per_device_train_batch_size", "2", "--run", "dist-sft-2", *common)
    assert_ok(again)
    assert again.stdout.count("[sft] up to date") == 1, again.stdout
    assert finished_output(runs_root, "dist-sft-2", "sft")["started_at"] == two["started_at"]


@pytest.mark.slow
def test_reward_two_ranks_match_one_rank_on_the_same_global_batch(runs_root, tiny_model_dir, tiny_data):
    # lora_top_layers 1: adapters in the top layer only, with ddp_find_unused_parameters false
    # (align/training.py): DDP would fail at the second step if any trainable parameter went unused.
    common = ["--model_name_or_path", str(tiny_model_dir), "--ranked_files", str(tiny_data["ranked"]),
              "--max_steps", str(MAX_STEPS), "--logging_steps", "1", "--learning_rate", "0.003",
              "--lora_top_layers", "1", "--seed", "7", *RANDOM_BATCHES]
    ranks, single_s, ranks_s = three_runs("reward", common)

    one = finished_output(runs_root, "dist-reward-1", "reward")
    two = finished_output(runs_root, "dist-reward-2", "reward")
    folder = runs_root / "dist-reward-2" / "reward"
    assert_two_ranks_ran(two, folder, "reward")
    other_order = finished_output(runs_root, "dist-reward-order", "reward")["metrics"]["loss_curve"]
    assert_same_curve(two["stage"], one["metrics"]["loss_curve"], two["metrics"]["loss_curve"], other_order)
    # rank 0 alone measured the gate and wrote the report; the merged models score alike
    assert (folder / "report.md").is_file() and (folder / "heldout_scores.jsonl").is_file()
    assert two["metrics"]["pairwise_accuracy"] == pytest.approx(one["metrics"]["pairwise_accuracy"])
    assert two["metrics"]["mean_margin"] == pytest.approx(one["metrics"]["mean_margin"], rel=1e-2, abs=1e-3)
    assert ranks.stdout.count("[reward] gate") == 1, ranks.stdout
    report("reward", (one["metrics"]["loss_curve"], single_s), (two["metrics"]["loss_curve"], ranks_s),
           other_order)


@pytest.mark.slow
def test_offline_dpo_two_ranks_match_one_rank_on_the_same_global_batch(runs_root, cold_dry):
    """TRL's DPOTrainer under DDP, the reference log-probs precomputed on each rank's share (the
    stage's default); rank 0 alone samples and scores the held-out prompts and writes the folder."""
    parents = runs_root / cold_dry["run"]
    common = ["--mode", "offline", "--sft_dir", str(parents / "sft"), "--reward_dir", str(parents / "reward"),
              "--ranked_files", str(cold_dry["ranked"]), "--eval_file", str(cold_dry["prompts"]),
              "--max_steps", str(MAX_STEPS), "--logging_steps", "1",
              "--learning_rate", "0.008", "--beta", "0.1", "--loss_type", "sigmoid", "sft", "--warmup_steps", "0",
              "--seed", "7", "--generation_backend", "hf", "--precision", "fp32",
              "--eval_max_new_tokens", "8", "--eval_samples_per_prompt", "1", "--report_to", "none"]

    def curve(run: str) -> list:
        rows = (runs_root / run / "dpo" / "logs" / "steps.jsonl").read_text().splitlines()
        return [[row["step"], row["loss"]] for row in map(json.loads, rows) if "loss" in row]

    ranks, single_s, ranks_s = three_runs("dpo", common)

    one = finished_output(runs_root, "dist-dpo-1", "dpo")
    two = finished_output(runs_root, "dist-dpo-2", "dpo")
    folder = runs_root / "dist-dpo-2" / "dpo"
    assert one["world_size"] == 1 and one["effective_batch"] == GLOBAL_BATCH
    assert_two_ranks_ran(two, folder, "dpo")
    assert two["status"] == "complete" and two["metrics"]["train_steps"] == MAX_STEPS
    assert_same_curve("dpo", curve("dist-dpo-1"), curve("dist-dpo-2"), curve("dist-dpo-order"))
    # one held-out evaluation, from rank 0, of the same trained policy
    assert ranks.stdout.count("held-out prompts; reference =") == 1 and ranks.stdout.count("dpo vs sft:") == 1, ranks.stdout
    assert len((folder / "samples" / "eval_dpo.jsonl").read_text().splitlines()) == \
        len((runs_root / "dist-dpo-1" / "dpo" / "samples" / "eval_dpo.jsonl").read_text().splitlines())
    assert two["metrics"]["mean_reward_sft"] == pytest.approx(one["metrics"]["mean_reward_sft"])
    assert (folder / "adapter" / "adapter_config.json").is_file() and (folder / "model" / "README.md").is_file()
    report("dpo", (curve("dist-dpo-1"), single_s), (curve("dist-dpo-2"), ranks_s), curve("dist-dpo-order"))


@pytest.mark.slow
def test_on_policy_dpo_two_ranks_match_one_rank_on_the_same_pairs(runs_root, cold_dry):
    """2 on-policy rounds under torchrun: rank 0 samples and scores each round (seeded per round)
    and sends the pairs; both ranks train them under DDP; rank 0 pushes the weights into its
    engine. See the module docstring for why round 2 is compared sample by sample, and why fp32 and
    the DPO loss alone."""
    parents = runs_root / cold_dry["run"]
    common = ["--mode", "on_policy", "--sft_dir", str(parents / "sft"), "--reward_dir", str(parents / "reward"),
              "--ranked_files", str(cold_dry["ranked"]), "--eval_file", str(cold_dry["prompts"]),
              "--rounds", "2", "--prompts_per_round", "16", "--samples_per_prompt", "4", "--max_new_tokens", "8",
              "--truncated_answers", "keep", "--pair_selection", "best_vs_worst", "--min_reward_margin", "0.5",
              "--loss_type", "sigmoid", "--loss_weights", "1.0",
              "--dataloader_drop_last", "true", "--logging_steps", "1", "--kl_max_samples", "8",
              "--learning_rate", "0.008", "--beta", "0.1", "--warmup_steps", "0", "--seed", "7",
              "--generation_backend", "hf", "--precision", "fp32",
              "--eval_max_new_tokens", "8", "--eval_samples_per_prompt", "1", "--report_to", "none"]

    def curve(run: str, number: int) -> list:
        rows = (runs_root / run / "dpo" / "logs" / "steps.jsonl").read_text().splitlines()
        return [[row["step"], row["loss"]] for row in map(json.loads, rows) if "loss" in row and row["round"] == number]

    def round_file(run: str, number: int, kind: str) -> list:
        return (runs_root / run / "dpo" / "rounds" / f"round-{number}-{kind}.jsonl").read_text().splitlines()

    def same_samples(run: str) -> int:
        return sum(a == b for a, b in zip(round_file("dist-online-1", 2, "samples"), round_file(run, 2, "samples")))

    ranks, single_s, ranks_s = three_runs("dpo", common, name="online")

    one = finished_output(runs_root, "dist-online-1", "dpo")
    two = finished_output(runs_root, "dist-online-2", "dpo")
    folder = runs_root / "dist-online-2" / "dpo"
    assert one["world_size"] == 1 and one["effective_batch"] == GLOBAL_BATCH
    assert_two_ranks_ran(two, folder, "dpo")
    assert two["status"] == "complete" and [row["round"] for row in two["metrics"]["rounds"]] == [1, 2]
    # round 1: the same samples and pairs, the same loss curve, far closer than another data order
    for kind in ("samples", "pairs"):
        assert round_file("dist-online-2", 1, kind) == round_file("dist-online-1", 1, kind), kind
    single, double, shuffled = curve("dist-online-1", 1), curve("dist-online-2", 1), curve("dist-online-order", 1)
    assert [step for step, _ in single] == [step for step, _ in double] and len(single) >= 3, (single, double)
    two_ranks = max(abs(a - b) / abs(a) for (_, a), (_, b) in zip(single, double))
    assert two_ranks <= LOSS_TOLERANCE, f"1 rank {single}\n2 ranks {double}"
    other = max(abs(a - b) / abs(a) for (_, a), (_, b) in zip(single, shuffled))
    assert other > ORDER_MARGIN["dpo"] * max(two_ranks, 1e-6), (single, shuffled)
    # round 2 samples the pushed policy: nearly every sample the 1-rank run drew, more than another order's
    total = len(round_file("dist-online-1", 2, "samples"))
    assert same_samples("dist-online-2") >= 0.9 * total and same_samples("dist-online-2") > same_samples("dist-online-order")
    # one sampler: rank 0's round and held-out lines only
    assert ranks.stdout.count("[dpo] round 1/2:") == 1 and ranks.stdout.count("dpo vs sft:") == 1, ranks.stdout
    assert two["metrics"]["mean_reward_sft"] == pytest.approx(one["metrics"]["mean_reward_sft"])
    assert (folder / "adapter" / "adapter_config.json").is_file() and (folder / "model" / "README.md").is_file()
    report("dpo", (single, single_s), (double, ranks_s), shuffled)
    print(f"[dpo] round 2 samples equal to 1 rank's: 2 ranks {same_samples('dist-online-2')}/{total}, "
          f"other order {same_samples('dist-online-order')}/{total}")


@pytest.mark.slow
def test_rloo_two_ranks_match_one_rank_on_the_same_global_batch(runs_root, cold_dry):
    """TRL's RLOOTrainer under DDP: each step, rank 0 samples every rank's prompts in one call and
    scores every rank's completions (align/rloo.py, processes.on_main), so the 2-rank run samples the
    1-rank run's rollouts (the same seed per step, the same global batch order); TRL computes the
    leave-one-out baselines over the gathered rewards and DDP averages the two shares' gradients.
    fp32 and the hf backend, as for on-policy DPO; every completion is cut at 8 tokens, so TRL's
    token means are equal per rank. The curve compared is the gradient norm: with one gradient step
    per batch the ratio is 1 and the leave-one-out advantages of a group sum to 0, so the logged loss
    is ~1e-8, float noise. The control is a run with another seed (TRL's RLOO sampler ignores
    data_seed). Measured: gradient norms within 2.5e-6 relative, all 32 rollouts equal; another seed
    moves the norms by over 60%."""
    parents = runs_root / cold_dry["run"]
    common = ["--sft_dir", str(parents / "sft"), "--reward_dir", str(parents / "reward"),
              "--ranked_files", str(cold_dry["ranked"]), "--eval_file", str(cold_dry["prompts"]),
              "--max_steps", str(MAX_STEPS), "--gradient_accumulation_steps", "1", "--num_generations", "4",
              "--max_completion_length", "8",
              "--learning_rate", "0.003", "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "100",
              "--generation_backend", "hf", "--precision", "fp32",
              "--eval_max_new_tokens", "8", "--eval_samples_per_prompt", "1", "--report_to", "none"]

    def curve(run: str) -> list:  # the gradient norm: RLOO's logged loss is ~0 by construction (below)
        rows = (runs_root / run / "rloo" / "logs" / "steps.jsonl").read_text().splitlines()
        return [[row["step"], row["grad_norm"]] for row in map(json.loads, rows)]

    def rollouts(run: str) -> list:
        rows = (runs_root / run / "rloo" / "rollouts" / "rollouts.jsonl").read_text().splitlines()
        return [(row["step"], row["response"], row["reward"]) for row in map(json.loads, rows)]

    single, single_s = run_single("rloo", "--run", "dist-rloo-1", "--per_device_train_batch_size", "8", "--seed", "7",
                                  *common)
    assert_ok(single)
    other, _ = run_single("rloo", "--run", "dist-rloo-seed", "--per_device_train_batch_size", "8", "--seed", "8",
                          *common)
    assert_ok(other)
    ranks, ranks_s = run_ranks("rloo", 2, "--per_device_train_batch_size", "4", "--seed", "7", "--run",
                               "dist-rloo-2", *common)
    assert_ok(ranks)

    one = finished_output(runs_root, "dist-rloo-1", "rloo")
    two = finished_output(runs_root, "dist-rloo-2", "rloo")
    folder = runs_root / "dist-rloo-2" / "rloo"
    assert one["world_size"] == 1 and one["effective_batch"] == 8
    assert two["world_size"] == 2 and two["effective_batch"] == 8
    log = (folder / "logs" / "stage.log").read_text()
    assert "rank 0 pid" in log and "rank 1 pid" in log
    assert "[rloo] effective batch 8 = 4 per device x 1 accumulation x 2 processes" in log
    # every step's rollouts are the 1-rank run's, those sampled from the weights pushed after each step too
    assert rollouts("dist-rloo-2") == rollouts("dist-rloo-1") and len(rollouts("dist-rloo-1")) == MAX_STEPS * 8
    assert_same_curve("rloo", curve("dist-rloo-1"), curve("dist-rloo-2"), curve("dist-rloo-seed"))
    assert ranks.stdout.count("rloo vs sft:") == 1, ranks.stdout
    assert two["metrics"]["mean_reward_sft"] == pytest.approx(one["metrics"]["mean_reward_sft"])
    assert (folder / "adapter" / "adapter_config.json").is_file() and (folder / "model" / "README.md").is_file()
    report("rloo", (curve("dist-rloo-1"), single_s), (curve("dist-rloo-2"), ranks_s), curve("dist-rloo-seed"),
           batch=8, control="another seed")


@pytest.mark.slow
def test_ppo_two_ranks_match_one_rank_on_the_same_rollouts(runs_root, cold_dry):
    """Our PPO update under torchrun: rank 0 samples and scores each update's rollouts (seeded per
    update) and sends them to every rank; the no-grad forwards and each minibatch's forward and
    backward passes are split by rows, the gradients summed across ranks (align/processes.py), so
    both ranks step the weights a single process would. 2 updates x 8 rollouts, 2 epochs x 2
    minibatches of 4 (2 rows per rank): 8 steps. fp32 and the hf backend, as for on-policy DPO and
    RLOO. Update 1's rollouts are the 1-rank run's byte for byte; its first step's policy loss is
    the whitened advantages' mean, ~0, so the curves compared are the gradient norms of policy and
    critic at every step; update 2 samples the pushed policy and is compared sample by sample. The
    control is another seed (PPO's seed orders prompts and minibatches)."""
    parents = runs_root / cold_dry["run"]
    common = ["--sft_dir", str(parents / "sft"), "--reward_dir", str(parents / "reward"),
              "--ranked_files", str(cold_dry["ranked"]), "--eval_file", str(cold_dry["prompts"]),
              "--updates", "2", "--prompts_per_update", "8", "--samples_per_prompt", "1", "--max_new_tokens", "6",
              "--num_ppo_epochs", "2", "--num_mini_batches", "2", "--micro_batch_size", "4",
              "--forward_batch_size", "4", "--learning_rate", "0.003", "--critic_learning_rate", "0.003",
              "--push_check_prompts", "1", "--push_check_tokens", "4",
              "--generation_backend", "hf", "--precision", "fp32",
              "--eval_max_new_tokens", "8", "--eval_samples_per_prompt", "1", "--report_to", "none",
              # the settings these tolerances were tuned on: the policy trains at update 1, values clipped
              "--critic_warmup_updates", "0", "--cliprange_value", "0.2", "--critic_lam", "null"]

    def curve(run: str, key: str) -> list:
        rows = (runs_root / run / "ppo" / "logs" / "steps.jsonl").read_text().splitlines()
        return [row[key] for row in map(json.loads, rows)]

    def rollouts(run: str, number: int) -> list:
        return (runs_root / run / "ppo" / "rollouts" / f"update-{number}-samples.jsonl").read_text().splitlines()

    def largest(curve: list, other: list) -> float:
        assert len(curve) == len(other) == 8
        # relative, except where the 1-rank value is 0: the critic's last step can be, every value clipped
        return max(abs(a - b) / abs(a) if a else abs(b) for a, b in zip(curve, other))

    single, single_s = run_single("ppo", "--run", "dist-ppo-1", "--seed", "7", *common)
    assert_ok(single)
    other, _ = run_single("ppo", "--run", "dist-ppo-seed", "--seed", "8", *common)
    assert_ok(other)
    ranks, ranks_s = run_ranks("ppo", 2, "--seed", "7", "--run", "dist-ppo-2", *common)
    assert_ok(ranks)

    one = finished_output(runs_root, "dist-ppo-1", "ppo")
    two = finished_output(runs_root, "dist-ppo-2", "ppo")
    folder = runs_root / "dist-ppo-2" / "ppo"
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["effective_batch"] == two["effective_batch"] == 8 and two["minibatch_rollouts"] == 4
    log = (folder / "logs" / "stage.log").read_text()
    (line,) = [line for line in log.splitlines() if line.startswith("[ppo] 2 processes:")]
    assert "rank 0 pid" in line and "rank 1 pid" in line, line
    assert "[ppo] effective batch 8 rollouts per update, 2 minibatches of 4 = ~2 per process x 2 processes" in log
    assert rollouts("dist-ppo-2", 1) == rollouts("dist-ppo-1", 1) and len(rollouts("dist-ppo-1", 1)) == 8
    same = sum(a == b for a, b in zip(rollouts("dist-ppo-1", 2), rollouts("dist-ppo-2", 2)))
    assert same >= 7, same
    differences = {}
    for key in ("grad_norm/policy", "grad_norm/critic"):
        differences[key] = largest(curve("dist-ppo-1", key), curve("dist-ppo-2", key))
        assert differences[key] <= LOSS_TOLERANCE, (key, curve("dist-ppo-1", key), curve("dist-ppo-2", key))
        assert largest(curve("dist-ppo-1", key), curve("dist-ppo-seed", key)) > ORDER_MARGIN["ppo"] * max(
            differences[key], 1e-6), key
    assert ranks.stdout.count("[ppo] update 1/2:") == 1 and ranks.stdout.count("ppo vs sft:") == 1, ranks.stdout
    assert two["metrics"]["mean_reward_sft"] == pytest.approx(one["metrics"]["mean_reward_sft"])
    assert two["metrics"]["train_steps"] == 8
    assert (folder / "adapter" / "adapter_config.json").is_file() and (folder / "model" / "README.md").is_file()
    for key in ("grad_norm/policy", "grad_norm/critic"):
        print(f"\n[ppo] {key}: 1 rank {curve('dist-ppo-1', key)} ({single_s:.0f} s)\n[ppo] {key}: 2 ranks "
              f"{curve('dist-ppo-2', key)} ({ranks_s:.0f} s)\n[ppo] {key}: another seed {curve('dist-ppo-seed', key)}")
    print(f"[ppo] largest relative differences, 2 ranks vs 1: {differences}; update 2 rollouts equal: {same}/8")


@pytest.mark.parametrize("stage", ["candidates", "compare", "compare_human", "annotators"])
def test_single_process_tools_refuse_a_multi_process_launch(stage):
    """Started as rank 0 of 2 (what torchrun tells each process), they stop before parsing anything."""
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, timeout=300)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: stages.{stage} runs as a single process (") and "without torchrun" in line


@pytest.mark.parametrize("config", ["deepspeed_zero3", "fsdp2"])
def test_ppo_refuses_a_sharding_launch_in_one_line(config):
    """PPO trains outside accelerate: launched with a DeepSpeed or FSDP config (the variable that
    accelerate's own launch code sets), it stops before loading anything instead of not sharding."""
    launched = launch_environment(REPO / "configs" / "accelerate" / f"{config}.yaml", "-m", "stages.sft", "--run", "gpu")
    flags = {name: value for name, value in launched.items() if name.startswith("ACCELERATE_USE_")}
    assert "true" in flags.values(), flags
    result = subprocess.run([sys.executable, "-m", "stages.ppo"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **flags}, timeout=300)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "DeepSpeed/FSDP" in line and "torchrun" in line, line


def test_fit_to_hardware_sets_ddp_defaults_and_keeps_the_users(tmp_path):
    from trl import SFTConfig

    from align import processes, training

    fitted = training.fit_to_hardware(SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False), "fp32", tmp_path)
    assert fitted.ddp_find_unused_parameters is False and fitted.ddp_timeout == processes.DDP_TIMEOUT_S
    mine = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, ddp_find_unused_parameters=True,
                     ddp_timeout=600)
    fitted = training.fit_to_hardware(mine, "fp32", tmp_path)
    assert fitted.ddp_find_unused_parameters is True and fitted.ddp_timeout == 600


def test_processes_read_the_launchers_environment(monkeypatch):
    from align import processes

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert processes.current() == processes.Processes(0, 1, 0) and processes.current().is_main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert processes.current() == processes.Processes(3, 4, 1) and not processes.current().is_main


ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
EXPECTED_TYPES = {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED",
                  "fsdp2": "FSDP"}


def test_every_accelerate_config_is_tested():
    assert sorted(path.stem for path in ACCELERATE_CONFIGS) == sorted(EXPECTED_TYPES)


def launch_environment(config: Path, *argv: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file <config> ARGV` gives its processes, built by
    accelerate's own parser, validation and env preparation: `launch_command` up to the point where
    it would start them (the deepspeed branch sets the field list exactly as it does)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), *argv])
    args, defaults, _ = _validate_launch_command(args)
    assert args.module and args.training_script == "stages.sft" and args.training_script_args == ["--run", "gpu"]
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        command, environment = prepare_deepspeed_cmd_env(args)
        assert command is None  # one machine: torch elastic starts the ranks, no pdsh
        return environment
    assert args.multi_gpu or args.use_fsdp
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda path: path.stem)
def test_accelerate_config_parses_and_builds_a_launch_environment(config):
    """accelerate's own loader reads it (bf16), and its launch code builds the processes' environment.
    No GPU here: nothing is launched (README: what was tested where)."""
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert str(loaded.distributed_type).split(".")[-1] == EXPECTED_TYPES[config.stem]
    assert str(loaded.mixed_precision).split(".")[-1].lower() == "bf16" and loaded.num_processes == 8
    environment = launch_environment(config, "--num_processes", "2", "-m", "stages.sft", "--run", "gpu")
    assert environment["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if config.stem.startswith("deepspeed"):
        assert environment["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert environment["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == config.stem[-1]
    if config.stem == "fsdp2":
        assert environment["ACCELERATE_USE_FSDP"] == "true" and environment["FSDP_VERSION"] == "2"
