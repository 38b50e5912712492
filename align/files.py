"""File chores, done once: atomic writes, JSON Lines, hashing, JSON-safe values.

Every file a stage or tool writes goes through `atomic_write_text` (or a helper
built on it): the bytes land in a temporary file beside the target, which is
then renamed over it, so a crash never leaves a half-written file that looks
whole. Folders use the same idea at the stage level (`align.runs.stage_output`).

`read_jsonl` refuses bad input (not UTF-8, a line over 1 MiB, not JSON) with
`DataError` naming file:line, so callers that validate records (`align.data`)
and callers that read our own outputs share one reader. `read_records` reads
user datasets in JSON, Parquet and CSV too, with the same kind of errors.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import zlib
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
    # `.gz`: HH-RLHF and many hub datasets ship their JSON Lines gzipped (train.jsonl.gz)
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rb") as handle:
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
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(path, None, None, f"not a readable gzip file ({error})", "gunzip -t it, or fetch it again") from None
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


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(location, object) for every record of a JSON Lines, JSON, Parquet or CSV file, chosen by suffix
    (anything else is read as JSON Lines), or of a saved `datasets` folder. The location is what an error names after `file:`: the
    line for JSON Lines and CSV, the record's position (1-based) for a JSON array and Parquet.

    CSV cells that hold JSON lists or objects (a conversation's messages) are decoded; the others
    stay strings. Refuses a missing or empty file and a file its format cannot read. A path that
    ends in `#field=column,...` reads each `column` as `field` (`split_column_mapping`)."""
    spec = str(path)
    path, mapping = split_column_mapping(path)
    file, suffix = Path(path), Path(path).suffix.lower()
    if is_hub_dataset(path):
        rows = _hub_dataset_records(str(path))
    elif file.is_dir():
        rows = _saved_dataset_records(file)
    elif suffix not in (".json", ".parquet", ".csv"):
        rows = read_jsonl(file)  # its own checks first, with line numbers
    elif not file.is_file():
        raise DataError(file, None, None, "file not found")
    else:
        rows = {".json": _json_records, ".parquet": _parquet_records, ".csv": _csv_records}[suffix](file)
    if not rows:  # every reader: an empty dataset and a non-object record are refused alike
        raise DataError(path, None, None, "file is empty", "add at least one record")
    for location, obj in rows:
        if not isinstance(obj, dict):
            raise DataError(path, location, None, f"expected an object (one record), got {type(obj).__name__}")
    return _renamed_columns(spec, rows, mapping)


HUB_PREFIX = "hf:"
# `<file or hf:id>#<field>=<column>,...`: a dataset whose columns have other names, read as is
COLUMN_MAPPING = re.compile(r"(?P<source>.+)#(?P<mapping>[^#=,]+=[^#=,]+(?:,[^#=,]+=[^#=,]+)*)")


def split_column_mapping(spec) -> tuple[str | Path, dict[str, str]]:
    """(the file or hub id, {field: column}) of a data path that ends in `#field=column,...`:
    `hf:owner/name:test#chosen=response_a,rejected=response_b` reads `response_a` as `chosen`. A
    path without one comes back as it is, with {}."""
    match = COLUMN_MAPPING.fullmatch(str(spec))
    if not match or Path(str(spec)).exists():  # a file really named `x#a=b` is that file
        return spec, {}
    mapping = {}
    for item in match.group("mapping").split(","):
        field, column = (part.strip() for part in item.split("=", 1))
        if field in mapping:
            raise DataError(spec, None, None, f"column mapping names {field!r} twice", "one field=column per field")
        mapping[field] = column
    source = match.group("source")
    return (Path(source) if isinstance(spec, Path) else source), mapping


def _renamed_columns(spec: str, rows: list[tuple[int, dict]], mapping: dict[str, str]) -> list[tuple[int, dict]]:
    """Each record with `column` read as `field`, for every field=column of the mapping; a column
    the data lacks is named with the columns it has, at the first record. No mapping: `rows` as they are."""
    if not mapping:
        return rows
    renamed = []
    for location, obj in rows:
        record = dict(obj)
        for field, column in mapping.items():
            if column not in obj:
                raise DataError(spec, location, column, f"no such column (the mapping reads it as {field!r})",
                                f"columns here: {', '.join(map(str, obj)) or 'none'}")
            record.pop(field, None)  # the mapped column wins over one already called `field`
            record[field] = obj[column]
            if column not in mapping:
                record.pop(column, None)
        renamed.append((location, record))
    return renamed


def is_hub_dataset(path) -> bool:
    """`hf:<owner>/<name>[:<split>]`: a Hugging Face hub dataset instead of a file."""
    return str(path).startswith(HUB_PREFIX)


