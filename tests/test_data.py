"""Data validation: every bad record is named by file:line: field."""

import json

import pytest

from align import data, files
from align.errors import DataError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD_CONVERSATION = {"id": "a", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]}


def test_good_files_load(tiny_data):
    assert len(data.load_conversations(tiny_data["sft"])) == 16
    prompts = data.load_prompts(tiny_data["prompts"])
    assert prompts[0]["prompt"][-1]["role"] == "user" and "reference" in prompts[0]
    ranked = data.load_ranked(tiny_data["ranked"])
    assert ranked[0]["source"].endswith(":1") and len(ranked[0]["responses"]) == 3


@pytest.mark.parametrize(
    "text, loader, expected",
    [
        ("", data.load_conversations, "file is empty"),
        ("\n\n", data.load_conversations, "file is empty"),
        (json.dumps(GOOD_CONVERSATION) + "\n{not json\n", data.load_conversations, ":2: not valid JSON"),
        ("[1, 2]\n", data.load_conversations, ":1: expected a JSON object"),
        ('{"id": "a"}\n', data.load_conversations, ":1: messages: must be a non-empty list"),
        ('{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n', data.load_conversations,
         ":1: messages: the last message must be from the assistant"),
        ('{"id": "a", "messages": [{"role": "bot", "content": "x"}]}\n', data.load_conversations,
         ":1: messages[0].role: must be one of"),
        ('{"id": "a", "messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}\n',
         data.load_conversations, ":1: messages[0].content: must be a non-empty string"),
        ('{"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}\n',
         data.load_conversations, ":1: messages[1].role: expected 'assistant'"),
        (json.dumps(GOOD_CONVERSATION) + "\n" + json.dumps(GOOD_CONVERSATION) + "\n", data.load_conversations,
         ":2: id: duplicate id 'a'"),
        ('{"prompt": [{"role": "user", "content": "x"}]}\n', data.load_prompts, ":1: prompt_id: missing"),
        ('{"prompt_id": "p", "prompt": [{"role": "user", "content": "x"}], "responses": [{"text": "a", "rank": 0}]}\n',
         data.load_ranked, ":1: responses[0].rank: must be an integer >= 1"),
        ('{"prompt_id": "p", "prompt": [{"role": "user", "content": "x"}], "responses": [{"rank": 1}]}\n',
         data.load_ranked, ":1: responses[0].text: must be a non-empty string"),
        ('{"prompt_id": "p", "prompt": [{"role": "user", "content": "x"}]}\n', data.load_ranked,
         ":1: responses: missing"),
    ],
)
def test_bad_records_name_file_line_field(tmp_path, text, loader, expected):
    path = write(tmp_path, "bad.jsonl", text)
    with pytest.raises(DataError) as caught:
        loader(path)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    assert expected in message, message


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        data.load_prompts(tmp_path / "nope.jsonl")


def test_completion_examples_split_every_assistant_turn():
    conversation = {"id": "x", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    examples = data.completion_examples([conversation])
    assert [e["completion"][0]["content"] for e in examples] == ["b", "d"]
    assert [m["content"] for m in examples[1]["prompt"]] == ["Be brief.", "a", "b", "c"]


def test_write_jsonl_roundtrip_is_atomic(tmp_path):
    target = tmp_path / "out" / "x.jsonl"
    assert files.write_jsonl(target, [{"a": 1}, {"b": "é"}]) == 2
    assert [json.loads(line) for line in target.read_text().splitlines()] == [{"a": 1}, {"b": "é"}]
    assert not list(target.parent.glob(".*tmp*"))
