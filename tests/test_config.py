"""Config parsing: YAML defaults, CLI overrides, and errors that name the key."""

import ast
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import yaml

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



# --- each stage's YAML agrees with its dataclass -------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def stage_defaults(stage_file: Path) -> dict:
    """Defaults of the dataclass fields declared in a stage file, read from its source (nothing
    imports a stage): `x: T = v`, `field(default=v)` (also a helper named `..._field(default=v)`, as
    `training.lora_top_layers_field`) and `field(default_factory=lambda: v)`."""
    defaults = {}
    for node in ast.walk(ast.parse(stage_file.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        if not any("dataclass" in ast.unparse(decorator) for decorator in node.decorator_list):
            continue
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or item.value is None or "ClassVar" in ast.unparse(item.annotation):
                continue
            value = item.value
            function = ast.unparse(value.func) if isinstance(value, ast.Call) else ""
            if function == "field" or function.endswith((".field", "_field")):
                keywords = {keyword.arg: keyword.value for keyword in value.keywords}
                if "default" in keywords:
                    value = keywords["default"]
                elif "default_factory" in keywords and isinstance(keywords["default_factory"], ast.Lambda):
                    value = keywords["default_factory"].body
                elif function != "field":  # a helper's default must be visible here, or its key goes unchecked
                    pytest.fail(f"{stage_file}: {item.target.id} = {function}(...) needs default=... spelled out")
                else:
                    continue
            try:
                defaults[item.target.id] = ast.literal_eval(value)
            except ValueError:  # a computed default (a factory): not something a YAML file repeats
                continue
    return defaults


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.stem)
def test_stage_yaml_repeats_its_dataclass_defaults(config):
    """configs/<stage>.yaml documents the stage's own keys; `--config my.yaml` users get the same
    defaults only if the YAML and the dataclass agree (TRL's keys are the YAML's to set)."""
    stage_file = REPO / "stages" / f"{config.stem}.py"
    assert stage_file.is_file(), f"{config} has no stage {stage_file}"
    own = stage_defaults(stage_file)
    assert own, f"no dataclass defaults found in {stage_file}"
    # the shared key groups of align.online (held-out evaluation, sampling) where the stage uses them
    shared = stage_defaults(REPO / "align" / "online.py") if "online.HeldOutArgs" in stage_file.read_text() else {}
    defaults = {**shared, **own}
    values = yaml.safe_load(config.read_text()) or {}
    differing = {key: (value, defaults[key]) for key, value in values.items()
                 if key in defaults and value != defaults[key]}
    assert not differing, f"{config.name} (yaml, dataclass): {differing}"


def test_user_config_file_layers_on_the_stage_defaults(tmp_path, monkeypatch):
    from align import config as config_module

    monkeypatch.setattr(config_module, "CONFIG_DIR", tmp_path)
    config_file(tmp_path, "learning_rate: 0.01\nepochs: 3\n").rename(tmp_path / "x.yaml")
    mine = tmp_path / "mine.yaml"
    mine.write_text("epochs: 7\n")
    (args,) = parse_stage_config("x", (Example,), ["--config", str(mine)])
    assert args.epochs == 7 and args.learning_rate == 0.01  # the stage default, not the dataclass's 1e-3


@dataclass
class Choosy:
    mode: Literal["on_policy", "offline"] = "on_policy"
    backend: str = "auto"

    RENAMED: ClassVar[dict[str, str]] = {"engine": "backend"}


def test_choices_are_checked_in_yaml_and_on_the_command_line(tmp_path):
    path = config_file(tmp_path, "mode: online\n")
    with pytest.raises(ConfigError, match=r"stage.yaml: mode: expected one of on_policy, offline, got 'online'"):
        parse_stage_config("x", (Choosy,), ["--config", str(path)])
    with pytest.raises(ConfigError, match=r"command line: mode: expected one of on_policy, offline, got 'online'"):
        parse_stage_config("x", (Choosy,), ["--mode", "online"])
    assert parse_stage_config("x", (Choosy,), ["--mode", "offline"])[0].mode == "offline"


def test_a_renamed_key_names_its_new_spelling(tmp_path):
    path = config_file(tmp_path, "engine: hf\n")
    with pytest.raises(ConfigError, match=r"'engine' is now called 'backend'"):
        parse_stage_config("x", (Choosy,), ["--config", str(path)])
    with pytest.raises(ConfigError, match=r"--engine is now called --backend"):
        parse_stage_config("x", (Choosy,), ["--engine=hf"])


@pytest.mark.parametrize("stage", ["dpo", "ppo", "rloo"])
def test_policy_stages_judge_held_out_samples_as_compare_does(stage):
    """One held-out evaluation: every policy stage parses align.online.HeldOutArgs, whose decoding
    defaults and statistics are compare's."""
    from align.comparison import STATISTICS
    from align.online import HeldOutArgs

    source = (REPO / "stages" / f"{stage}.py").read_text()
    assert "online.HeldOutArgs" in source and "eval_max_new_tokens:" not in source  # declared once, not copied
    policy, compare = vars(HeldOutArgs()), stage_defaults(REPO / "stages" / "compare.py")
    pairs = {"eval_samples_per_prompt": "samples_per_prompt", "eval_temperature": "temperature",
             "eval_max_new_tokens": "max_new_tokens", "eval_seed": "seed", "truncation_penalty": "truncation_penalty",
             "kl_estimator": "kl_estimator", "kl_dtype": "kl_dtype", "eval_file": "prompts_file"}
    assert {key: policy[key] for key in pairs} == {key: compare[other] for key, other in pairs.items()}
    assert {key: compare[key] for key in STATISTICS} == STATISTICS


def test_yaml_strings_read_environment_variables_with_defaults(tmp_path, monkeypatch):
    """A recipe names its data once (`${HH_TRAIN:-data/...}`); a user points it elsewhere."""
    path = config_file(tmp_path, 'run: "${RUN_NAME:-fallback}"\nmodules: ["${MODULE}", v_proj]\n')
    monkeypatch.setenv("MODULE", "q_proj")
    monkeypatch.delenv("RUN_NAME", raising=False)
    (args,) = parse_stage_config("x", (Example,), ["--config", str(path)])
    assert args.run == "fallback" and args.modules == ["q_proj", "v_proj"]
    monkeypatch.setenv("RUN_NAME", "mine")
    assert parse_stage_config("x", (Example,), ["--config", str(path)])[0].run == "mine"
    monkeypatch.delenv("MODULE")
    with pytest.raises(ConfigError, match=r"stage.yaml: modules: \$\{MODULE\} is not set; export MODULE=\.\.\. or "):
        parse_stage_config("x", (Example,), ["--config", str(path)])
    # the command line is the user's own text (the shell has expanded it): passed through as typed
    assert parse_stage_config("x", (Example,), ["--run", "${X}"])[0].run == "${X}"


def test_several_config_files_layer_in_order(tmp_path):
    """`make RECIPE=...` puts the recipe's file first and a user's `--config` on top of it."""
    recipe, mine = tmp_path / "recipe.yaml", tmp_path / "mine.yaml"
    recipe.write_text("epochs: 2\nlearning_rate: 0.5\n")
    mine.write_text("epochs: 9\n")
    (args,) = parse_stage_config("x", (Example,), ["--config", str(recipe), "--config", str(mine), "--use_peft", "false"])
    assert (args.epochs, args.learning_rate, args.use_peft) == (9, 0.5, False)
    with pytest.raises(ConfigError, match=r"--config needs a file name"):
        parse_stage_config("x", (Example,), ["--config", "--epochs", "3"])


@pytest.mark.parametrize("recipe", sorted((REPO / "configs" / "recipes").glob("*/*.yaml")),
                         ids=lambda path: f"{path.parent.name}-{path.stem}")
def test_recipe_files_set_only_keys_their_stage_has(recipe):
    """configs/recipes/<name>/<stage>.yaml is read on top of configs/<stage>.yaml: each key must be
    one the stage knows (its YAML's keys, TRL's included, or its dataclasses' defaults)."""
    stage_file = REPO / "stages" / f"{recipe.stem}.py"
    assert stage_file.is_file(), f"{recipe} names no stage"
    known = set(yaml.safe_load((REPO / "configs" / f"{recipe.stem}.yaml").read_text())) | set(stage_defaults(stage_file))
    if "online.HeldOutArgs" in stage_file.read_text():
        known |= set(stage_defaults(REPO / "align" / "online.py"))
    unknown = set(yaml.safe_load(recipe.read_text())) - known
    assert not unknown, f"{recipe}: keys stage {recipe.stem} does not know: {unknown}"


@dataclass
class WithPercentInHelp:
    kl_dtype: str = field(default="fp32", metadata={"help": "bf16 autocast put k3 ~20% low"})
    checkpointing: bool = field(default=False, metadata={"help": "~25%% slower (escaped, as transformers' own)"})
    share: float = field(default=0.5, metadata={"help": "now %(default)s, i.e. 50% of it"})


def test_help_texts_with_a_percent_sign_print(capsys):
    """argparse %-formats help texts: "~20% low" once crashed `--help` of dpo, rloo and ppo; texts
    already escaped (transformers') and `%(default)s` print as argparse means them."""
    with pytest.raises(SystemExit) as done:
        parse_stage_config("x", (WithPercentInHelp,), ["--help"])
    assert done.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "~20% low" in printed and "~25% slower" in printed and "now 0.5, i.e. 50% of it" in printed
    assert "%%" not in printed


@pytest.mark.slow
def test_every_stage_prints_its_help():
    """`python -m stages.<name> --help` exits 0 with a usage line for every stage and tool."""
    names = sorted(path.stem for path in (REPO / "stages").glob("*.py") if path.stem != "__init__")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    running = {name: subprocess.Popen([sys.executable, "-m", f"stages.{name}", "--help"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for name in names}
    failed = {}
    try:
        for name, process in running.items():
            output, _ = process.communicate(timeout=300)
            if process.returncode != 0 or "usage:" not in output:
                failed[name] = f"exit {process.returncode}: {output.strip().splitlines()[-1:]}"
    finally:
        for process in running.values():
            process.kill()  # a no-op for those that ended; none outlives a timeout
    assert not failed, failed