def hub_dataset_spec(spec: str) -> tuple[str, str]:
    """(dataset id, split) of `hf:<owner>/<name>[:<split>]` (split: train by default)."""
    name, _, split = spec.removeprefix(HUB_PREFIX).partition(":")
    if not name or name.count("/") > 1:
        raise DataError(spec, None, None, "not a hub dataset id", "write hf:<owner>/<name> or hf:<owner>/<name>:<split>")
    return name, split or "train"


def _hub_dataset_records(spec: str) -> list[tuple[int, dict]]:
    """A hub dataset's split through `datasets.load_dataset`; offline (HF_HUB_OFFLINE=1, the
    default here) a clear refusal before anything is asked of the network."""
    name, split = hub_dataset_spec(spec)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise DataError(spec, None, None, "a hub dataset, but HF_HUB_OFFLINE=1 (align's offline default)",
                        "set HF_HUB_OFFLINE=0 where the hub is reachable, or download the data and pass the file")
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # the hub's errors are many types: name the dataset and the cause
        raise DataError(spec, None, None, f"could not load {name} split {split} ({type(error).__name__}: "
                        f"{str(error)[:200]})") from None
    return list(enumerate(loaded.to_list(), start=1))


def hub_dataset_identity(spec: str) -> str:
    """What a manifest records for a hub dataset: its id, split and, when the hub answers, the
    commit it resolved to (datasets caches it; nothing is downloaded twice)."""
    name, split = hub_dataset_spec(spec)
    try:
        from huggingface_hub import HfApi

        revision = HfApi().dataset_info(name).sha
    except Exception:  # offline or unreachable: the id alone
        revision = None
    return f"hub:{name}:{split}@{revision or 'unresolved'}"


def _saved_dataset_records(path: Path) -> list[tuple[int, dict]]:
    """A `datasets` folder (`save_to_disk`, as `make export-rankings` writes): a Dataset, or a
    DatasetDict's `train` split (its only split, if it has one)."""
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(path, None, None, "a folder, but not a saved `datasets` dataset (no dataset_info.json)",
                        "pass a file (JSON Lines, JSON, Parquet, CSV) or a folder written by save_to_disk")
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise DataError(path, None, None, f"a DatasetDict with splits {', '.join(loaded)} and no 'train'",
                            "pass the split's own folder")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return list(enumerate(loaded.to_list(), start=1))


def sha256_path(path: str | Path) -> str:
    """A data input's identity: a file's sha256, for a folder the sha256 of its files' relative
    names and contents in sorted order, for a hub dataset its id, split and resolved commit."""
    path, mapping = split_column_mapping(path)
    if mapping:  # the mapping is part of what was read
        return f"{sha256_path(path)} columns {json.dumps(mapping, sort_keys=True)}"
    if is_hub_dataset(path):
        return hub_dataset_identity(str(path))
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()}\0{sha256_file(item)}\n".encode())
    return digest.hexdigest()


def _json_records(path: Path) -> list[tuple[int, dict]]:
    """A JSON file: a list of records, or an object holding one list of them (`{"data": [...]}`)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(path, None, None, f"not valid UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise DataError(path, error.lineno, None, f"not valid JSON ({error.msg} at column {error.colno})") from None
    if isinstance(value, dict):
        lists = [item for item in value.values() if isinstance(item, list)]
        if len(lists) != 1:
            raise DataError(path, None, None, "expected a JSON list of records (or an object holding one list)",
                            "JSON Lines (.jsonl) holds one record a line")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(path, None, None, f"expected a JSON list of records, got {type(value).__name__}")
    return list(enumerate(value, start=1))


def _parquet_records(path: Path) -> list[tuple[int, dict]]:
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as error:  # pyarrow raises several types for a file it cannot read
        raise DataError(path, None, None, f"not a readable Parquet file ({type(error).__name__}: {error})") from None
    return list(enumerate(table.to_pylist(), start=1))


def _csv_records(path: Path) -> list[tuple[int, dict]]:
    import csv

    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                if None in row:
                    raise DataError(path, reader.line_num, None, f"{len(row[None])} more cells than the header has columns")
                rows.append((reader.line_num, {key: _csv_cell(path, reader.line_num, key, value)
                                               for key, value in row.items() if value not in (None, "")}))
    except UnicodeDecodeError as error:
        raise DataError(path, None, None, f"not valid UTF-8 (byte {error.start})") from None
    except csv.Error as error:
        raise DataError(path, None, None, f"not valid CSV ({error})") from None
    return rows


def _csv_cell(path: Path, line: int, column: str, value: str):
    """A CSV cell: JSON when it looks like a list or an object (a conversation), else the string."""
    if value.lstrip()[:1] not in ("[", "{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise DataError(path, line, column, f"starts like JSON but is not valid JSON ({error.msg})") from None


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
