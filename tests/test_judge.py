"""The LLM judge's pure parts (align/judge.py): parsing, both-orders combination, its numbers.
The judge against a real vLLM server is in tests/test_compare.py."""

from __future__ import annotations

import pytest

from align import evaluation, judge
from align.errors import ConfigError


@pytest.mark.parametrize("text, verdict", [
    ("A", "A"), (" b.", "B"), ("Tie", "tie"), ("**A**: it is shorter", "A"), ("tie - both fine", "tie"),
    ("Answer A", None), ("AB", None), ("", None), ("neither", None),
])
def test_the_first_word_is_the_verdict(text, verdict):
    assert judge.parse_verdict(text) == verdict


@pytest.mark.parametrize("first, second, combined", [
    ("B", "A", "aligned"),     # aligned chosen in both positions
    ("A", "B", "baseline"),    # baseline chosen in both positions
    ("A", "A", "tie"),         # always the first answer: position bias cancels
    ("B", "B", "tie"),         # always the second answer
    ("tie", "tie", "tie"),
    ("B", "tie", "tie"),
    ("A", None, None),         # unreadable: not counted
])
def test_a_pair_is_won_only_when_both_orders_agree(first, second, combined):
    assert judge.combine(first, second) == combined


def test_summary_counts_rates_consistency_and_agreement():
    rows = [("B", "A", "aligned")] * 6 + [("A", "B", "baseline"), ("A", "B", "aligned")] + [("A", "A", "aligned")] * 2 \
        + [("tie", "tie", "tie")] + [(None, "A", "aligned")]
    pairs = [{"first": f, "second": s, "verdict": judge.combine(f, s), "reward_model": rm} for f, s, rm in rows]
    summary = judge.judge_summary(pairs)
    assert (summary["pairs"], summary["unreadable"]) == (12, 1)
    assert (summary["wins"], summary["losses"], summary["ties"]) == (6, 2, 3)
    assert summary["rate"] == pytest.approx(6 / 8)
    assert (summary["low"], summary["high"]) == pytest.approx(evaluation.wilson_interval(6, 8, 0.95))
    assert summary["position_consistency"] == pytest.approx(9 / 11)  # the two position-bound pairs are not
    # decided by the judge (8 pairs; the reward model decided each): 7 pick the same answer, one does not
    assert summary["agreement_pairs"] == 8 and summary["reward_model_agreement"] == pytest.approx(7 / 8)


def test_pairs_match_sample_i_of_each_model_with_the_reward_models_pick():
    def row(model, prompt_id, sample, reward):
        return {"model": model, "prompt_id": prompt_id, "sample": sample, "prompt": [{"role": "user", "content": prompt_id}],
                "text": f"{model}-{prompt_id}-{sample}", "reward": reward}

    rows = [row("sft", "p", 0, 0.1), row("sft", "p", 1, 0.5), row("dpo", "p", 0, 0.9), row("dpo", "p", 1, 0.5),
            row("sft", "q", 0, 0.0)]  # q has no dpo answer: no pair
    pairs = judge.pairs_to_judge(rows, "sft", "dpo")
    assert [(p["prompt_id"], p["sample"], p["baseline"], p["aligned"], p["reward_model"]) for p in pairs] == [
        ("p", 0, "sft-p-0", "dpo-p-0", "aligned"), ("p", 1, "sft-p-1", "dpo-p-1", "tie")]


def test_a_judge_prompt_file_must_hold_every_placeholder(tmp_path):
    path = tmp_path / "judge.txt"
    path.write_text("Compare {answer_a} with {answer_b}.")
    with pytest.raises(ConfigError, match=r"judge_prompt_file: .*judge.txt lacks \{conversation\}"):
        judge.JudgeArgs(judge_prompt_file=str(path)).template()
    with pytest.raises(ConfigError, match=r"judge_prompt_file: .*missing.txt: No such file"):
        judge.JudgeArgs(judge_prompt_file=str(tmp_path / "missing.txt")).template()
    assert "{answer_b}" in judge.JudgeArgs().template()
