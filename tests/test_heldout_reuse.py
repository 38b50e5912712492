"""The held-out SFT samples are drawn once per SFT checkpoint and settings, and reused by every
later policy stage (align.online.HeldOut.sample_sft): what is reused must be exactly what was
drawn, and any change that could change the samples or their scores must draw anew.

Real parts: the tiny model through the real transformers generator, a real reward model
(the hand-built token counter of tests/fakes.py) through align.scoring."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from align import online, runs
from align.generation import SamplingSettings, create_generator
from align.scoring import RewardScorer
from tests.fakes import build_token_reward_model, rewarded_tokens

RECORDS = [{"prompt_id": f"p{index}", "prompt": [{"role": "user", "content": f"How do I store {food}?"}]}
           for index, food in enumerate(("rice", "eggs", "bread"))]


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_model_dir):
    from align.models import load_tokenizer

    folder = tmp_path_factory.mktemp("heldout-reuse")
    build_token_reward_model(tiny_model_dir, folder / "rm", rewarded_tokens(load_tokenizer(str(tiny_model_dir))))
    scorer = RewardScorer(folder / "rm")
    scorer.checkpoint = reward_checkpoint(folder, "r" * 64)  # what load_reward_checkpoint sets
    with create_generator(str(tiny_model_dir), "hf", "fp32", quiet=True) as generator:
        yield {"folder": folder, "generator": generator, "scorer": scorer}


def reward_checkpoint(folder, manifest_sha256: str) -> runs.Checkpoint:
    return runs.Checkpoint("reward", folder, {}, manifest_sha256)


def heldout(n: int = 2, penalty: float = 0.0, reuse: bool = True, records=RECORDS, max_new_tokens: int = 6,
            seed: int = 7) -> online.HeldOut:
    settings = SamplingSettings(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    return online.HeldOut(records, settings, truncation_penalty=penalty, reuse_sft=reuse, stage="test")


def sft_checkpoint(folder, manifest_sha256: str = "a" * 64) -> runs.Checkpoint:
    return runs.Checkpoint("sft", folder, {}, manifest_sha256)


def rows(sample_set) -> list:
    return [(dataclasses.asdict(sample), score, raw, house) for group, scores, raws, houses in
            zip(sample_set.samples, sample_set.scores, sample_set.model_scores, sample_set.styles)
            for sample, score, raw, house in zip(group, scores, raws, houses)]


def test_a_second_stage_reuses_exactly_what_the_first_drew(parts, tmp_path):
    generator, scorer, lines = parts["generator"], parts["scorer"], []
    first_heldout = heldout()
    first = first_heldout.sample_sft(generator, scorer, sft_checkpoint(tmp_path), lines.append)
    assert first_heldout.sft_source.startswith("drawn, stored in ") and not lines
    (stored,) = (tmp_path / online.HELDOUT_CACHE_DIR).glob("*.json")
    assert json.loads(stored.read_text())["drawn_by"] == "test"

    second_heldout = heldout()
    second = second_heldout.sample_sft(generator, scorer, sft_checkpoint(tmp_path), lines.append)
    assert second_heldout.sft_source == f"reused {stored}"
    assert len(lines) == 1 and "SFT samples reused from" in lines[0] and "reuse_sft: false" in lines[0]
    assert rows(second) == rows(first) and len(rows(first)) == 6 and second.prompts == first.prompts
    # The summary and the verdict's inputs agree too (what the manifest records).
    assert second.summary() == first.summary()
    # Served from the file, not drawn again with the same seeds: an edit of the file shows through.
    record = json.loads(stored.read_text())
    record["samples"][0][0]["text"], record["model_scores"][0][0] = "edited", 42.0
    stored.write_text(json.dumps(record))
    third = heldout().sample_sft(generator, scorer, sft_checkpoint(tmp_path), lines.append)
    assert third.samples[0][0].text == "edited" and third.model_scores[0][0] == 42.0


CHANGES = {  # name: (HeldOut keyword arguments, another SFT manifest, another reward manifest)
    "another SFT checkpoint (a rerun SFT stage)": ({}, "b" * 64, None),
    "another reward model": ({}, None, "s" * 64),
    "more samples per prompt": ({"n": 3}, None, None),
    "a longer answer cap": ({"max_new_tokens": 7}, None, None),
    "another held-out seed": ({"seed": 8}, None, None),
    "fewer held-out prompts (eval_limit)": ({"records": RECORDS[:2]}, None, None),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_whatever_changes_the_samples_or_their_scores_draws_anew(parts, tmp_path, change):
    generator, scorer = parts["generator"], parts["scorer"]
    heldout().sample_sft(generator, scorer, sft_checkpoint(tmp_path), print)
    kwargs, sft_sha, reward_sha = CHANGES[change]
    if reward_sha:
        scorer = copy.copy(scorer)
        scorer.checkpoint = reward_checkpoint(parts["folder"], reward_sha)
    other = heldout(**kwargs)
    other.sample_sft(generator, scorer, sft_checkpoint(tmp_path, sft_sha or "a" * 64), print)
    assert other.sft_source.startswith("drawn, stored in"), change
    assert len(list((tmp_path / online.HELDOUT_CACHE_DIR).glob("*.json"))) == 2
    again = heldout(**kwargs)  # and the changed setting, asked again, reuses its own
    again.sample_sft(generator, scorer, sft_checkpoint(tmp_path, sft_sha or "a" * 64), print)
    assert again.sft_source.startswith("reused"), change


def test_nothing_is_stored_where_the_key_cannot_be_trusted(parts, tmp_path):
    generator, scorer = parts["generator"], parts["scorer"]
    opted_out = heldout(reuse=False)
    opted_out.sample_sft(generator, scorer, sft_checkpoint(tmp_path), print)
    assert opted_out.sft_source == "drawn (reuse_sft: false)"
    unkeyed = copy.copy(scorer)
    unkeyed.checkpoint = None  # a scorer not loaded from a reward stage
    no_reward = heldout()
    no_reward.sample_sft(generator, unkeyed, sft_checkpoint(tmp_path), print)
    assert no_reward.sft_source == "drawn (no reward checkpoint to key on: not stored)"
    assert not (tmp_path / online.HELDOUT_CACHE_DIR).exists()


def test_the_cut_answer_rule_applies_to_reused_samples(parts, tmp_path):
    """Raw reward-model scores are stored, so a changed truncation_penalty still counts on reuse."""
    generator, scorer = parts["generator"], parts["scorer"]
    drawn = heldout(penalty=0.0).sample_sft(generator, scorer, sft_checkpoint(tmp_path), print)
    penalised = heldout(penalty=2.5)
    reused = penalised.sample_sft(generator, scorer, sft_checkpoint(tmp_path), print)
    assert penalised.sft_source.startswith("reused")
    cut = [(group_index, index) for group_index, group in enumerate(drawn.samples)
           for index, sample in enumerate(group) if sample.finish_reason == "length"]
    assert cut, "6 tokens is too short for the tiny model to stop: every answer should be cut"
    for group_index, index in cut:
        assert reused.scores[group_index][index] == pytest.approx(drawn.scores[group_index][index] - 2.5)


def test_an_unreadable_cache_file_is_named_and_drawn_anew(parts, tmp_path):
    generator, scorer, lines = parts["generator"], parts["scorer"], []
    heldout().sample_sft(generator, scorer, sft_checkpoint(tmp_path), print)
    (stored,) = (tmp_path / online.HELDOUT_CACHE_DIR).glob("*.json")
    stored.write_text('{"key": ')  # a crash mid-write cannot do this (atomic rename), a disk error can
    again = heldout()
    again.sample_sft(generator, scorer, sft_checkpoint(tmp_path), lines.append)
    assert again.sft_source.startswith("drawn, stored in")
    assert len(lines) == 1 and str(stored) in lines[0] and "drawing anew" in lines[0]
    assert json.loads(stored.read_text())["drawn_by"] == "test"  # replaced by a good one
