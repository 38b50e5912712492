"""Stage configuration: YAML defaults + command-line overrides, validated.

Parsing is TRL's `TrlParser` (itself transformers' `HfArgumentParser`): each
stage declares dataclasses (its own arguments plus a TRL trainer config), the
YAML file in `configs/<stage>.yaml` sets their values, and `--key value` on the
command line overrides them (`make sft ARGS="--learning_rate 1e-4"`).

What we add on top, because the parser lets it through:
- layers: `--config my.yaml` is read on top of `configs/<stage>.yaml` (several `--config`s:
  each on top of the ones before, as `make RECIPE=...` puts a recipe under the user's file), so
  a file names only what it changes and every other key keeps the stage default;
- `${NAME}` / `${NAME:-default}` in a YAML string come from the environment (a recipe's data paths);
- an unknown key names the file and suggests the closest known key;
- YAML values are type-checked against the dataclass annotations, and choices
  (`Literal[...]` fields) are checked by value, in YAML and on the command line;
- a key a stage renamed (its dataclass's `RENAMED = {"old": "new"}`) is an error
  naming the new spelling, never silently ignored;
- argparse's own errors are one-line `ConfigError`s (exit 2), not a usage dump;
- `--report_to a b` takes several trackers on the command line, as a YAML list does;
- `--force` (every stage): redo a stage whose output is up to date (`align.runs.skip_if_up_to_date`).
  It is a run control, not a config key: it says whether to make the output, not how, so it is
  never part of the resolved config, never recorded and never a reason to rerun. The parsed
  dataclasses come back as a `ParsedConfig` (a tuple, unpacked as before) whose `.force` holds it.

Defaults live in the stage dataclass; `configs/<stage>.yaml` repeats the stage's
own keys for documentation (a test proves they agree) and sets the TRL keys whose
CPU-tuned values differ from TRL's defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from pathlib import Path

import yaml

from align.errors import ConfigError
from align.files import json_safe

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
FORCE_FLAG = "--force"
BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class ParsedConfig(tuple):
    """A stage's config dataclasses in the order asked for (unpack it like a tuple), plus `force`."""

    force: bool = False


def parse_stage_config(stage: str, dataclass_types: tuple, argv: list[str] | None = None) -> ParsedConfig:
    """Parse `configs/<stage>.yaml`, then `--config FILE` on top of it, then CLI overrides, into dataclasses.

    A user's file names only what it changes: every other key keeps the stage's default
    (configs/<stage>.yaml, else the dataclass default). Choices typed `Literal[...]` are
    checked in YAML and on the command line; a renamed key (a dataclass's `RENAMED`
    mapping, old -> new) is an error that names the new spelling."""
    argv = list(sys.argv[1:] if argv is None else argv)
    force = pop_force_flag(argv)
    layers = [CONFIG_DIR / f"{stage}.yaml"] if (CONFIG_DIR / f"{stage}.yaml").is_file() else []
    while "--config" in argv:  # several: each on top of the ones before (a recipe, then the user's file)
        index = argv.index("--config")
        if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
            raise ConfigError("command line: --config needs a file name")
        layers.append(Path(argv[index + 1]))
        del argv[index : index + 2]
    known = {field.name: field for cls in dataclass_types for field in dataclasses.fields(cls)}
    types = {name: hint for cls in dataclass_types for name, hint in _type_hints(cls).items()}
    renamed = {old: new for cls in dataclass_types for old, new in getattr(cls, "RENAMED", {}).items()}
    merged: dict = {}
    for config_path in layers:
        values = {key: expand_environment(config_path, key, value) for key, value in _read_yaml(config_path).items()}
        for key in values:
            if key in renamed:
                raise ConfigError(f"{config_path}: {key!r} is now called {renamed[key]!r}; rename the key")
            if key == FORCE_FLAG.removeprefix("--") and key not in known:
                raise ConfigError(f"{config_path}: {key!r} is a command-line flag ({FORCE_FLAG}), not a config key")
            if key not in known and key != "env":
                raise ConfigError(f"{config_path}: unknown key {key!r}{_suggest(key, known)}")
        for key, value in values.items():
            if key in known:
                _check_type(config_path, key, value, types.get(key, known[key].type))
        merged.update(values)
    for token in argv:
        flag = token.split("=", 1)[0].removeprefix("--")
        if token.startswith("--") and flag in renamed:
            raise ConfigError(f"command line: --{flag} is now called --{renamed[flag]}")
    for key, value in (merged.pop("env", None) or {}).items():  # TRL's convention: `env:` sets variables
        os.environ[key] = str(value)

    parser = _stage_parser(dataclass_types)
    parser.set_defaults_with_config(**merged)
    try:
        parsed = ParsedConfig(parser.parse_args_into_dataclasses(args=argv))
    except ValueError as error:  # HfArgumentParser's message for unused CLI arguments, or a field check
        unused = re.search(r"not used by the HfArgumentParser: \[(.*)\]", str(error))
        if unused:
            flags = [flag.strip(" '\"") for flag in unused.group(1).split(",") if flag.strip(" '\"").startswith("--")]
            hint = _suggest(flags[0].lstrip("-"), known) if flags else ""
            raise ConfigError(f"command line: unknown option(s) {', '.join(flags) or unused.group(1)}{hint}") from None
        where = ", ".join(str(path) for path in layers) or "command line"
        raise ConfigError(f"{where}: {error}") from None
    parsed.force = force
    return parsed


