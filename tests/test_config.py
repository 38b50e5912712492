"""Config parsing: YAML defaults, CLI overrides, and errors that name the key."""

from dataclasses import dataclass, field

import pytest

from align.config import parse_stage_config, resolved_config
from align.errors import ConfigError


@dataclass
class Example:
    run: str = "default"
    learning_rate: float = 1e-3
    epochs: int = 1
    use_peft: bool = True
    modules: list[str] = field(default_factory=lambda: ["q_proj"])


def config_file(tmp_path, text):
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    return path


def test_yaml_then_cli_override(tmp_path):
    path = config_file(tmp_path, "learning_rate: 0.01\nepochs: 3\nmodules: [a, b]\n")
    (args,) = parse_stage_config("x", (Example,), ["--config", str(path), "--epochs", "5"])
    assert args.learning_rate == 0.01 and args.epochs == 5 and args.modules == ["a", "b"]
    assert resolved_config(args)["epochs"] == 5


def test_unknown_yaml_key_is_named_with_a_suggestion(tmp_path):
    path = config_file(tmp_path, "lerning_rate: 0.01\n")
    with pytest.raises(ConfigError, match=r"stage.yaml: unknown key 'lerning_rate'; did you mean 'learning_rate'"):
        parse_stage_config("x", (Example,), ["--config", str(path)])


def test_mistyped_yaml_value(tmp_path):
    path = config_file(tmp_path, "epochs: three\n")
    with pytest.raises(ConfigError, match=r"epochs: expected int, got 'three'"):
        parse_stage_config("x", (Example,), ["--config", str(path)])
    path = config_file(tmp_path, "epochs: true\n")
    with pytest.raises(ConfigError, match="epochs: expected int"):
        parse_stage_config("x", (Example,), ["--config", str(path)])


def test_int_accepted_for_float(tmp_path):
    path = config_file(tmp_path, "learning_rate: 1\n")
    (args,) = parse_stage_config("x", (Example,), ["--config", str(path)])
    assert args.learning_rate == 1


def test_unknown_cli_option(tmp_path):
    path = config_file(tmp_path, "epochs: 2\n")
    with pytest.raises(ConfigError, match=r"command line: unknown option\(s\) --epoch; did you mean 'epochs'"):
        parse_stage_config("x", (Example,), ["--config", str(path), "--epoch", "3"])


def test_bad_yaml_names_line(tmp_path):
    path = config_file(tmp_path, "epochs: 2\nmodules: [a, b\n")
    with pytest.raises(ConfigError, match=r"stage.yaml:\d+: not valid YAML"):
        parse_stage_config("x", (Example,), ["--config", str(path)])

