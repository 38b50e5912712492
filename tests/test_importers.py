"""Preference data in the ecosystem's formats (align/data.py's one validation path): TRL's explicit
and implicit preference records, standard and conversational, HH-RLHF text, with a margin; JSON
Lines, JSON, Parquet and CSV files. Every bad record is named by file:location: field."""

from __future__ import annotations

import csv
import json

import pytest

from align import data, preferences
from align.errors import DataError

USER = {"role": "user", "content": "How long do I boil an egg?"}
GOOD = {"role": "assistant", "content": "Nine minutes for a firm yolk."}
BAD = {"role": "assistant", "content": "Eggs are great!"}
HH_CHOSEN = "\n\nHuman: How long do I boil an egg?\n\nAssistant: Nine minutes for a firm yolk."
HH_REJECTED = "\n\nHuman: How long do I boil an egg?\n\nAssistant: Eggs are great!"


def jsonl(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def only(records):
    (record,) = records
    return record


def assert_the_egg_pair(record, source):
    assert record["prompt"] == [USER]
    assert record["responses"] == [{"text": GOOD["content"], "rank": 1}, {"text": BAD["content"], "rank": 2}]
    assert record["source"] == source


@pytest.mark.parametrize("row", [
    {"prompt": USER["content"], "chosen": GOOD["content"], "rejected": BAD["content"]},  # standard, explicit
    {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},  # conversational, explicit
    {"chosen": [USER, GOOD], "rejected": [USER, BAD]},  # conversational, implicit prompt
    {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},  # HH-RLHF text
    {"prompt": "\n\nHuman: How long do I boil an egg?\n\nAssistant:", "chosen": " " + GOOD["content"],
     "rejected": " " + BAD["content"]},  # HH prompt column, TRL's explicit split of it
], ids=["standard", "conversational", "implicit", "hh-text", "hh-explicit"])
def test_every_preference_format_becomes_one_ranked_pair(tmp_path, row):
    path = jsonl(tmp_path, "pairs.jsonl", [{"source_dataset": "ignored column", **row}])
    record = only(data.load_ranked(path))
    assert_the_egg_pair(record, f"{path}:1")
    assert record["prompt_id"] == "pairs-1" and record["provenance"] == {"format": "preference pair"}
    pairs, report = preferences.ranked_to_pairs([record])
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [(GOOD["content"], BAD["content"], 1.0)]


def test_the_datasets_margin_replaces_the_rank_distance(tmp_path):
    path = jsonl(tmp_path, "m.jsonl", [
        {"prompt": "a?", "chosen": "yes", "rejected": "no", "margin": 2.5, "id": "row-7"},
        {"prompt": "a?", "chosen": "maybe", "rejected": "no"},  # the same prompt in an independent pair
    ])
    records = data.load_ranked(path)
    assert records[0]["margin"] == 2.5 and records[0]["provenance"]["id"] == "row-7"
    pairs, report = preferences.ranked_to_pairs(records)
    assert [p["margin"] for p in pairs] == [2.5, 1.0] and not report.bad
    # both pairs keep one prompt: the DPO/PPO/RLOO train prompts count it once
    assert preferences.train_prompts(records, [], [str(path)]) == [[{"role": "user", "content": "a?"}]]


def test_json_parquet_and_csv_read_the_same_pairs(tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD], "margin": 0.5}] * 2
    expected = data.load_ranked(jsonl(tmp_path, "p.jsonl", rows))
    (tmp_path / "p.json").write_text(json.dumps({"train": rows}))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "p.parquet")
    with open(tmp_path / "p.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({key: json.dumps(value) if isinstance(value, list) else value for key, value in row.items()}
                         for row in rows)
    for suffix, second in (("json", 2), ("parquet", 2), ("csv", 3)):  # CSV: line 3 (the header is line 1)
        records = data.load_ranked(tmp_path / f"p.{suffix}")
        assert [(r["prompt"], r["responses"], r["margin"]) for r in records] == \
               [(r["prompt"], r["responses"], r["margin"]) for r in expected]
        assert records[1]["source"] == f"{tmp_path / f'p.{suffix}'}:{second}"


