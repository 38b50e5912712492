"""Resume an interrupted stage from its last checkpoint: Trainer stages (sft, reward) from the
last saved step, DPO's on-policy rounds from the last finished round (`RoundCheckpoints`), PPO
from the last finished update (`UpdateCheckpoints`).

Where: runs/<run>/.<stage>.resume/, a folder whose name does not change with the process (the
stage's output goes to .<stage>.tmp-<pid> and is renamed into place only when whole, so a new
process could never find the old one's work there). It holds the Trainer's checkpoint-<step>/
folders (model or LoRA adapter, optimizer, scheduler, RNG states, trainer_state.json with the data
position), `save_total_limit` of them, written every `save_steps` (configs/<stage>.yaml), plus
fingerprint.json (what the checkpoints belong to) and before.json (numbers measured before
training, e.g. SFT's eval loss before: a resumed process must not measure them on a half-trained
model).

When:
  - every `save_steps` optimizer steps, by the Trainer;
  - at SIGTERM (a scheduler's pre-emption, `kill`, make's ^C): the step in progress ends, a
    checkpoint is saved, and the stage fails with exit 143 saying how to resume. A second SIGTERM
    stops at once (the SystemExit of align/console.py). Under several processes the ranks agree
    on the stop at every step end (one tiny all-reduce), so they save the same step together.
  - kill -9 or a power cut: the newest *complete* checkpoint stays (HF writes trainer_state.json
    last; a folder without it was cut mid-save and is deleted).

Rerun the same command: the stage's fingerprint (align/runs.py: config, parents, data, code,
versions) must equal the one the checkpoints were made under; then it prints "resumed at step k
of n" (or "0 steps left") and the manifest records `resumed`. A changed fingerprint or --force
discards them with one line. A finished stage deletes the folder.

Hand-written around the HF Trainer's own checkpointing (`resume_from_checkpoint`) because the
Trainer alone resumes only when told which folder to use, keeps no record of what the checkpoint
was made for, and has no stop-at-signal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from align import processes
from align.files import atomic_write_json

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = "weights.safetensors"  # DPO rounds: the adapter or the model
UPDATER_STATE = "updater.pt"  # PPO updates: PPOUpdater.state_dict()
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint (transformers' _save_checkpoint)
INTERRUPTED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process that SIGTERM ended


def resume_dir(run_folder: Path, stage: str) -> Path:
    return Path(run_folder) / f".{stage}.resume"


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """[(step, path)] of the checkpoints whose trainer_state.json exists, oldest first."""
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        match = CHECKPOINT.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_incomplete_checkpoints(folder: Path) -> list[str]:
    """Delete checkpoint folders cut mid-save (no trainer_state.json); their names."""
    complete = {path for _, path in complete_checkpoints(folder)}
    cut = [path for path in folder.glob("checkpoint-*") if path.is_dir() and path not in complete]
    for path in cut:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(path.name for path in cut)


def _fingerprint_sha(fingerprint: dict) -> str:
    from align.runs import _canonical_sha256

    return _canonical_sha256(fingerprint)


class ResumeFolder:
    """The resume folder of one stage run, tied to the stage's fingerprint. Create it inside
    `runs.stage_output` (on every rank) and call `finish` once the stage's output is in place."""

    def __init__(self, out, fingerprint: dict, force: bool):
        self.out, self.stage = out, out.stage
        self.folder = resume_dir(out.path.parent, out.stage)
        self.sha = _fingerprint_sha(fingerprint)
        self.signalled = False
        if out.is_main:
            self._prepare(force)
        processes.barrier()  # every rank sees the prepared folder before reading it
        self.before = self._read("before.json")

    def _prepare(self, force: bool) -> None:
        recorded = self._read("fingerprint.json").get("sha256")
        has_checkpoints = any(self.folder.glob("checkpoint-*")) or any(self.folder.glob("round-*"))
        if recorded != self.sha or force:
            if has_checkpoints:
                why = "--force" if force and recorded == self.sha else "they were made with a different config, " \
                      "parent, data, code or versions"
                print(f"[{self.stage}] discarding the checkpoints in {self.folder}: {why}", flush=True)
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        cut = remove_incomplete_checkpoints(self.folder)
        if cut:
            print(f"[{self.stage}] deleted {', '.join(cut)} in {self.folder}: cut off while being saved", flush=True)
        atomic_write_json(self.folder / "fingerprint.json", {"sha256": self.sha})

    def _read(self, name: str) -> dict:
        path = self.folder / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def remember(self, key: str, measure):
        """`measure()` once per stage run: a resumed process gets the value the first one measured
        (every rank calls this: measure() may be a collective such as trainer.evaluate())."""
        if key in self.before:
            return self.before[key]
        value = measure()
        self.before[key] = value
        if self.out.is_main:
            atomic_write_json(self.folder / "before.json", self.before)
        return value

    def finish(self) -> None:
        """The stage's output is in place: its checkpoints are not needed any more."""
        if self.out.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)


