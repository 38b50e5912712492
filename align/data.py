"""Data formats, loading and validation. data/README.md documents each format.

All files are JSON Lines, one object a line. Every record is checked on load; a
bad one raises `DataError` naming `file:line: field` and the problem, before
any training starts. A field a format does not have is refused too (with the
closest known name): a misspelt optional field would otherwise vanish silently.

- conversations (SFT):  {"id", "messages": [{"role", "content"}, ...]}  last turn: assistant
                        (or preference pairs, below: the prompt and the chosen answer)
- prompts (eval):       {"prompt_id", "prompt": [messages ending with user], "reference"?: str}
                        (or preference pairs: each prompt once, the chosen answer its reference)
- ranked (preferences): {"prompt_id", "prompt": [...], "responses": [{"text", "rank"}, ...],
                         "annotator"?: str, "margin"?: number, "provenance"?: {...}}   rank 1 = best, ties allowed

Preferences also come in the formats the ecosystem uses (`load_ranked` tells them apart per
record and turns each into a ranked record of two responses, chosen rank 1):
- TRL's preference format, explicit prompt: {"prompt", "chosen", "rejected", "margin"?}, each a
  string (standard) or messages (conversational: the prompt's ending with the user, the answers
  one assistant message each);
- TRL's implicit prompt: {"chosen", "rejected"} as two conversations that share every turn but
  the final assistant answer;
- HH-RLHF text: "\n\nHuman: ...\n\nAssistant: ..." dialogues, as the implicit prompt or in `prompt`;
- TRL's unpaired (KTO) format: {"prompt", "completion", "label": bool}, grouped per prompt,
  desirable answers ranked above undesirable ones.
Columns beyond these are ignored (datasets carry many); a near-miss of a known one is refused.
Files may be JSON Lines, JSON, Parquet or CSV (`align.files.read_records`).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path

from align.errors import DataError
from align.files import read_jsonl, read_records, split_column_mapping

ROLES = ("system", "user", "assistant")
CONVERSATION_FIELDS = ("id", "messages")
PROMPT_FIELDS = ("prompt_id", "prompt", "reference")
RANKED_FIELDS = ("prompt_id", "prompt", "responses", "annotator", "margin", "provenance")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "margin", "prompt_id", "id", "annotator")
HH_TURN = re.compile(r"(?:\A|\n\n)(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
RESPONSE_FIELDS = ("text", "rank")


def _dataset_name(path) -> str:
    """`train` for train.jsonl and train.jsonl.gz alike: the stem of a record's generated id."""
    name = Path(str(split_column_mapping(path)[0]))
    return Path(name.stem).stem if name.suffix.lower() == ".gz" else name.stem


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
        also = " (or chosen and rejected: TRL's preference format)" if field == "responses" else ""
        raise DataError(path, line, field, "missing", f"each record needs {what}{also}")
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


def load_conversations(path, skipped: list | None = None) -> list[dict]:
    """SFT data. Returns [{"id", "messages"}].

    Preference pairs (TRL's or HH-RLHF's formats, any file `read_records` reads) are read too,
    as the prompt followed by the chosen answer: the usual recipe of SFT on a preference
    dataset's chosen side. A malformed pair is appended to `skipped` (a DataError) when a list
    is given, else raised."""
    records, seen = [], {}
    for line, obj in read_records(path):
        if "messages" not in obj and ("chosen" in obj or "rejected" in obj):
            pair = _pair_or_skip(path, line, obj, skipped)
            if pair is None:
                continue
            answer = {"role": "assistant", "content": pair["responses"][0]["text"]}
            records.append({"id": pair["prompt_id"], "messages": [*pair["prompt"], answer]})
            continue
        _reject_unknown(path, line, obj, CONVERSATION_FIELDS)
        record_id = str(obj.get("id", f"line-{line}"))
        if record_id in seen:
            raise DataError(path, line, "id", f"duplicate id {record_id!r} (first on line {seen[record_id]})")
        seen[record_id] = line
        messages = check_messages(path, line, "messages", obj.get("messages"), last_role="assistant")
        records.append({"id": record_id, "messages": messages})
    if not records and skipped:  # every pair malformed: nothing to train on, name the first
        raise skipped[0]
    return records


def load_prompts(path, skipped: list | None = None) -> list[dict]:
    """Evaluation prompts. Returns [{"prompt_id", "prompt", "reference"?}].

    A preference dataset (TRL's or HH-RLHF's formats, any file `read_records` reads) is read too:
    each pair's prompt, with its chosen answer as the reference, so held-out pairs are held-out
    prompts. A prompt repeated across pairs is read once (its first pair). A malformed pair is
    appended to `skipped` (a DataError) when a list is given, else raised."""
    rows = read_records(path)
    if "chosen" in rows[0][1] or "rejected" in rows[0][1]:
        return _prompts_of_pairs(path, rows, skipped)
    records, seen = [], {}
    for line, obj in rows:
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


