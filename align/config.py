"""Stage configuration: YAML defaults + command-line overrides, validated.

Parsing is TRL's `TrlParser` (itself transformers' `HfArgumentParser`): each
stage declares dataclasses (its own arguments plus a TRL trainer config), the
YAML file in `configs/<stage>.yaml` sets their values, and `--key value` on the
command line overrides them (`make sft ARGS="--learning_rate 1e-4"`).

What we add on top, because the parser lets it through: an unknown key names
the file and suggests the closest known key, and YAML values are type-checked
against the dataclass annotations (argparse only checks command-line strings).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from pathlib import Path

import yaml

from align.errors import ConfigError
from align.files import json_safe

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def parse_stage_config(stage: str, dataclass_types: tuple, argv: list[str] | None = None):
    """Parse `configs/<stage>.yaml` (or `--config FILE`) and CLI overrides into dataclasses."""
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        config_path = Path(argv[argv.index("--config") + 1])
    else:
        config_path = CONFIG_DIR / f"{stage}.yaml"
        argv = ["--config", str(config_path), *argv]
    yaml_values = _read_yaml(config_path)
    known = {field.name: field for cls in dataclass_types for field in dataclasses.fields(cls)}
    for key in yaml_values:
        if key not in known and key != "env":
            raise ConfigError(f"{config_path}: unknown key {key!r}{_suggest(key, known)}")
    for key, value in yaml_values.items():
        if key in known:
            _check_type(config_path, key, value, known[key].type)

    parser = TrlParser(dataclass_types, allow_abbrev=False)  # `--epoch` must not silently mean `--epochs`
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:  # HfArgumentParser's message for unused CLI arguments, or a field check
        unused = re.search(r"not used by the HfArgumentParser: \[(.*)\]", str(error))
        if unused:
            flags = [flag.strip(" '\"") for flag in unused.group(1).split(",") if flag.strip(" '\"").startswith("--")]
            hint = _suggest(flags[0].lstrip("-"), known) if flags else ""
            raise ConfigError(f"command line: unknown option(s) {', '.join(flags) or unused.group(1)}{hint}") from None
        raise ConfigError(f"{config_path}: {error}") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must be a mapping of key: value")
    return values


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.7)
    return f"; did you mean {close[0]!r}?" if close else "; see the dataclass fields of this stage"


def _check_type(path: Path, key: str, value, annotation) -> None:
    """Reject YAML values whose type cannot be what the field declares."""
    if value is None:
        return
    if isinstance(annotation, str):  # postponed annotations we can't resolve cheaply: let the dataclass decide
        return
    allowed = _allowed_types(annotation)
    if not allowed:
        return
    if isinstance(value, bool) and bool not in allowed:  # bool is an int subclass: `epochs: true` is a typo
        pass
    elif isinstance(value, allowed):
        return
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return
    names = " or ".join(sorted({t.__name__ for t in allowed}))
    raise ConfigError(f"{path}: {key}: expected {names}, got {value!r} ({type(value).__name__})")


def _allowed_types(annotation) -> tuple:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        result: tuple = ()
        for arg in typing.get_args(annotation):
            result += _allowed_types(arg)
        return result
    if origin is typing.Literal:
        return tuple({type(arg) for arg in typing.get_args(annotation)})
    if origin in (list, tuple):
        return (list,)
    if origin is dict:
        return (dict, str)
    if annotation in (int, float, str, bool):
        return (annotation,)
    if annotation is type(None):
        return (type(None),)
    return ()  # enums, custom classes: the dataclass validates those


def resolved_config(*configs) -> dict:
    """A plain dict of every field of every config dataclass, for saving and manifests."""
    merged: dict = {}
    for config in configs:
        values = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        merged.update(json_safe(values))
    return merged