@pytest.mark.parametrize("row, expected", [
    ({"chosen": "Nine minutes.", "rejected": "Eggs!"}, ":1: chosen: a plain string needs a prompt field beside it"),
    ({"prompt": "a?", "chosn": "yes", "rejected": "no"}, ":1: chosn: unknown field (did you mean 'chosen'?)"),
    ({"prompt": "a?", "rejected": "no"}, ":1: chosen: missing"),
    ({"prompt": "a?", "chosen": "yes", "rejected": "no", "margin": "big"}, ":1: margin: must be a number"),
    ({"prompt": "a?", "chosen": [GOOD, BAD], "rejected": "no"}, ":1: chosen: must be one assistant message"),
    ({"prompt": "a?", "chosen": [USER], "rejected": "no"}, ":1: chosen[0].role: must be 'assistant'"),
    ({"prompt": "a?", "completion": "yes", "label": True}, ":1: label: every answer of this prompt is desirable"),
    ({"prompt": "a?", "completion": "yes", "label": "maybe"}, ":1: label: must be true or false"),
    ({"question": "a?"}, ":1: question: unknown field"),
    ({"prompt_id": "p", "prompt": [USER]}, ":1: responses: missing (each record needs list of {text, rank} "
                                           "(or chosen and rejected: TRL's preference format))"),
])
def test_a_bad_pair_is_named_by_file_line_and_field(tmp_path, row, expected):
    """Refused on load (not a pair at all), or a bad ranking that bad_rankings: refuse refuses."""
    path = jsonl(tmp_path, "bad.jsonl", [row])
    with pytest.raises(DataError) as raised:
        records = data.load_ranked(path)
        assert records[0].get("problem"), f"no problem found in {records[0]}"
        preferences.ranked_to_pairs(records, bad_rankings="refuse")
    assert str(raised.value).startswith(f"{path}{expected}"), str(raised.value)


def test_malformed_hh_dialogues_are_skipped_and_listed_or_refused(tmp_path):
    """HH-RLHF holds a few dialogues whose final answer is empty or whose turns do not alternate:
    skipped and listed (bad_rankings: skip), or refused by file:line (refuse)."""
    empty_answer = {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello."}
    diverging = {"chosen": HH_CHOSEN, "rejected": "\n\nHuman: Something else\n\nAssistant: Eggs are great!"}
    path = jsonl(tmp_path, "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, empty_answer, diverging])
    records = data.load_ranked(path)
    pairs, report = preferences.ranked_to_pairs(records, bad_rankings="skip")
    expected = [f"{path}:2: chosen: the last message must be from the assistant",
                f"{path}:3: rejected: differs from chosen before the final assistant answer"]
    assert len(pairs) == 1 and len(report.bad) == 2
    assert all(str(bad).startswith(line) for bad, line in zip(report.bad, expected)), report.bad
    assert preferences.train_prompts(records, [], [str(path)]) == [[USER]]  # broken pairs train nothing
    with pytest.raises(DataError, match=r"hh.jsonl:2: chosen: the last message must be from the assistant"):
        preferences.ranked_to_pairs(records, bad_rankings="refuse")


def test_a_margin_in_the_ranked_format_needs_two_responses(tmp_path):
    three = {"prompt_id": "p", "prompt": [USER], "margin": 1.5,
             "responses": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}, {"text": "c", "rank": 3}]}
    with pytest.raises(DataError, match=r"r.jsonl:1: margin: only for a record of two responses, this one has 3"):
        data.load_ranked(jsonl(tmp_path, "r.jsonl", [three]))