class TrainerCheckpoints(ResumeFolder):
    """A Trainer stage's checkpoints: pass `folder` to `training.fit_to_hardware`, measure
    pre-training numbers with `remember`, train with `train`."""

    def latest(self) -> tuple[int, Path] | None:
        found = complete_checkpoints(self.folder)
        return found[-1] if found else None

    def train(self, trainer, replay=None):
        """trainer.train(), from the newest checkpoint when there is one; stops and saves at SIGTERM.

        replay: called with the checkpoint's log history before a resumed run trains, for loggers
        that see only the steps logged in this process (the DPO stage's one-timeline StepLogger)."""
        latest = self.latest()
        if latest is not None:
            step, path = latest
            saved = json.loads((path / TRAINER_STATE).read_text())
            total = saved.get("max_steps")
            if replay is not None:
                replay([row for row in saved.get("log_history", []) if "step" in row])
            left = "; 0 steps left" if total is not None and step >= total else ""
            self.out.say(f"[{self.stage}] resumed at step {step} of {total}{left} from {path}")
            self.out.set(resumed={"from_step": step, "of_steps": total, "checkpoint": path.name})
        trainer.add_callback(_StopAtSignal(self))
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            result = trainer.train(resume_from_checkpoint=str(latest[1]) if latest else None)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if self.signalled:  # stage_output keeps the partial output as <stage>.failed-*; the checkpoint stays here
            state = trainer.state
            print(f"[{self.stage}] stopped by SIGTERM at step {state.global_step} of {state.max_steps}; checkpoint "
                  f"saved in {self.folder}; run the same command to resume", file=sys.stderr, flush=True)
            raise SystemExit(INTERRUPTED_EXIT)
        return result

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True
        signal.signal(signal.SIGTERM, _exit_now)  # a second SIGTERM does not wait for the step to end



class LoopCheckpoints(ResumeFolder):
    """An online loop's checkpoint after each finished round or update: `<unit>-<k>/` holding
    state.json (the rows so far, what the stage adds), the policy's weights (the subclass writes
    them) and the files the units wrote so far (their samples), each written whole or not at all (a
    temporary folder renamed into place). Only the newest is kept. A rerun goes on after it; the
    unit that was killed is lost."""

    unit = "unit"

    def _prepare(self, force: bool) -> None:
        super()._prepare(force)
        for cut in self.folder.glob(f".{self.unit}-*.tmp"):  # a save cut off by a kill
            shutil.rmtree(cut, ignore_errors=True)

    def _saved(self) -> list[tuple[int, Path]]:
        pattern = re.compile(rf"^{self.unit}-(\d+)$")
        return sorted((int(match.group(1)), path) for path in self.folder.glob(f"{self.unit}-*")
                      if (match := pattern.match(path.name)) and (path / "state.json").is_file())

    def latest(self) -> tuple[int, Path] | None:
        saved = self._saved()
        return saved[-1] if saved else None

    def _save(self, number: int, state: dict, write_weights, files: list[Path]) -> None:
        if not self.out.is_main:
            return
        tmp = self.folder / f".{self.unit}-{number}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = write_weights(tmp)
        for path in files:
            shutil.copy2(path, tmp / path.name)
        atomic_write_json(tmp / "state.json", {self.unit: number, "weights": weights,
                                               "files": [path.name for path in files], **state})
        os.replace(tmp, self.folder / f"{self.unit}-{number}")
        for older, path in self._saved():
            if older < number:
                shutil.rmtree(path, ignore_errors=True)

    def _restore(self, files_folder: Path, total: int) -> tuple[dict, Path] | None:
        """(state, checkpoint folder) of the newest checkpoint, its files copied to `files_folder`;
        None when there is none. Says so in one line and records `resumed` in the manifest."""
        latest = self.latest()
        if latest is None:
            return None
        number, folder = latest
        state = json.loads((folder / "state.json").read_text())
        if self.out.is_main:
            files_folder.mkdir(parents=True, exist_ok=True)
            for name in state["files"]:
                shutil.copy2(folder / name, files_folder / name)
        left = "; 0 left" if number >= total else ""
        self.out.say(f"[{self.stage}] resumed after {self.unit} {number} of {total} from {folder}{left}")
        self.out.set(resumed={f"after_{self.unit}": number, f"of_{self.unit}s": total, "checkpoint": folder.name})
        return state, folder


