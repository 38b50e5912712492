"""Rankings -> pairs: orientation, ties, several annotators, bad rankings, duplicates, split by prompt."""

from __future__ import annotations

import json

import pytest

from align import data
from align.errors import ConfigError, DataError
from align.preferences import prompt_key, ranked_to_pairs, split_by_prompt


def prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def record(prompt_id: str, ranks: dict[str, int], annotator: str = "ann", text: str | None = None) -> dict:
    return {"prompt_id": prompt_id, "prompt": prompt(text or f"question {prompt_id}"),
            "responses": [{"text": t, "rank": r} for t, r in ranks.items()], "annotator": annotator}


def load(tmp_path, records: list[dict], name: str = "ranked.jsonl") -> list[dict]:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data.load_ranked(path)


def as_tuples(pairs) -> set[tuple]:
    return {(p["prompt_id"], p["chosen"], p["rejected"], p["margin"], p["tie"]) for p in pairs}


def test_every_ordered_pair_whose_ranks_differ(tmp_path):
    pairs, report = ranked_to_pairs(load(tmp_path, [record("p1", {"a": 2, "b": 1, "c": 3})]))
    assert as_tuples(pairs) == {("p1", "b", "a", 1.0, False), ("p1", "b", "c", 2.0, False),
                                ("p1", "a", "c", 1.0, False)}
    assert pairs[0]["prompt"] == prompt("question p1")
    assert report.pairs == 3 and report.prompts == 1 and report.bad == []


def test_ties_dropped_or_soft(tmp_path):
    records = load(tmp_path, [record("p1", {"a": 1, "b": 1, "c": 2})])
    dropped, report = ranked_to_pairs(records, ties="drop")
    assert as_tuples(dropped) == {("p1", "a", "c", 1.0, False), ("p1", "b", "c", 1.0, False)}
    assert report.ties_dropped == 1

    soft, report = ranked_to_pairs(records, ties="soft")
    # the tie appears in both orders with margin 0: a 0.5 soft label under the Bradley-Terry loss
    assert as_tuples(soft) == {("p1", "a", "c", 1.0, False), ("p1", "b", "c", 1.0, False),
                               ("p1", "a", "b", 0.0, True), ("p1", "b", "a", 0.0, True)}
    assert report.tie_pairs == 2 and report.ties_dropped == 0


def test_several_annotators_mean_rank_and_agreement(tmp_path):
    records = load(tmp_path, [
        record("p1", {"x": 1, "y": 2, "z": 3}, annotator="ann-a"),
        record("p1", {"x": 2, "y": 1, "z": 3}, annotator="ann-b"),
        record("p2", {"u": 1, "v": 2}, annotator="ann-a"),
    ])
    pairs, report = ranked_to_pairs(records, aggregation="mean_rank")
    # x and y both have mean rank 1.5: a tie, dropped; both beat z (mean 3) by 1.5
    assert as_tuples(pairs) == {("p1", "x", "z", 1.5, False), ("p1", "y", "z", 1.5, False),
                                ("p2", "u", "v", 1.0, False)}
    assert report.annotators == 2
    assert report.annotators_per_prompt == {2: 1, 1: 1}
    # (x,y): the annotators disagree; (x,z) and (y,z): they agree -> 2 of 3
    assert report.agreement_comparisons == 3
    assert report.agreement_rate == pytest.approx(2 / 3)


def test_several_annotators_majority(tmp_path):
    records = load(tmp_path, [
        record("p1", {"x": 1, "y": 2}, annotator="a"),
        record("p1", {"x": 1, "y": 2}, annotator="b"),
        record("p1", {"x": 2, "y": 1}, annotator="c"),
    ])
    pairs, report = ranked_to_pairs(records, aggregation="majority")
    assert [(p["chosen"], p["rejected"], p["tie"]) for p in pairs] == [("x", "y", False)]
    assert pairs[0]["margin"] == pytest.approx(1 / 3)  # (2 votes for - 1 against) / 3 annotators
    assert report.agreement_comparisons == 3 and report.agreement_rate == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("ranks", "field", "problem"),
    [
        ({"a": 1, "b": 4, "c": 2}, "responses[1].rank", "rank 4 is out of range: 3 responses"),
        ({"a": 2, "b": 2, "c": 2}, "responses", "all 3 ranks are equal"),
        ({"a": 1}, "responses", "1 distinct response(s): nothing to compare"),
    ],
)
def test_bad_ranking_reported_with_file_and_line_then_skipped_or_refused(tmp_path, ranks, field, problem):
    records = load(tmp_path, [record("good", {"a": 1, "b": 2}), record("bad", ranks)])
    pairs, report = ranked_to_pairs(records, bad_rankings="skip")
    assert {p["prompt_id"] for p in pairs} == {"good"}  # never silently used
    assert len(report.bad) == 1
    bad = report.bad[0]
    assert bad.source == f"{tmp_path / 'ranked.jsonl'}:2" and bad.field == field and problem in bad.problem

    with pytest.raises(DataError) as refused:
        ranked_to_pairs(records, bad_rankings="refuse")
    assert str(refused.value).startswith(f"{tmp_path / 'ranked.jsonl'}:2: {field}: ")
    assert "bad_rankings: skip" in str(refused.value)


