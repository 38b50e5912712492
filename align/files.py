"""File chores, done once: atomic writes, JSON Lines, hashing, JSON-safe values.

Every file a stage or tool writes goes through `atomic_write_text` (or a helper
built on it): the bytes land in a temporary file beside the target, which is
then renamed over it, so a crash never leaves a half-written file that looks
whole. Folders use the same idea at the stage level (`align.runs.stage_output`).

`read_jsonl` refuses bad input (not UTF-8, a line over 1 MiB, not JSON) with
`DataError` naming file:line, so callers that validate records (`align.data`)
and callers that read our own outputs share one reader.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

from align.errors import DataError


def cache_dir() -> Path:
    """Where align keeps what it builds once per machine: the converted default model,
    benchmark choices, test oracles (`$ALIGN_CACHE`, default ~/.cache/align)."""
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    """`dir/.name.tmp-<pid><suffix>`: on the same filesystem as `path`, so the rename is atomic."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


@contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path to write; it replaces `path` only if the block finishes.

    `suffix` keeps an extension for writers that infer the format from it (matplotlib)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, value, strict: bool = False) -> Path:
    """Indented JSON. strict: NaN becomes null and non-JSON types are refused (for other tools to read);
    otherwise unknown types are written as their str()."""
    if strict:
        text = json.dumps(json_safe(value), indent=2, allow_nan=False)
    else:
        text = json.dumps(value, indent=2, default=str)
    return atomic_write_text(path, text + "\n")


def write_jsonl(path: str | Path, records) -> int:
    """Write one JSON object a line, atomically; returns the number of records."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


# One record a line: a longer line is a file that is not JSON Lines (a whole JSON array on one
# line) or a runaway record; refused before it is parsed, and never read into memory whole.
MAX_LINE_BYTES = 1 << 20


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; refuses a missing or empty file, a line over
    MAX_LINE_BYTES, bytes that are not UTF-8 and bad JSON, each with its line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(_raw_lines(handle), start=1):
            line = _decoded_line(path, number, raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(path, number, None, f"not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(path, number, None, f"expected a JSON object, got {type(obj).__name__}")
            rows.append((number, obj))
    if not rows:
        raise DataError(path, None, None, "file is empty", "add at least one JSON object per line")
    return rows


def _raw_lines(handle):
    """The lines of a binary file, none longer than MAX_LINE_BYTES + 1 (a longer one is cut there)."""
    while raw := handle.readline(MAX_LINE_BYTES + 1):
        yield raw


def _decoded_line(path: Path, number: int, raw: bytes) -> str:
    if len(raw) > MAX_LINE_BYTES:
        raise DataError(path, number, None, f"line is over {MAX_LINE_BYTES:,} bytes",
                        "one JSON object a line; split or shorten this record")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(path, number, None, f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the line)",
                        "save the file as UTF-8") from None


def read_jsonl_records(path: str | Path) -> list[dict]:
    """The objects of a JSON Lines file we wrote ourselves (no line numbers)."""
    return [obj for _, obj in read_jsonl(path)]


def json_safe(value):
    """Plain JSON values: NaN/inf -> None, numpy scalars and arrays -> Python, tuples -> lists,
    keys -> str, anything else unknown -> str (configs hold enums and paths)."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalar or array
        return json_safe(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return str(value)