class RoundCheckpoints(LoopCheckpoints):
    """DPO's on-policy rounds: the LoRA adapter (or the whole model with `use_peft: false`), the
    round and step rows, every round's samples and pairs files. The held-out SFT samples are drawn
    again on resume (seeded: the same samples); rounds are seeded per round, so the rounds after
    the kill sample what the uninterrupted run did."""

    unit = "round"

    def save_round(self, number: int, trainer, state: dict, files: list[Path]) -> None:
        from safetensors.torch import save_file, save_model

        def write_weights(folder: Path) -> str | None:
            if trainer.adapter_state is not None:
                save_file({key: value.contiguous() for key, value in trainer.adapter_state.items()}, folder / WEIGHTS)
                return "adapter"
            if trainer.peft_config is None and trainer.steps > 0:
                save_model(trainer.model, str(folder / WEIGHTS))  # handles tied embeddings
                return "model"
            return None  # nothing trained yet: the policy is still the SFT model

        self._save(number, {"steps": trainer.steps, **state}, write_weights, files)

    def restore(self, trainer, rounds_folder: Path, total_rounds: int) -> dict | None:
        """Put the newest round's policy into `trainer` and its files into `rounds_folder`; its
        state ({round, steps, ...what save_round was given}), or None when there is none."""
        restored = self._restore(rounds_folder, total_rounds)
        if restored is None:
            return None
        state, folder = restored
        from safetensors.torch import load_file, load_model

        if state["weights"] == "adapter":
            trainer.restore_adapter(load_file(folder / WEIGHTS), state["steps"])
        elif state["weights"] == "model":
            load_model(trainer.model, str(folder / WEIGHTS))
            trainer.steps = state["steps"]
        return state


class UpdateCheckpoints(LoopCheckpoints):
    """PPO's updates: the updater's state (trainable policy and critic weights, both optimizers,
    the epoch-order RNG: `PPOUpdater.state_dict`) in updater.pt, the update, step and push-check
    rows and the KL coefficient in state.json, every update's rollout samples. Rollouts are seeded
    per update, so a resumed run samples what an uninterrupted one would."""

    unit = "update"

    def save_update(self, number: int, updater, state: dict, files: list[Path]) -> None:
        import torch

        def write_weights(folder: Path) -> str:
            torch.save(updater.state_dict(), folder / UPDATER_STATE)
            return "updater"

        self._save(number, state, write_weights, files)

    def restore(self, updater, rollouts_folder: Path, total_updates: int) -> dict | None:
        restored = self._restore(rollouts_folder, total_updates)
        if restored is None:
            return None
        state, folder = restored
        import torch

        updater.load_state_dict(torch.load(folder / UPDATER_STATE, weights_only=True))
        return state


def _all_agree(flag: bool) -> bool:
    """True on every rank when any rank's flag is True (a no-op in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    import torch

    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _exit_now(signum, frame) -> None:
    sys.exit(INTERRUPTED_EXIT)


class _StopAtSignal(TrainerCallback):
    """At a step's end after SIGTERM: save a checkpoint now and stop training."""

    def __init__(self, checkpoints: TrainerCheckpoints):
        self.checkpoints = checkpoints

    def on_step_end(self, args, state, control, **kwargs):
        if _all_agree(self.checkpoints.signalled):
            self.checkpoints.signalled = True
            control.should_save = True
            control.should_training_stop = True
        return control