def test_missing_response_for_one_annotator_is_bad(tmp_path):
    records = load(tmp_path, [
        record("p1", {"x": 1, "y": 2, "z": 3}, annotator="a"),
        record("p1", {"x": 1, "y": 2, "z": 3}, annotator="b"),
        record("p1", {"x": 2, "y": 1}, annotator="c"),  # z missing
    ])
    pairs, report = ranked_to_pairs(records)
    assert [(b.source.rsplit(":", 1)[1], b.field) for b in report.bad] == [("3", "responses")]
    assert "1 response(s) missing" in report.bad[0].problem
    assert len(pairs) == 3 and report.records_used == 2  # c's ranking is left out entirely


def test_conflicting_texts_and_prompts_are_bad(tmp_path):
    records = load(tmp_path, [
        {"prompt_id": "p1", "prompt": prompt("q"), "annotator": "a",
         "responses": [{"text": "x", "rank": 1}, {"text": "y", "rank": 2}, {"text": "x", "rank": 3}]},
        record("p2", {"u": 1, "v": 2}, annotator="a", text="first prompt"),
        record("p2", {"u": 1, "v": 2}, annotator="b", text="another prompt"),
        record("p3", {"s": 1, "t": 2}, annotator="a"),
        record("p3", {"s": 2, "t": 1}, annotator="a"),  # same annotator, different answer
    ])
    _, report = ranked_to_pairs(records)
    lines = {b.source.rsplit(":", 1)[1]: b for b in report.bad}
    assert set(lines) == {"1", "3", "5"}
    assert lines["1"].field == "responses[2].text" and "rank 3 vs 1" in lines["1"].problem
    assert lines["3"].field == "prompt" and "different prompt" in lines["3"].problem
    assert lines["5"].field == "annotator" and "differently" in lines["5"].problem


def test_duplicates_dropped(tmp_path):
    one = record("p1", {"a": 1, "b": 2, "c": 3})
    same_prompt_other_id = record("p9", {"a": 1, "b": 2}, text="question p1")
    with_repeat = {**record("p2", {"u": 1, "v": 2}), "responses": [
        {"text": "u", "rank": 1}, {"text": "v", "rank": 2}, {"text": "u", "rank": 1}]}
    records = load(tmp_path, [one, one]) + load(tmp_path, [same_prompt_other_id, with_repeat], "second.jsonl")
    pairs, report = ranked_to_pairs(records)
    # one repeated record + one repeated response + the (a, b) pair already given under p1
    assert report.duplicates_dropped == 3 and report.bad == []
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("a", "b"), ("a", "c"), ("b", "c"), ("u", "v")]


def test_options_checked():
    with pytest.raises(ConfigError, match="ties"):
        ranked_to_pairs([], ties="half")
    with pytest.raises(ConfigError, match="aggregation"):
        ranked_to_pairs([], aggregation="median")


def many_pairs(prompts: int = 40) -> list[dict]:
    records = [record(f"p{i}", {f"good {i}": 1, f"ok {i}": 2, f"bad {i}": 3}) for i in range(prompts)]
    records += [{**record("copy", {"good 0": 1, "other": 2}, text="question p0"), "source": "x:1"}]
    for number, r in enumerate(records):
        r.setdefault("source", f"mem:{number}")
    pairs, _ = ranked_to_pairs(records)
    return pairs


def test_split_by_prompt_never_by_pair():
    pairs = many_pairs()
    train, heldout = split_by_prompt(pairs, 0.25, seed=3)
    assert len(train) + len(heldout) == len(pairs)
    train_keys = {prompt_key(p["prompt"]) for p in train}
    heldout_keys = {prompt_key(p["prompt"]) for p in heldout}
    assert not train_keys & heldout_keys  # no prompt leaks, also not the one listed under two ids
    assert len(heldout_keys) == 10  # round(0.25 * 40 distinct prompts)
    # every pair of a held-out prompt is held out
    assert sum(1 for p in pairs if prompt_key(p["prompt"]) in heldout_keys) == len(heldout)


def test_split_is_deterministic_and_independent_of_order():
    pairs = many_pairs()
    first = split_by_prompt(pairs, 0.2, seed=7)
    again = split_by_prompt(list(reversed(pairs)), 0.2, seed=7)
    assert {p["prompt_id"] for p in first[1]} == {p["prompt_id"] for p in again[1]}
    other_seed = split_by_prompt(pairs, 0.2, seed=8)
    assert {p["prompt_id"] for p in first[1]} != {p["prompt_id"] for p in other_seed[1]}
    with pytest.raises(ConfigError, match="heldout_fraction"):
        split_by_prompt(pairs, 1.0, seed=0)
