"""Experiment trackers: which ones a stage reports to (`report_to`), and one run of each per stage.

`report_to` is the user's choice in every training stage (sft, reward, dpo, ppo): `tensorboard`
(the default, in configs/<stage>.yaml), `wandb`, both, or `none`. `requested_trackers` checks it
right after the config is parsed, before any model loads: an unknown name, or a tracker that is
not installed (or is installed without a dependency it imports), is one ConfigError line.

`open_trackers(names, out)` opens each tracker once per stage and logs to all of them:

    tensorboard  a SummaryWriter in <stage>/logs/tensorboard (TENSORBOARD_LOGGING_DIR points
                 transformers' TensorBoardCallback there too)
    wandb        one run named `<run>/<stage>` (group `<run>`, job_type `<stage>`), whose config is
                 the stage's resolved config plus its lineage (parents with their manifest sha256,
                 seed, data hashes, git commit); its files go to <stage>/logs/wandb, inside the
                 stage's atomic output. Offline unless the user sets WANDB_MODE: the pipeline runs
                 without network by default (HF_HUB_OFFLINE=1), and an online run without a key
                 would stop to ask for one. `wandb sync <stage>/logs/wandb/offline-run-*` uploads it.

Trainer stages (sft, reward) pass `report_to` through to transformers, whose WandbCallback joins
the run opened here (it only creates one when none is active), so the run has our name and lineage.
Online loops (DPO rounds, PPO updates) log their own scalars with `Trackers.log`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import os
from pathlib import Path

from align.errors import ConfigError

# tracker name -> the module a stage imports for it (what must be installed)
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}
NO_TRACKER = "none"
EVERY_INSTALLED = "all"  # transformers' word for every installed integration
WANDB_PROJECT = "align"  # unless WANDB_PROJECT says otherwise


def requested_trackers(report_to) -> tuple[str, ...]:
    """The trackers `report_to` names (a name, a list, comma-separated names, `none` or `all`), each
    known and importable; () for none. Raises ConfigError naming the key otherwise."""
    names = _split_names(report_to)
    if not names or names == [NO_TRACKER]:
        return ()
    if NO_TRACKER in names:
        raise ConfigError(f"report_to: {NO_TRACKER!r} turns every tracker off; give it alone, got {names}")
    if names == [EVERY_INSTALLED]:
        return tuple(name for name in TRACKER_MODULES if _import_problem(name) is None)
    for name in names:
        if name not in TRACKER_MODULES:
            raise ConfigError(f"report_to: unknown tracker {name!r}{_closest(name)}; choose from "
                              f"{', '.join(TRACKER_MODULES)} or {NO_TRACKER}")
        problem = _import_problem(name)
        if problem is not None:
            raise ConfigError(f"report_to: {name} is not usable here ({problem}); install it with "
                              f"`.venv/bin/pip install --no-deps -r requirements/ml.txt` (the lock pins it and "
                              f"its dependencies), or drop it from report_to")
    return tuple(dict.fromkeys(names))


def _split_names(report_to) -> list[str]:
    if report_to is None:
        return []
    values = [report_to] if isinstance(report_to, str) else list(report_to)
    return [name.strip() for value in values for name in str(value).split(",") if name.strip()]


def _closest(name: str) -> str:
    close = difflib.get_close_matches(name, list(TRACKER_MODULES), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _import_problem(name: str) -> str | None:
    """Why the tracker's module cannot be imported, or None. A real import, not a lookup: a tracker
    installed with --no-deps but missing a dependency fails here, not mid-stage."""
    try:
        importlib.import_module(TRACKER_MODULES[name])
    except ImportError as error:
        return f"import {TRACKER_MODULES[name]}: {error}"
    return None


def stage_lineage(out) -> dict:
    """What the stage's manifest says it came from: parents (folder + manifest sha256), data hashes, seed, code."""
    manifest = out.manifest
    fingerprint = manifest.get("fingerprint") or {}
    parents = fingerprint.get("parents") or ({"parent": manifest["parent"]} if manifest.get("parent") else {})
    return {"run": out.run, "stage": out.stage, "seed": manifest.get("seed"), "parents": parents,
            "inputs": fingerprint.get("inputs", {}), "git": manifest.get("git"), "versions": manifest.get("versions")}


def run_name(out) -> str:
    return f"{out.run}/{out.stage}"