ENVIRONMENT_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_environment(config_path: Path, key: str, value):
    """`${NAME}` and `${NAME:-default}` in a YAML string (or a list of strings) from the environment,
    as a shell and docker compose read them: a recipe names its data files once and a user points
    them elsewhere (`HH_TRAIN=/data/train.jsonl make sft RECIPE=hh-rlhf`). A variable that is unset
    (or empty) and has no default is an error naming the file, the key and the variable."""
    if isinstance(value, list):
        return [expand_environment(config_path, key, item) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if os.environ.get(name):
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{config_path}: {key}: ${{{name}}} is not set; export {name}=... or write ${{{name}:-default}}")

    return ENVIRONMENT_REFERENCE.sub(substitute, value)


def pop_force_flag(argv: list[str]) -> bool:
    """Remove `--force` (bare, `--force true|false` or `--force=...`, as the parser spells booleans)
    from argv; whether it asked to redo an up-to-date stage."""
    force, index = False, 0
    while index < len(argv):
        name, has_value, value = argv[index].partition("=")
        if name != FORCE_FLAG:
            index += 1
            continue
        if not has_value and index + 1 < len(argv) and argv[index + 1].lower() in BOOLEAN_WORDS:
            has_value, value = True, argv.pop(index + 1)
        del argv[index]
        if has_value and value.lower() not in BOOLEAN_WORDS:
            raise ConfigError(f"command line: {FORCE_FLAG} takes no value or true/false, got {value!r}")
        force = BOOLEAN_WORDS[value.lower()] if has_value else True
    return force


# a % that is neither half of a %% nor the start of %(name)s
LONE_PERCENT = re.compile(r"%(?!%|\(\w+\)[a-z])(?<!%%)")


def _stage_parser(dataclass_types: tuple):
    from trl import TrlParser  # lazily: importing trl costs seconds

    class StageParser(TrlParser):
        """argparse's own errors (a bad choice, a missing value) as one-line ConfigErrors, not usage + exit."""

        def error(self, message):
            choice = re.match(r"argument --([\w-]+)(?:/--[\w-]+)*: invalid choice: (.*) \(choose from (.*)\)$", message)
            if choice:  # the same words as a bad YAML value
                key, value, allowed = choice.groups()
                allowed = ", ".join(option.strip(" '") for option in allowed.split(","))
                raise ConfigError(f"command line: {key.replace('-', '_')}: expected one of {allowed}, got {value}")
            raise ConfigError(f"command line: {message}")

    parser = StageParser(dataclass_types, allow_abbrev=False)  # `--epoch` must not silently mean `--epochs`
    for action in parser._actions:
        # transformers types report_to `None | str | list[str]`, which HfArgumentParser reads as one
        # string: `--report_to tensorboard wandb` (as in YAML, a list) needs nargs "+"
        if action.dest == "report_to" and action.nargs is None:
            action.nargs = "+"
        # argparse %-formats help texts: a plain "20% low" in a field's help made `--help` crash.
        # Escape a lone % only: transformers' own texts say "~20%%", and "%(default)s" stays.
        if action.help:
            action.help = LONE_PERCENT.sub("%%", action.help)
    return parser


def _type_hints(cls) -> dict:
    """Field annotations resolved (stages use `from __future__ import annotations`)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[error.start]:02x}); save the file as UTF-8") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if values is None:  # an empty file (or only comments) is more likely the wrong file than "change nothing"
        raise ConfigError(f"{path}: config file is empty; give the keys to change (key: value), or leave out --config")
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
    if isinstance(annotation, str):  # an annotation we could not resolve: let the dataclass decide
        return
    choices = _literal_choices(annotation)
    if choices and not isinstance(value, (list, dict)):
        if value not in choices:
            raise ConfigError(f"{path}: {key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
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


def _literal_choices(annotation) -> tuple:
    """The values of a `Literal[...]` annotation (also inside `X | None`), else ()."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(choice for arg in typing.get_args(annotation) for choice in _literal_choices(arg))
    return ()


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
