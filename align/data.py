"""Data formats, loading and validation. data/README.md documents each format.

All files are JSON Lines, one object a line. Every record is checked on load; a
bad one raises `DataError` naming `file:line: field` and the problem, before
any training starts. A field a format does not have is refused too (with the
closest known name): a misspelt optional field would otherwise vanish silently.

- conversations (SFT):  {"id", "messages": [{"role", "content"}, ...]}  last turn: assistant
- prompts (eval):       {"prompt_id", "prompt": [messages ending with user], "reference"?: str}
- ranked (preferences): {"prompt_id", "prompt": [...], "responses": [{"text", "rank"}, ...],
                         "annotator"?: str, "provenance"?: {...}}   rank 1 = best, ties allowed
"""

from __future__ import annotations

import difflib
import json

from align.errors import DataError
from align.files import read_jsonl

ROLES = ("system", "user", "assistant")
CONVERSATION_FIELDS = ("id", "messages")
PROMPT_FIELDS = ("prompt_id", "prompt", "reference")
RANKED_FIELDS = ("prompt_id", "prompt", "responses", "annotator", "provenance")
RESPONSE_FIELDS = ("text", "rank")


def _reject_unknown(path, line, obj: dict, known: tuple[str, ...], prefix: str = "") -> None:
    """Refuse fields the format does not have: a misspelt optional one (`refrence`) would
    otherwise be dropped without a word."""
    for key in obj:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"the fields are {', '.join(known)}"
            raise DataError(path, line, f"{prefix}{key}", "unknown field", hint)


def _require(path, line, obj: dict, field: str, kind, what: str):
    if field not in obj:
        raise DataError(path, line, field, "missing", f"each record needs {what}")
    value = obj[field]
    if not isinstance(value, kind) or (isinstance(value, (str, list)) and not value):
        raise DataError(path, line, field, f"must be a non-empty {what}, got {json.dumps(value)[:60]}")
    return value


def check_messages(path, line, field: str, messages, last_role: str) -> list[dict]:
    """A conversation: optional system first, then user/assistant alternating, ending with `last_role`."""
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, field, "must be a non-empty list of {role, content} messages")
    expected = "user"
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise DataError(path, line, where, "must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(path, line, f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(path, line, f"{where}.content", "must be a non-empty string")
        if role == "system":
            if index != 0:
                raise DataError(path, line, f"{where}.role", "a system message may only come first")
            continue
        if role != expected:
            raise DataError(path, line, f"{where}.role", f"expected {expected!r} (turns alternate user/assistant)")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != last_role:
        raise DataError(path, line, field, f"the last message must be from the {last_role}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_conversations(path) -> list[dict]:
    """SFT data. Returns [{"id", "messages"}]."""
    records, seen = [], {}
    for line, obj in read_jsonl(path):
        _reject_unknown(path, line, obj, CONVERSATION_FIELDS)
        record_id = str(obj.get("id", f"line-{line}"))
        if record_id in seen:
            raise DataError(path, line, "id", f"duplicate id {record_id!r} (first on line {seen[record_id]})")
        seen[record_id] = line
        messages = check_messages(path, line, "messages", obj.get("messages"), last_role="assistant")
        records.append({"id": record_id, "messages": messages})
    return records


def load_prompts(path) -> list[dict]:
    """Evaluation prompts. Returns [{"prompt_id", "prompt", "reference"?}]."""
    records, seen = [], {}
    for line, obj in read_jsonl(path):
        _reject_unknown(path, line, obj, PROMPT_FIELDS)
        prompt_id = _require(path, line, obj, "prompt_id", str, "string id")
        if prompt_id in seen:
            raise DataError(path, line, "prompt_id", f"duplicate {prompt_id!r} (first on line {seen[prompt_id]})")
        seen[prompt_id] = line
        record = {"prompt_id": prompt_id, "prompt": check_messages(path, line, "prompt", obj.get("prompt"), "user")}
        if "reference" in obj:
            record["reference"] = _require(path, line, obj, "reference", str, "string")
        records.append(record)
    return records


def load_ranked(path) -> list[dict]:
    """Ranked responses, one record per (prompt, annotator). Structure only:
    whether a ranking is usable (ranks in range, not all tied) is judged by
    `align.preferences`, which reports and skips or refuses by config."""
    return [ranked_record(path, line, obj) for line, obj in read_jsonl(path)]


def ranked_record(path, line: int, obj: dict) -> dict:
    """One ranked record checked and normalised; `path:line` becomes its `source`.

    Also for records that never were a file line (an Argilla pull names the line of
    the rankings.jsonl it is saved to)."""
    _reject_unknown(path, line, obj, RANKED_FIELDS)
    prompt_id = _require(path, line, obj, "prompt_id", str, "string id")
    prompt = check_messages(path, line, "prompt", obj.get("prompt"), "user")
    responses = _require(path, line, obj, "responses", list, "list of {text, rank}")
    checked = []
    for index, response in enumerate(responses):
        where = f"responses[{index}]"
        if not isinstance(response, dict):
            raise DataError(path, line, where, "must be an object {text, rank}")
        _reject_unknown(path, line, response, RESPONSE_FIELDS, prefix=f"{where}.")
        text, rank = response.get("text"), response.get("rank")
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, line, f"{where}.text", "must be a non-empty string")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise DataError(path, line, f"{where}.rank", f"must be an integer >= 1 (1 = best), got {rank!r}")
        checked.append({"text": text, "rank": rank})
    annotator = obj.get("annotator", "unknown")
    if not isinstance(annotator, str):
        raise DataError(path, line, "annotator", "must be a string")
    record = {"prompt_id": prompt_id, "prompt": prompt, "responses": checked, "annotator": annotator,
              "source": f"{path}:{line}"}
    if "provenance" in obj:
        if not isinstance(obj["provenance"], dict):
            raise DataError(path, line, "provenance", "must be an object")
        record["provenance"] = obj["provenance"]
    return record


def completion_examples(conversations: list[dict]) -> list[dict]:
    """One prompt/completion example per assistant turn (TRL's conversational
    prompt-completion format), so the loss falls on assistant tokens only.

    SmolLM2's ChatML template has no `{% generation %}` markers and TRL cannot
    patch it for `assistant_only_loss`, so multi-turn conversations are split
    at each assistant turn instead: earlier turns become context."""
    examples = []
    for conversation in conversations:
        messages = conversation["messages"]
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                examples.append({"prompt": messages[:index], "completion": [message]})
    return examples


def reference_examples(prompts: list[dict], path) -> list[dict]:
    """Held-out prompts with reference answers (from the file `path`), as prompt-completion examples.

    Refuses a file in which no prompt has a reference: the held-out loss has nothing to measure."""
    examples = [
        {"prompt": record["prompt"], "completion": [{"role": "assistant", "content": record["reference"]}]}
        for record in prompts
        if "reference" in record
    ]
    if not examples:
        raise DataError(path, None, "reference", f"none of the {len(prompts)} prompts has one",
                        'SFT measures its held-out loss on reference answers: add "reference" to the prompts')
    return examples