class TensorBoardTracker:
    def __init__(self, out):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path("logs/tensorboard")  # relative to the stage folder, as WandbTracker.folder
        self.writer = SummaryWriter(log_dir=str(out.path / self.folder))
        self.writer.add_text("lineage", f"```\n{json.dumps(stage_lineage(out), indent=1, default=str)}\n```")

    def log(self, prefix: str, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """One wandb run per stage. Each prefix (train, round, update, heldout_*) gets its own x-axis
    (`<prefix>/step`, wandb's define_metric): wandb drops a step lower than one it has seen, and
    the held-out numbers (step 0) come after the last round."""

    def __init__(self, out, config: dict):
        os.environ.setdefault("WANDB_MODE", "offline")  # see the module docstring
        os.environ["WANDB_DIR"] = str(out.logs_dir)  # anything of wandb's that reads it, e.g. transformers'
        import wandb

        self.out, self.axes = out, set()
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=run_name(out), group=out.run,
            job_type=out.stage, dir=str(out.logs_dir), config={**config, "lineage": stage_lineage(out)},
            # console off: logs/stage.log already holds everything printed; quiet: its closing banner
            # names the temporary folder, so the stage prints the final one instead
            settings=wandb.Settings(console="off", quiet=True))

    @property
    def folder(self) -> Path:
        """The run's files, relative to the stage folder (logs/wandb/offline-run-...)."""
        return Path(self.run.settings.sync_dir).relative_to(self.out.path)

    def log(self, prefix: str, values: dict, step: int) -> None:
        if prefix not in self.axes:
            self.run.define_metric(f"{prefix}/step")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.axes.add(prefix)
        self.run.log({**{f"{prefix}/{key}": value for key, value in values.items()}, f"{prefix}/step": step})

    def close(self, failed: bool) -> None:
        from align.runs import stage_dir

        final = stage_dir(self.out.run, self.out.stage) / self.folder  # where it is once the stage is renamed
        self.run.finish(exit_code=1 if failed else 0)
        # finish() only *tells* wandb-core the run is over (a publish, no reply): the core closes
        # the run's .wandb log later, and until then the file can hold little more than its header.
        # teardown waits for the core to exit, so the log is whole before the stage folder is
        # renamed into place (the next wandb.init in this process starts a new core).
        import wandb

        wandb.teardown(exit_code=1 if failed else 0)
        if failed:  # the stage's own line names the <stage>.failed-* folder that keeps it
            return
        mode = os.environ["WANDB_MODE"]
        upload = f"; upload it with `wandb sync {final}`" if mode == "offline" else ""
        print(f"[{self.out.stage}] wandb run {run_name(self.out)} ({mode}): {final}{upload}", flush=True)


class Trackers:
    """The trackers a stage opened; `log` sends one set of scalars to every one of them."""

    def __init__(self, backends: dict):
        self.backends = backends

    def log(self, prefix: str, values: dict, step: int, skip: tuple[str, ...] = ()) -> None:
        """Every number of `values` as `prefix/<key>` at `step` (strings and lists are left out)."""
        numbers = {key: value for key, value in values.items() if isinstance(value, (int, float)) and key not in skip}
        for backend in self.backends.values():
            backend.log(prefix, numbers, step)

    def locations(self) -> dict:
        """{tracker: its files, relative to the stage folder}, for the manifest."""
        return {name: str(backend.folder) for name, backend in self.backends.items()}


@contextlib.contextmanager
def open_trackers(names: tuple[str, ...], out, config: dict, trainer_writes_tensorboard: bool = False):
    """Open the trackers `names` (from `requested_trackers`) for the stage output `out` and close them
    on the way out, before the stage folder is renamed into place, so their files are part of it.

    trainer_writes_tensorboard: the stage's transformers Trainer reports to TensorBoard itself
    (report_to passed through); we only point it at logs/tensorboard and open no second writer."""
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out.logs_dir / "tensorboard")  # transformers' TensorBoardCallback
    backends: dict = {}
    # Only the main process opens runs (the trainer's callbacks also write from rank 0 only).
    if "tensorboard" in names and not trainer_writes_tensorboard and out.is_main:
        backends["tensorboard"] = TensorBoardTracker(out)
    if "wandb" in names and out.is_main:
        backends["wandb"] = WandbTracker(out, config)
    trackers = Trackers(backends)
    trainer_files = {"tensorboard": "logs/tensorboard"} if "tensorboard" in names else {}
    out.set(trackers={**trainer_files, **trackers.locations()})
    failed = True
    try:
        yield trackers
        failed = False
    finally:  # a failed stage closes its runs as failed; its folder is kept as <stage>.failed-*
        for backend in backends.values():
            backend.close(failed)
