"""Stage outputs are atomic: finished folders are complete; crashed ones never look finished."""

import json

import pytest

from align import runs
from align.errors import LineageError


def test_complete_stage_is_renamed_with_manifest(runs_root):
    with runs.stage_output("atomic-ok", "sft", {"lr": 1}, seed=3) as out:
        assert out.path.name.startswith(".sft.tmp-")
        (out.path / "model").mkdir()
        print("hello from the stage")
        out.metrics["loss"] = 1.5
    final = runs_root / "atomic-ok" / "sft"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 3 and manifest["metrics"] == {"loss": 1.5}
    assert manifest["finished_at"] and manifest["versions"]["torch"]
    assert "hello from the stage" in (final / "logs" / "stage.log").read_text()
    assert runs.find_checkpoint("atomic-ok", ["sft"]).folder == final


def test_crash_leaves_failed_folder_and_keeps_previous_output(runs_root):
    with runs.stage_output("atomic-crash", "sft", {}, seed=0) as out:
        out.metrics["generation"] = 1
    with pytest.raises(RuntimeError):
        with runs.stage_output("atomic-crash", "sft", {}, seed=0) as out:
            out.metrics["generation"] = 2
            raise RuntimeError("boom")
    run_folder = runs_root / "atomic-crash"
    kept = json.loads((run_folder / "sft" / "manifest.json").read_text())
    assert kept["metrics"]["generation"] == 1, "a crash must not replace the previous finished output"
    (failed,) = run_folder.glob("sft.failed-*")
    failed_manifest = json.loads((failed / "manifest.json").read_text())
    assert failed_manifest["status"] == "failed" and "boom" in failed_manifest["error"]
    assert not list(run_folder.glob(".sft.tmp-*"))


def test_unfinished_parent_is_refused(runs_root):
    folder = runs_root / "half" / "sft"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "running"}))
    with pytest.raises(LineageError, match="status is 'running'"):
        runs.find_checkpoint("half", ["sft"])
    with pytest.raises(LineageError, match=r"no finished runs/nothing/sft.*make sft RUN=nothing"):
        runs.find_checkpoint("nothing", ["sft"])
