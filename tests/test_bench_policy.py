"""bench/bench_policy.py's pooled gain and noise split: arithmetic on hand-made held-out rewards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_policy  # noqa: E402


def write_samples(folder: Path, name: str, rewards: dict[str, list[float]]) -> None:
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    rows = [{"prompt_id": prompt, "response": "x", "reward": r} for prompt, values in rewards.items() for r in values]
    (folder / "samples" / f"eval_{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_held_out_rewards_are_read_per_prompt_from_the_stage_samples(tmp_path):
    write_samples(tmp_path, "sft", {"a": [0.0, 2.0], "b": [1.0, 3.0]})
    write_samples(tmp_path, "ppo", {"a": [1.0, 3.0], "b": [2.0, 4.0]})
    rewards = bench_policy.heldout_rewards(tmp_path, "ppo")
    assert rewards == {"sft": {"a": [0.0, 2.0], "b": [1.0, 3.0]}, "policy": {"a": [1.0, 3.0], "b": [2.0, 4.0]}}


def test_sampling_noise_is_the_spread_of_differences_between_samples_paired_by_index():
    """Sample j of both models shares a seed, so the noise is var_j(policy_j - SFT_j) / n: here the
    differences are +3 and 0 on each prompt (variance 4.5, over 2 samples: 2.25), while the per-prompt
    mean differences (+1.5 on both prompts) do not vary at all. Unpaired, the two sides' own spreads
    (2 and 0.5) would predict 2/2 + 0.5/2 = 1.25."""
    rewards = {"sft": {"a": [0.0, 2.0], "b": [1.0, 3.0]}, "policy": {"a": [3.0, 2.0], "b": [4.0, 3.0]}}
    assert bench_policy.noise_split(rewards) == pytest.approx({"variance": 0.0, "noise": 2.25, "samples": 2})


def test_a_policy_that_moves_every_paired_sample_alike_has_no_sampling_noise():
    """Each policy sample is its SFT twin plus 1: the pairing cancels the samples' own spread
    (variance 2 per prompt on each side, which unpaired samples would count as 2/2 + 2/2)."""
    rewards = {"sft": {"a": [0.0, 2.0], "b": [1.0, 3.0]}, "policy": {"a": [1.0, 3.0], "b": [2.0, 4.0]}}
    assert bench_policy.noise_split(rewards) == pytest.approx({"variance": 0.0, "noise": 0.0, "samples": 2})


def test_too_few_samples_or_prompts_give_no_split_instead_of_a_crash():
    assert bench_policy.noise_split({"sft": {"a": [0.0], "b": [1.0]}, "policy": {"a": [1.0], "b": [2.0]}}) is None
    assert bench_policy.noise_split({"sft": {"a": [0.0, 1.0]}, "policy": {"a": [1.0, 2.0]}}) is None
    one_sample = [{"rewards": {"sft": {"a": [0.0], "b": [1.0]}, "policy": {"a": [1.0], "b": [2.0]}}}] * 2
    assert bench_policy.pooled(one_sample).endswith("too few samples or prompts for the noise split")


def test_a_gain_that_differs_between_prompts_varies_beyond_the_noise():
    rewards = {"sft": {"a": [0.0, 0.0], "b": [0.0, 0.0], "c": [0.0, 0.0]},
               "policy": {"a": [-1.0, -1.0], "b": [0.0, 0.0], "c": [4.0, 4.0]}}
    split = bench_policy.noise_split(rewards)
    assert split["noise"] == 0.0 and split["variance"] == pytest.approx(7.0)  # differences -1, 0, 4


def test_seeds_pool_per_prompt_and_a_shared_sft_sample_set_is_named():
    sft = {"a": [0.0, 2.0], "b": [1.0, 3.0]}
    seeds = [{"rewards": {"sft": sft, "policy": {"a": [1.0, 3.0], "b": [2.0, 4.0]}}},
             {"rewards": {"sft": sft, "policy": {"a": [2.0, 4.0], "b": [3.0, 5.0]}}}]
    line = bench_policy.pooled(seeds)
    assert line.startswith("pooled over 2 seeds: +1.500 [+1.50, +1.50] on 2 prompts")
    assert "SFT samples the same in every seed" in line
    seeds[1]["rewards"] = {"sft": {"a": [0.0, 0.0], "b": [1.0, 1.0]}, "policy": seeds[1]["rewards"]["policy"]}
    assert "SFT samples the same" not in bench_policy.pooled(seeds)
    assert bench_policy.pooled(seeds[:1]).startswith("per seed, the per-prompt differences vary 0.00")
    assert bench_policy.pooled([{"arm": "x"}]) == ""  # --judge compare rows carry no samples