@pytest.mark.parametrize("name, text, expected", [
    ("bad.json", '{"a": [1], "b": [2]}', "bad.json: expected a JSON list of records"),
    ("bad.json", "[1, 2]", "bad.json:1: expected an object"),
    ("bad.json", '[{"prompt": "a",}]', "bad.json:1: not valid JSON"),
    ("bad.parquet", "not parquet", "bad.parquet: not a readable Parquet file"),
    ("bad.csv", "prompt,chosen,rejected\na?,yes,no,extra\n", "bad.csv:2: 1 more cells than the header has columns"),
    ("bad.csv", 'prompt,chosen,rejected\n"[{""role"": ",yes,no\n', "bad.csv:2: prompt: starts like JSON but is not"),
    ("empty.csv", "prompt,chosen,rejected\n", "empty.csv: file is empty"),
])
def test_unreadable_files_are_named(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as raised:
        data.load_ranked(tmp_path / name)
    assert str(raised.value).startswith(str(tmp_path / expected)), str(raised.value)


def test_sft_reads_a_preference_datasets_prompt_and_chosen_answer(tmp_path):
    """The usual HH recipe: SFT on the chosen side. Malformed pairs are skipped and handed back."""
    path = jsonl(tmp_path, "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
                                        {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi"},
                                        {"prompt": "Salt?", "chosen": "A pinch.", "rejected": "A cup."}])
    skipped = []
    conversations = data.load_conversations(path, skipped)
    assert conversations == [{"id": "hh-1", "messages": [USER, GOOD]},
                             {"id": "hh-3", "messages": [{"role": "user", "content": "Salt?"},
                                                         {"role": "assistant", "content": "A pinch."}]}]
    assert [str(error) for error in skipped] == [f"{path}:2: chosen: the last message must be from the assistant"]
    with pytest.raises(DataError, match=r"hh.jsonl:2: chosen: the last message"):
        data.load_conversations(path)  # no list to hand them back in: refused
    only_bad = jsonl(tmp_path, "bad.jsonl", [{"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: chosen"):
        data.load_conversations(only_bad, [])


def test_a_saved_datasets_folder_is_read_like_a_file(tmp_path):
    """`make export-rankings` writes its pairs with save_to_disk; such a folder trains the next
    reward model as it is (a DatasetDict gives its train split), and its hash covers every file."""
    import datasets

    from align import files, runs

    rows = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}] * 3
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "splits"))
    assert len(data.load_ranked(tmp_path / "flat")) == 3
    records = data.load_ranked(tmp_path / "splits")
    assert len(records) == 2 and records[1]["source"] == f"{tmp_path / 'splits'}:2"
    assert_the_egg_pair(records[0], f"{tmp_path / 'splits'}:1")
    before = runs.data_inputs(tmp_path / "flat")[str(tmp_path / "flat")]
    assert before == files.sha256_path(tmp_path / "flat")
    (tmp_path / "flat" / "extra.txt").write_text("changed")
    assert files.sha256_path(tmp_path / "flat") != before
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: a folder, but not a saved `datasets` dataset"):
        data.load_ranked(tmp_path / "plain")


def test_a_hub_dataset_id_names_its_split_and_is_refused_offline(monkeypatch):
    from align import files

    assert files.hub_dataset_spec("hf:Anthropic/hh-rlhf") == ("Anthropic/hh-rlhf", "train")
    assert files.hub_dataset_spec("hf:trl-lib/ultrafeedback_binarized:test") == ("trl-lib/ultrafeedback_binarized", "test")
    with pytest.raises(DataError, match=r"hf:a/b/c: not a hub dataset id"):
        files.hub_dataset_spec("hf:a/b/c")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^hf:Anthropic/hh-rlhf: a hub dataset, but HF_HUB_OFFLINE=1"):
        data.load_ranked("hf:Anthropic/hh-rlhf")
    with pytest.raises(DataError, match=r"^hf:Anthropic/hh-rlhf: a hub dataset, but HF_HUB_OFFLINE=1"):
        data.load_conversations("hf:Anthropic/hh-rlhf", [])


def test_unpaired_kto_answers_become_one_ranking_per_prompt(tmp_path):
    """Desirable answers rank above undesirable ones of the same prompt; same-label answers tie."""
    path = jsonl(tmp_path, "kto.jsonl", [
        {"prompt": [USER], "completion": [GOOD], "label": True},
        {"prompt": "Salt?", "completion": "A pinch.", "label": True},
        {"prompt": [USER], "completion": [BAD], "label": False},
        {"prompt": [USER], "completion": "Ten seconds.", "label": False},
    ])
    records = data.load_ranked(path)
    egg = next(r for r in records if r["prompt"] == [USER])
    assert egg["source"] == f"{path}:1" and egg["responses"] == [
        {"text": GOOD["content"], "rank": 1}, {"text": BAD["content"], "rank": 2}, {"text": "Ten seconds.", "rank": 2}]
    pairs, report = preferences.ranked_to_pairs(records)  # ties: drop leaves the two undesirable ones unpaired
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [(GOOD["content"], BAD["content"]),
                                                                    (GOOD["content"], "Ten seconds.")]
    assert [str(bad).split(": ", 1)[1] for bad in report.bad] == [
        "label: every answer of this prompt is desirable: nothing to prefer it to"]


