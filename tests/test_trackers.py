"""Trackers (align/trackers.py): `report_to` parsed and checked before any model loads, one run per
stage named `<run>/<stage>` with the manifest's lineage, files under the stage's logs/.

Every tracker here is real and writes local files: TensorBoard events read back with TensorBoard's
own EventAccumulator, and wandb in offline mode (its wandb-core binary runs without network) whose
logs/wandb/offline-run-*/run-*.wandb transaction log is decoded with wandb's own protobuf schema
(`wandb.proto.wandb_internal_pb2.Record`). wandb 0.31 ships no Python reader for that file any more
(`wandb.sdk.internal.datastore` is gone; its Go core reads it), so `wandb_records` below unframes
it: the LevelDB log format that the core writes (a 7-byte header, then 32 KiB blocks of records,
each with a crc32, a length and a full/first/middle/last type).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest

from align import online, runs, trackers
from align.errors import ConfigError
from tests.conftest import assert_ok, run_stage

# ---- report_to: parsed and checked ----------------------------------------------------------------


@pytest.mark.parametrize("report_to, expected", [
    ("tensorboard", ("tensorboard",)),
    (["tensorboard", "wandb"], ("tensorboard", "wandb")),
    ("tensorboard,wandb", ("tensorboard", "wandb")),
    (["wandb", "wandb"], ("wandb",)),
    ("none", ()), (["none"], ()), ([], ()), (None, ()),
])
def test_report_to_names_the_trackers(report_to, expected):
    assert trackers.requested_trackers(report_to) == expected


def test_all_means_every_installed_tracker():
    assert trackers.requested_trackers("all") == ("tensorboard", "wandb")  # both are in requirements/ml.txt


def test_an_unknown_tracker_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^report_to: unknown tracker 'wandbb' \(did you mean 'wandb'\?\); "
                                          r"choose from tensorboard, wandb or none$"):
        trackers.requested_trackers(["tensorboard", "wandbb"])
    with pytest.raises(ConfigError, match=r"unknown tracker 'mlflow'"):  # a transformers integration we do not route
        trackers.requested_trackers("mlflow")


def test_none_cannot_be_combined_with_a_tracker():
    with pytest.raises(ConfigError, match=r"report_to: 'none' turns every tracker off; give it alone"):
        trackers.requested_trackers(["none", "wandb"])


def test_a_tracker_that_cannot_be_imported_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # Python's own "not importable" marker: import wandb fails
    with pytest.raises(ConfigError) as error:
        trackers.requested_trackers(["tensorboard", "wandb"])
    message = str(error.value)
    assert message.startswith("report_to: wandb is not usable here (import wandb: ")
    assert "pip install --no-deps -r requirements/ml.txt" in message and "\n" not in message


def test_report_to_takes_several_trackers_on_the_command_line():
    from trl import SFTConfig

    from align.config import parse_stage_config

    cpu = ["--use_cpu", "true", "--bf16", "false"]  # TRL's bf16 default needs an accelerator
    (config,) = parse_stage_config("no-such-stage", (SFTConfig,), [*cpu, "--report_to", "tensorboard", "wandb"])
    assert config.report_to == ["tensorboard", "wandb"]
    (config,) = parse_stage_config("no-such-stage", (SFTConfig,), [*cpu, "--report_to", "none"])
    assert trackers.requested_trackers(config.report_to) == ()


# ---- reading what the trackers wrote ----------------------------------------------------------------

WANDB_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version 0
WANDB_CHUNK = struct.Struct("<IHB")  # crc32 of type + data, length, type (1 full, 2 first, 3 middle, 4 last)
WANDB_BLOCK = 32 * 1024


def wandb_records(path: Path):
    """Every record of a .wandb transaction log, as wandb's own protobuf `Record`s (checksums checked)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert WANDB_HEADER.unpack_from(data) == (b":W&B", 0xBEE1, 0), f"{path}: not a wandb transaction log"
    offset, pending = WANDB_HEADER.size, b""
    while offset + WANDB_CHUNK.size <= len(data):
        left_in_block = WANDB_BLOCK - offset % WANDB_BLOCK
        checksum, length, kind = WANDB_CHUNK.unpack_from(data, offset)
        if left_in_block < WANDB_CHUNK.size or (length == 0 and kind == 0):  # block padding
            offset += left_in_block
            continue
        chunk = data[offset + WANDB_CHUNK.size: offset + WANDB_CHUNK.size + length]
        assert zlib.crc32(bytes([kind]) + chunk) == checksum, f"{path}: bad checksum at byte {offset}"
        offset += WANDB_CHUNK.size + length
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb_run(stage_folder: Path) -> dict:
    """The one offline wandb run under <stage>/logs/wandb: its name, group, job type, config and history rows."""
    (log,) = (stage_folder / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    assert log.stat().st_size > 0
    run, config, history, kind = None, {}, [], None
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({_item_key(item): json.loads(item.value_json) for item in run.config.update})
        elif kind == "config":
            config.update({_item_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append({_item_key(item): json.loads(item.value_json) for item in record.history.item})
    assert run is not None, f"{log}: no run record"
    assert kind == "exit", f"{log}: ends with a {kind} record, not the run's exit: the log is not closed"
    return {"name": run.display_name, "group": run.run_group, "job_type": run.job_type, "project": run.project,
            "config": config, "history": history, "folder": log.parent}


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} over every events file in `folder`, read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return scalars


def history_values(history: list[dict], key: str, axis: str) -> list[tuple[int, float]]:
    return [(row[axis], row[key]) for row in history if key in row]


# ---- the online loop's logging (DPO rounds, PPO updates) -------------------------------------------


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """A runs root of its own, and the environment the trackers set, restored afterwards."""
    monkeypatch.setenv("ALIGN_RUNS", str(tmp_path / "runs"))
    for name in ("WANDB_MODE", "WANDB_DIR", "TENSORBOARD_LOGGING_DIR", "WANDB_PROJECT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)  # absent, and put back as it was after the test
    return tmp_path / "runs"


def finished_parent(run: str) -> runs.Checkpoint:
    with runs.stage_output(run, "sft", {"built_by": "tests/test_trackers.py"}, 1):
        pass
    return runs.find_checkpoint(run, ["sft"])


def test_online_loop_logs_one_timeline_to_tensorboard_and_offline_wandb(tracker_env, tmp_path):
    data = tmp_path / "ranked.jsonl"
    data.write_text('{"example": 1}\n')
    parent = finished_parent("track")
    config = {"beta": 0.1, "report_to": ["tensorboard", "wandb"]}
    fingerprint = runs.stage_fingerprint("dpo", config, parents={"sft": parent}, inputs=runs.data_inputs(data))
    with runs.stage_output("track", "dpo", config, 7, parent=parent, fingerprint=fingerprint) as out:
        with trackers.open_trackers(("tensorboard", "wandb"), out, config) as tracked:
            assert os.environ["WANDB_MODE"] == "offline"  # no WANDB_MODE given: never the network
            steps = online.StepLogger(tracked)
            for round_index, offset in ((1, 0), (2, 2)):  # each round's trainer counts from step 1 again
                steps.start_round(round_index, offset)
                for step in (1, 2):
                    steps.log(step, {"loss": 1.0 / (offset + step), "learning_rate": 1e-4, "note": "text"})
                tracked.log("round", {"round": round_index, "pairs": 10 * round_index, "kind": "x"}, round_index,
                            skip=("round",))
            tracked.log("heldout_dpo", {"mean_reward": 0.5}, 0)  # step 0 after round 2: its own axis

    folder = tracker_env / "track" / "dpo"
    manifest = json.loads((folder / "manifest.json").read_text())
    wandb_run = read_wandb_run(folder)
    assert manifest["trackers"] == {"tensorboard": "logs/tensorboard",
                                    "wandb": str(wandb_run["folder"].relative_to(folder))}

    expected_loss = [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    scalars = tensorboard_scalars(folder / "logs" / "tensorboard")
    assert [(step, pytest.approx(value)) for step, value in expected_loss] == scalars["train/loss"]
    assert scalars["round/pairs"] == [(1, 10.0), (2, 20.0)] and "round/round" not in scalars
    assert scalars["heldout_dpo/mean_reward"] == [(0, 0.5)]

    assert (wandb_run["name"], wandb_run["group"], wandb_run["job_type"]) == ("track/dpo", "track", "dpo")
    assert wandb_run["project"] == "align"
    history = wandb_run["history"]
    assert history_values(history, "train/loss", "train/step") == [(s, pytest.approx(v)) for s, v in expected_loss]
    assert history_values(history, "round/pairs", "round/step") == [(1, 10), (2, 20)]
    assert history_values(history, "heldout_dpo/mean_reward", "heldout_dpo/step") == [(0, 0.5)]
    assert not any("train/note" in row or "round/kind" in row for row in history)  # numbers only

    lineage = wandb_run["config"]["lineage"]
    assert lineage["parents"] == {"sft": {"path": str(parent.folder), "manifest_sha256": parent.manifest_sha256}}
    assert lineage["inputs"] == runs.data_inputs(data) == {str(data): manifest["fingerprint"]["inputs"][str(data)]}
    assert lineage["seed"] == 7 and lineage["run"] == "track" and lineage["stage"] == "dpo"
    assert wandb_run["config"]["beta"] == 0.1


def test_a_failed_stage_closes_its_trackers_inside_the_failed_folder(tracker_env):
    with pytest.raises(RuntimeError, match="boom"):
        with runs.stage_output("crash", "ppo", {}, 1) as out:
            with trackers.open_trackers(("tensorboard", "wandb"), out, {}) as tracked:
                tracked.log("update", {"objective/kl": 0.25}, 1)
                raise RuntimeError("boom")
    (failed,) = (tracker_env / "crash").glob("ppo.failed-*")
    assert tensorboard_scalars(failed / "logs" / "tensorboard")["update/objective/kl"] == [(1, 0.25)]
    wandb_run = read_wandb_run(failed)
    assert wandb_run["name"] == "crash/ppo"
    assert history_values(wandb_run["history"], "update/objective/kl", "update/step") == [(1, 0.25)]
    assert not (tracker_env / "crash" / "ppo").exists()


def test_no_tracker_writes_no_tracker_files(tracker_env):
    with runs.stage_output("quiet", "ppo", {}, 1) as out:
        with trackers.open_trackers((), out, {}) as tracked:
            tracked.log("update", {"objective/kl": 0.25}, 1)
    folder = tracker_env / "quiet" / "ppo"
    assert sorted(path.name for path in (folder / "logs").iterdir()) == ["stage.log"]
    assert json.loads((folder / "manifest.json").read_text())["trackers"] == {}


# ---- a real stage ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_reports_to_tensorboard_and_wandb(runs_root, tiny_model_dir, tiny_data):
    """The trainer stage passes report_to through to transformers: TensorBoard's callback writes
    logs/tensorboard, and wandb's callback joins the run the stage opened (name, lineage)."""
    run = "tracked"
    result = run_stage(
        "sft", "--run", run, "--model_name_or_path", str(tiny_model_dir),
        "--train_file", str(tiny_data["sft"]), "--eval_file", str(tiny_data["prompts"]),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--report_to", "tensorboard", "wandb")
    assert_ok(result)
    folder = runs_root / run / "sft"
    manifest = json.loads((folder / "manifest.json").read_text())
    wandb_run = read_wandb_run(folder)
    final_folder = folder / wandb_run["folder"].relative_to(folder)
    assert f"[sft] wandb run {run}/sft (offline): {final_folder}; upload it with `wandb sync {final_folder}`" \
        in result.stdout

    losses = tensorboard_scalars(folder / "logs" / "tensorboard")["train/loss"]
    assert [step for step, _ in losses] == [1, 2]
    assert (wandb_run["name"], wandb_run["group"], wandb_run["job_type"]) == (f"{run}/sft", run, "sft")
    wandb_losses = history_values(wandb_run["history"], "train/loss", "train/global_step")
    assert wandb_losses == [(step, pytest.approx(value, rel=1e-5)) for step, value in losses]
    assert any("eval/loss" in row for row in wandb_run["history"])  # the evaluations before and after

    lineage = wandb_run["config"]["lineage"]
    hashes = {entry["path"]: entry["sha256"] for entry in manifest["inputs"]}
    assert {path: lineage["inputs"][path] for path in hashes} == hashes
    assert lineage["seed"] == manifest["seed"] == 42 and lineage["parents"] == {}
    assert wandb_run["config"]["report_to"] == ["tensorboard", "wandb"]  # the trainer's own args joined the run
    assert manifest["config"]["report_to"] == ["tensorboard", "wandb"]