def _pair_or_skip(path, location: int, obj: dict, skipped: list | None) -> dict | None:
    """The pair as a ranked record; a malformed one is appended to `skipped` (None back), or
    raised when there is no list to hand it back in."""
    try:
        return preference_record(path, location, obj)
    except DataError as error:
        if skipped is None:
            raise
        skipped.append(error)
        return None


def _prompts_of_pairs(path, rows: list[tuple[int, dict]], skipped: list | None) -> list[dict]:
    records, seen = [], set()
    for location, obj in rows:
        pair = _pair_or_skip(path, location, obj, skipped)
        if pair is None:
            continue
        key = json.dumps(pair["prompt"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        records.append({"prompt_id": pair["prompt_id"], "prompt": pair["prompt"],
                        "reference": pair["responses"][0]["text"]})
    if not records and skipped:  # every pair malformed: name the first
        raise skipped[0]
    return records


def load_ranked(path) -> list[dict]:
    """Ranked responses, one record per (prompt, annotator), from align's ranked format or TRL's /
    HH-RLHF's preference pairs (module docstring), in any file `read_records` reads. Structure
    only: whether a ranking is usable (ranks in range, not all tied) is judged by
    `align.preferences`, which reports and skips or refuses by config."""
    records, unpaired = [], []
    for location, obj in read_records(path):
        if "responses" in obj:
            records.append(ranked_record(path, location, obj))
        elif "chosen" in obj or "rejected" in obj:
            try:
                records.append(preference_record(path, location, obj))
            except DataError as error:  # real datasets hold a few: a bad ranking, skipped or refused by config
                records.append(broken_pair(path, location, error))
        elif "completion" in obj and "label" in obj:
            unpaired.append((location, obj))
        else:  # align's ranked format says what is missing
            records.append(ranked_record(path, location, obj))
    return records + unpaired_to_ranked(path, unpaired)


def unpaired_to_ranked(path, rows: list[tuple[int, dict]]) -> list[dict]:
    """TRL's unpaired (KTO) records, {"prompt", "completion", "label": bool}, as one ranked record per
    prompt: every desirable answer rank 1, every undesirable one rank 2 (so each desirable answer is
    preferred to each undesirable one; answers with the same label tie). A prompt with answers of one
    label only has nothing to compare: a bad ranking, skipped or refused like any other."""
    groups: dict[str, dict] = {}
    for location, obj in rows:
        source = f"{path}:{location}"
        try:
            _reject_near_misses(path, location, obj, ("prompt", "completion", "label"))
            prompt = check_messages(path, location, "prompt", _prompt_messages(obj.get("prompt")), "user")
            text = _answer(path, location, "completion", obj["completion"])
            label = obj["label"]
            if isinstance(label, str) and label.lower() in ("true", "false"):  # CSV cells are strings
                label = label.lower() == "true"
            if not isinstance(label, bool):
                raise DataError(path, location, "label", f"must be true or false, got {json.dumps(label)[:40]}")
        except DataError as error:
            groups[source] = broken_pair(path, location, error)
            continue
        key = json.dumps(prompt, sort_keys=True)
        group = groups.setdefault(key, {"prompt_id": f"{_dataset_name(path)}-{location}", "prompt": prompt, "responses": [],
                                        "annotator": "dataset", "source": source,
                                        "provenance": {"format": "unpaired (KTO)"}})
        group["responses"].append({"text": text, "rank": 1 if label else 2})
    for record in groups.values():
        ranks = {response["rank"] for response in record["responses"]}
        if "problem" not in record and ranks != {1, 2}:
            which = "desirable" if ranks == {1} else "undesirable"
            record.update(problem={"field": "label", "problem": f"every answer of this prompt is {which}: nothing to "
                                                                 "prefer it to"})
    return list(groups.values())


def preference_record(path, location: int, obj: dict) -> dict:
    """A TRL / HH-RLHF preference pair as a ranked record: chosen rank 1, rejected rank 2.

    Each pair is its own prompt_id (`<file stem>-<location>`): datasets repeat a prompt across
    independent pairs, which align's format would read as one annotator ranking it twice. The
    dataset's own id, if any, is kept in provenance."""
    _reject_near_misses(path, location, obj, PREFERENCE_FIELDS)
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise DataError(path, location, key, "missing", "a preference pair has chosen and rejected")
    if obj.get("prompt") is None:
        chosen = _conversation(path, location, "chosen", obj["chosen"])
        rejected = _conversation(path, location, "rejected", obj["rejected"])
        if chosen[:-1] != rejected[:-1]:
            raise DataError(path, location, "rejected", "differs from chosen before the final assistant answer",
                            "without a prompt field, chosen and rejected share every turn but the last")
        prompt, chosen_text, rejected_text = chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
    else:
        prompt = _prompt_messages(obj["prompt"])
        chosen_text = _answer(path, location, "chosen", obj["chosen"])
        rejected_text = _answer(path, location, "rejected", obj["rejected"])
    record = {"prompt_id": f"{_dataset_name(path)}-{location}", "prompt": check_messages(path, location, "prompt", prompt, "user"),
              "responses": [{"text": chosen_text, "rank": 1}, {"text": rejected_text, "rank": 2}],
              "annotator": str(obj.get("annotator", "dataset")), "source": f"{path}:{location}"}
    if obj.get("margin") is not None:
        record["margin"] = _margin(path, location, obj["margin"])
    dataset_id = obj.get("prompt_id", obj.get("id"))
    record["provenance"] = {"format": "preference pair", **({"id": str(dataset_id)} if dataset_id is not None else {})}
    return record


def broken_pair(path, location: int, error: DataError) -> dict:
    """A malformed imported pair (HH-RLHF holds dialogues whose final answer is empty) as a record
    `align.preferences` counts as a bad ranking: skipped and listed (`bad_rankings: skip`) or
    refused with its file:line (`refuse`), like a ranking that breaks the rules. Its `prompt` is
    empty: nothing trains on it."""
    return {"prompt_id": f"{_dataset_name(path)}-{location}", "prompt": [], "responses": [], "annotator": "dataset",
            "source": f"{path}:{location}",
            "problem": {"field": error.field or "record",
                        "problem": error.problem + (f" ({error.hint})" if error.hint else "")}}


def _reject_near_misses(path, line, obj: dict, known: tuple[str, ...]) -> None:
    """Other columns are ignored, but one spelt almost like a known field (`chosn`) is refused."""
    for key in obj:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.8)
            if close:
                raise DataError(path, line, str(key), "unknown field", f"did you mean {close[0]!r}?")


def hh_dialogue(text: str) -> list[dict] | None:
    """HH-RLHF's `\n\nHuman: ..\n\nAssistant: ..` text as messages; None when it is not that format.
    Contents are stripped; a trailing empty `Assistant:` (a prompt's cue to answer) is dropped."""
    if not HH_TURN.match(text.lstrip("\n")):  # leading newlines aside, it opens with a turn
        return None
    parts = HH_TURN.split(text)
    if parts[0].strip():
        return None
    messages = [{"role": HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def _conversation(path, location, field: str, value) -> list[dict]:
    """An implicit-prompt side: messages, or HH-RLHF text, ending with the assistant's answer."""
    if isinstance(value, str):
        messages = hh_dialogue(value)
        if messages is None:
            raise DataError(path, location, field, "a plain string needs a prompt field beside it",
                            "without prompt, chosen and rejected are conversations ({role, content} lists) "
                            "or HH-RLHF 'Human: ... Assistant: ...' text")
        value = messages
    return check_messages(path, location, field, value, last_role="assistant")


def _prompt_messages(value):
    """An explicit prompt: messages as given (checked by the caller), HH-RLHF text, or plain text as one user turn."""
    if isinstance(value, str):
        return hh_dialogue(value) or [{"role": "user", "content": value.strip()}]
    return value


def _answer(path, location, field: str, value) -> str:
    """An explicit-prompt answer: a string, or one assistant message (TRL's conversational format)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant":
            raise DataError(path, location, f"{field}[0].role", f"must be 'assistant', got {value[0].get('role')!r}")
        value = value[0].get("content")
    elif isinstance(value, list):
        raise DataError(path, location, field, f"must be one assistant message, got a list of {len(value)}",
                        "with a prompt field, each answer is a string or [{role: assistant, content}]")
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, location, field, "must be a non-empty string (or one assistant message)")
    return value.strip()


def _margin(path, location, value) -> float:
    try:
        margin = float(value)  # CSV cells are strings
    except (TypeError, ValueError):
        raise DataError(path, location, "margin", f"must be a number, got {json.dumps(value)[:40]}") from None
    if isinstance(value, bool) or not math.isfinite(margin):
        raise DataError(path, location, "margin", f"must be a finite number, got {value!r}")
    return margin


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
    if obj.get("margin") is not None:
        if len(checked) != 2:
            raise DataError(path, line, "margin", f"only for a record of two responses, this one has {len(checked)}",
                            "a margin says how much better rank 1 is than rank 2")
        record["margin"] = _margin(path, line, obj["margin"])
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