def test_held_out_pairs_are_read_as_prompts_with_the_chosen_answer_as_reference(tmp_path):
    """A preference dataset's test split is the held-out prompts of SFT's eval, DPO's verdict and
    make compare: each prompt once, its chosen answer the reference; malformed pairs handed back."""
    salt = {"prompt": "Salt?", "chosen": "A pinch.", "rejected": "A cup."}
    path = jsonl(tmp_path, "test.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
                                          {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi"},
                                          {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN + " Really."},  # same prompt
                                          salt])
    skipped = []
    prompts = data.load_prompts(path, skipped)
    assert prompts == [{"prompt_id": "test-1", "prompt": [USER], "reference": GOOD["content"]},
                       {"prompt_id": "test-4", "prompt": [{"role": "user", "content": "Salt?"}], "reference": "A pinch."}]
    assert [str(error) for error in skipped] == [f"{path}:2: chosen: the last message must be from the assistant"]
    with pytest.raises(DataError, match=r"test.jsonl:2: chosen: the last message"):
        data.load_prompts(path)  # no list to hand them back in: refused
    # align's own prompts format is read as before, and a pair field there is still refused
    own = jsonl(tmp_path, "own.jsonl", [{"prompt_id": "p", "prompt": [USER]}, {"prompt_id": "q", "prompt": [USER], "chosen": "x"}])
    with pytest.raises(DataError, match=r"own.jsonl:2: chosen: unknown field"):
        data.load_prompts(own)


def test_gzipped_json_lines_are_read_and_a_broken_gzip_is_named(tmp_path):
    """HH-RLHF ships train.jsonl.gz / test.jsonl.gz: read as they are."""
    import gzip

    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(f"{json.dumps({'chosen': HH_CHOSEN, 'rejected': HH_REJECTED})}\n".encode()))
    assert_the_egg_pair(only(data.load_ranked(path)), f"{path}:1")
    assert data.load_conversations(path) == [{"id": "train-1", "messages": [USER, GOOD]}]
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"chosen": "x"}\n' * 50)[:40])
    with pytest.raises(DataError, match=r"broken.jsonl.gz: not a readable gzip file .*gunzip -t"):
        data.load_ranked(broken)
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text('{"chosen": "x"}\n')
    with pytest.raises(DataError, match=r"plain.jsonl.gz: not a readable gzip file"):
        data.load_ranked(plain)


def test_a_column_mapping_reads_a_dataset_whose_columns_have_other_names(tmp_path, monkeypatch):
    """`file#field=column,...` (files and hub ids alike): the stages' one validation path reads
    `column` as `field`; the manifest's hash records the mapping with the file."""
    from align import runs

    rows = [{"question": "How long do I boil an egg?", "better": GOOD["content"], "worse": BAD["content"], "chosen": "x"}]
    path = jsonl(tmp_path, "renamed.jsonl", rows)
    spec = f"{path}#prompt=question,chosen=better,rejected=worse"
    assert_the_egg_pair(only(data.load_ranked(spec)), f"{spec}:1")
    assert only(data.load_ranked(spec))["prompt_id"] == "renamed-1"
    assert data.load_prompts(spec) == [{"prompt_id": "renamed-1", "prompt": [USER], "reference": GOOD["content"]}]
    hashes = runs.data_inputs(spec, path)
    assert hashes[spec] != hashes[str(path)] and hashes[spec].startswith(hashes[str(path)])
    with pytest.raises(DataError, match=r"renamed.jsonl#prompt=query,chosen=better:1: query: no such column "
                                        r"\(the mapping reads it as 'prompt'\) \(columns here: question, better, worse, chosen\)"):
        data.load_ranked(f"{path}#prompt=query,chosen=better")
    with pytest.raises(DataError, match=r"missing.jsonl: file not found"):
        runs.data_inputs(f"{tmp_path / 'missing.jsonl'}#chosen=better")
    with pytest.raises(DataError, match=r"names 'chosen' twice"):
        data.load_ranked(f"{path}#chosen=better,chosen=worse")
    # the hub form carries it too, refused offline in one line before any network call
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hf:owner/name:test: a hub dataset, but HF_HUB_OFFLINE=1"):
        data.load_ranked("hf:owner/name:test#chosen=response_a,rejected=response_b")
