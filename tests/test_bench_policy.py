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


def test_a_gain_the_same_on_every_prompt_leaves_only_sampling_noise():
    """Every prompt gains exactly 1: the per-prompt differences do not vary, while each side's two
    samples (variance 2 per prompt) predict a variance of 2/2 + 2/2 from sampling alone."""
    rewards = {"sft": {"a": [0.0, 2.0], "b": [1.0, 3.0]}, "policy": {"a": [1.0, 3.0], "b": [2.0, 4.0]}}
    split = bench_policy.noise_split(rewards)
    assert split == pytest.approx({"variance": 0.0, "noise": 2.0, "samples": 2})


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
