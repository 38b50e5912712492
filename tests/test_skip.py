"""Skip what is up to date: a stage whose config, parents, data, code and versions equal those its
finished output recorded prints one line and leaves runs/ alone; otherwise one line names what changed.

The unit tests write real stage outputs (align.runs.stage_output) into the session's runs/ folder;
the end-to-end test runs the real SFT stage on the tiny model four times (train, skip, changed key, --force)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from align import runs
from align.config import parse_stage_config, resolved_config
from align.errors import ConfigError, DataError
from tests.conftest import assert_ok, run_stage, write_jsonl

CONFIG = {"run": "r", "beta": 0.1, "rounds": 2, "ranked_files": ["ranked.jsonl"], "disable_tqdm": False}


def snapshot(folder) -> dict:
    """Every file under `folder`: its bytes and modification time (a skip must change neither)."""
    return {path.relative_to(folder).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def make_parent(run: str, generation: int = 1) -> runs.Checkpoint:
    with runs.stage_output(run, "sft", {"generation": generation}, seed=0):
        pass
    return runs.find_checkpoint(run, ["sft"])


@pytest.fixture
def finished_dpo(runs_root, tmp_path, request):
    """A finished dpo output of its own run, with the fingerprint its inputs give; and how to recompute it."""
    run = request.node.name.replace("[", "-").replace("]", "")
    data = write_jsonl(tmp_path / "ranked.jsonl", [{"prompt_id": "p1"}])
    sft = make_parent(run)

    def fingerprint(config=CONFIG, parent=sft):
        return runs.stage_fingerprint("dpo", config, parents={"sft": parent}, inputs=runs.data_inputs(data))

    with runs.stage_output(run, "dpo", CONFIG, seed=0, parent=sft, fingerprint=fingerprint()):
        pass
    return {"run": run, "data": data, "sft": sft, "fingerprint": fingerprint, "folder": runs.stage_dir(run, "dpo")}


def check(run: str, config: dict, fingerprint: dict, capsys, force: bool = False) -> tuple[bool, list[str]]:
    skipped = runs.skip_if_up_to_date(run, "dpo", config, fingerprint, force)
    return skipped, capsys.readouterr().out.splitlines()


def test_unchanged_output_is_skipped_with_one_line_and_left_alone(finished_dpo, runs_root, capsys):
    run_folder = runs_root / finished_dpo["run"]
    before = snapshot(run_folder)
    skipped, lines = check(finished_dpo["run"], CONFIG, finished_dpo["fingerprint"](), capsys)
    assert skipped
    assert lines == [f"[dpo] up to date: {finished_dpo['folder']} (config, parents, data, code and versions "
                     "unchanged; --force redoes it)"]
    assert snapshot(run_folder) == before
    recorded = json.loads((finished_dpo["folder"] / runs.MANIFEST).read_text())["fingerprint"]
    assert set(recorded) == {"config_sha256", "parents", "inputs", "code_sha256", "code", "versions"}
    assert recorded["inputs"] == {str(finished_dpo["data"]): runs.sha256_file(finished_dpo["data"])}
    assert recorded["parents"]["sft"]["manifest_sha256"] == finished_dpo["sft"].manifest_sha256
    assert "stages/dpo.py" in recorded["code"] and "align/runs.py" in recorded["code"]
    assert recorded["versions"]["torch"] and "argilla" not in recorded["versions"]


def test_force_reruns_an_up_to_date_stage(finished_dpo, capsys):
    skipped, lines = check(finished_dpo["run"], CONFIG, finished_dpo["fingerprint"](), capsys, force=True)
    assert not skipped and lines == ["[dpo] rerunning: --force (it was up to date)"]


def test_a_changed_config_key_is_named_with_both_values(finished_dpo, capsys):
    config = {**CONFIG, "beta": 0.2}
    skipped, lines = check(finished_dpo["run"], config, finished_dpo["fingerprint"](config), capsys)
    assert not skipped and lines == ["[dpo] rerunning: config key beta 0.1 -> 0.2"]
    config = {**CONFIG, "beta": 0.2, "ranked_files": ["other.jsonl"], "new_key": 1}
    _, lines = check(finished_dpo["run"], config, finished_dpo["fingerprint"](config), capsys)
    assert lines == ['[dpo] rerunning: config keys beta 0.1 -> 0.2, new_key (none) -> 1, '
                     'ranked_files ["ranked.jsonl"] -> ["other.jsonl"]']


def test_a_cosmetic_key_is_no_reason_to_rerun(finished_dpo, capsys):
    config = {**CONFIG, "disable_tqdm": True}
    skipped, _ = check(finished_dpo["run"], config, finished_dpo["fingerprint"](config), capsys)
    assert skipped


def test_a_rerun_parent_makes_the_child_stale(finished_dpo, capsys):
    old = finished_dpo["sft"].manifest_sha256
    new_parent = make_parent(finished_dpo["run"], generation=2)  # the parent reran: a new manifest
    assert new_parent.manifest_sha256 != old
    skipped, lines = check(finished_dpo["run"], CONFIG, finished_dpo["fingerprint"](parent=new_parent), capsys)
    assert not skipped
    assert lines == [f"[dpo] rerunning: parent {new_parent.folder} changed (manifest sha256 {old[:12]} -> "
                     f"{new_parent.manifest_sha256[:12]})"]


def test_changed_data_is_named(finished_dpo, capsys):
    write_jsonl(finished_dpo["data"], [{"prompt_id": "p2"}])
    skipped, lines = check(finished_dpo["run"], CONFIG, finished_dpo["fingerprint"](), capsys)
    assert not skipped and lines == [f"[dpo] rerunning: {finished_dpo['data']} changed"]


def test_changed_versions_are_named(finished_dpo, capsys):
    manifest_path = finished_dpo["folder"] / runs.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    current = manifest["fingerprint"]["versions"]["trl"]
    manifest["fingerprint"]["versions"]["trl"] = "0.0.1"  # as if trained with another TRL
    manifest_path.write_text(json.dumps(manifest))
    _, lines = check(finished_dpo["run"], CONFIG, finished_dpo["fingerprint"](), capsys)
    assert lines == [f"[dpo] rerunning: versions changed (trl 0.0.1 -> {current})"]


def test_library_code_counts_and_a_readme_does_not(finished_dpo, capsys, tmp_path, monkeypatch):
    """The code hash covers align/*.py and stages/<stage>.py only: shown on a copy of the repository layout."""
    repo = tmp_path / "repo"
    for name in ("align/runs.py", "align/dpo_rounds.py", "stages/dpo.py", "stages/sft.py", "README.md"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(f"# {name}\n")
    monkeypatch.setattr(runs, "REPO_ROOT", repo)
    run = finished_dpo["run"]
    with runs.stage_output(run, "dpo", CONFIG, seed=0, fingerprint=finished_dpo["fingerprint"]()):
        pass
    assert set(runs.code_sha256s("dpo")) == {"align/runs.py", "align/dpo_rounds.py", "stages/dpo.py"}
    (repo / "README.md").write_text("# a README-only commit\n")
    (repo / "stages" / "sft.py").write_text("# another stage's code\n")
    assert check(run, CONFIG, finished_dpo["fingerprint"](), capsys)[0]
    (repo / "align" / "dpo_rounds.py").write_text("# pairs chosen differently\n")
    skipped, lines = check(run, CONFIG, finished_dpo["fingerprint"](), capsys)
    assert not skipped and lines == ["[dpo] rerunning: code changed (align/dpo_rounds.py)"]


def test_several_changes_share_one_line(finished_dpo, capsys):
    write_jsonl(finished_dpo["data"], [{"prompt_id": "p3"}])
    config = {**CONFIG, "rounds": 3}
    _, lines = check(finished_dpo["run"], config, finished_dpo["fingerprint"](config), capsys)
    assert lines == [f"[dpo] rerunning: config key rounds 2 -> 3; {finished_dpo['data']} changed"]


def test_a_failed_output_never_counts_as_up_to_date(runs_root, capsys):
    run, fingerprint = "skip-failed", runs.stage_fingerprint("dpo", CONFIG)
    with pytest.raises(RuntimeError):
        with runs.stage_output(run, "dpo", CONFIG, seed=0, fingerprint=fingerprint):
            raise RuntimeError("crashed")
    (failed,) = (runs_root / run).glob("dpo.failed-*")
    assert json.loads((failed / runs.MANIFEST).read_text())["fingerprint"] == fingerprint
    assert check(run, CONFIG, fingerprint, capsys) == (False, [])  # never finished: runs without a word
    # a stage folder whose manifest is not complete (written by hand, or by an older tool)
    folder = runs.stage_dir(run, "dpo")
    folder.mkdir()
    (folder / runs.MANIFEST).write_text(json.dumps({"stage": "dpo", "status": "failed", "fingerprint": fingerprint}))
    assert check(run, CONFIG, fingerprint, capsys) == (False, [f"[dpo] rerunning: {folder} is not complete "
                                                              "(status 'failed')"])


def test_an_output_without_fingerprint_reruns(runs_root, capsys):
    run = "skip-old"
    with runs.stage_output(run, "dpo", CONFIG, seed=0):  # as every stage wrote before fingerprints
        pass
    skipped, lines = check(run, CONFIG, runs.stage_fingerprint("dpo", CONFIG), capsys)
    assert not skipped
    assert lines == [f"[dpo] rerunning: {runs.stage_dir(run, 'dpo')} has no fingerprint "
                     "(written before up-to-date checks, or by hand)"]


def test_a_malformed_fingerprint_reruns_with_one_line(finished_dpo, capsys):
    manifest_path = finished_dpo["folder"] / runs.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint"]["parents"] = ["runs/x/sft"]
    manifest_path.write_text(json.dumps(manifest))
    _, lines = check(finished_dpo["run"], CONFIG, finished_dpo["fingerprint"](), capsys)
    assert lines == [f"[dpo] rerunning: {manifest_path}: its fingerprint is malformed (edited by hand?)"]


def test_model_folder_counts_by_its_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first = runs.model_input("my-model", str(folder))
    assert runs.model_input("my-model", str(folder)) == first and list(first) == ["model my-model"]
    (folder / "model.safetensors").write_bytes(b"weights")
    assert runs.model_input("my-model", str(folder)) != first
    assert runs.model_input("org/hub-model", "org/hub-model") == {"model org/hub-model": "hub id org/hub-model"}


def test_pulled_records_count_by_content_not_order():
    a, b = {"prompt_id": "a", "rank": 1}, {"prompt_id": "b", "rank": 2}
    assert runs.records_input("argilla ws/ds", [a, b]) == runs.records_input("argilla ws/ds", [b, a])
    assert runs.records_input("argilla ws/ds", [a]) != runs.records_input("argilla ws/ds", [a, b])


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.jsonl: file not found"):
        runs.data_inputs(tmp_path / "nothing.jsonl")


# ----------------------------------------------------------------------------- --force on the command line


@dataclass
class Example:
    run: str = "default"
    use_peft: bool = True


@pytest.mark.parametrize(("argv", "force", "use_peft"), [
    ([], False, True), (["--force"], True, True), (["--force", "--use_peft", "false"], True, False),
    (["--force", "false"], False, True), (["--use_peft", "false", "--force=true"], True, False),
    (["--force", "yes"], True, True),
])
def test_force_is_parsed_in_the_shared_layer_and_is_no_config_key(argv, force, use_peft):
    parsed = parse_stage_config("x", (Example,), argv)
    (args,) = parsed
    assert parsed.force is force and args.use_peft is use_peft
    assert "force" not in resolved_config(*parsed)


def test_a_bad_force_value_or_a_force_key_in_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--force takes no value or true/false, got 'maybe'"):
        parse_stage_config("x", (Example,), ["--force=maybe"])
    path = tmp_path / "mine.yaml"
    path.write_text("force: true\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: 'force' is a command-line flag \(--force\), not a config key"):
        parse_stage_config("x", (Example,), ["--config", str(path)])


# ----------------------------------------------------------------------------- the real SFT stage, twice


@pytest.mark.slow  # stage processes
def test_sft_twice_skips_then_a_changed_key_retrains(runs_root, tiny_model_dir, tiny_data):
    common = ("--run", "skip-e2e", "--model_name_or_path", str(tiny_model_dir), "--train_file", str(tiny_data["sft"]),
              "--eval_file", str(tiny_data["prompts"]), "--per_device_train_batch_size", "4")
    first = run_stage("sft", *common, "--max_steps", "2")
    assert_ok(first)
    folder = runs_root / "skip-e2e" / "sft"
    before = snapshot(runs_root / "skip-e2e")

    again = run_stage("sft", *common, "--max_steps", "2")
    assert_ok(again)
    assert again.stdout.splitlines() == [f"[sft] up to date: {folder} (config, parents, data, code and versions "
                                         "unchanged; --force redoes it)"], again.stdout
    assert snapshot(runs_root / "skip-e2e") == before  # the manifest byte for byte, and every other file
    # no model was loaded (what makes it take seconds; a wall-clock comparison was flaky on a loaded machine)
    assert "Loading weights" in first.stderr and "Loading weights" not in again.stderr, again.stderr[-2000:]

    changed = run_stage("sft", *common, "--max_steps", "1")
    assert_ok(changed)
    assert changed.stdout.splitlines()[0] == "[sft] rerunning: config key max_steps 2 -> 1", changed.stdout
    manifest = (folder / runs.MANIFEST).read_bytes()
    assert json.loads(manifest)["metrics"]["train_steps"] == 1

    forced = run_stage("sft", *common, "--max_steps", "1", "--force")
    assert_ok(forced)
    assert forced.stdout.splitlines()[0] == "[sft] rerunning: --force (it was up to date)", forced.stdout
    assert "[sft] eval loss" in forced.stdout and (folder / runs.MANIFEST).read_bytes() != manifest
