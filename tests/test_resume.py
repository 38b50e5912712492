"""Resume (align/resume.py): a Trainer stage killed mid-training (kill -9) or stopped (SIGTERM)
resumes from its last checkpoint when the same command runs again, and ends as an uninterrupted
run would. Real stage processes on the tiny model, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align import resume, runs
from tests.conftest import REPO, assert_ok, run_stage

# ---- the resume folder, without a model -----------------------------------------------------------


def make_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "optimizer.pt").write_bytes(b"x")
    if complete:
        (path / resume.TRAINER_STATE).write_text(json.dumps({"global_step": step, "max_steps": 30}))
    return path


def test_only_checkpoints_with_their_trainer_state_count(tmp_path):
    make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 15, complete=False)  # cut off by a kill while saving
    (tmp_path / "checkpoint-x").mkdir()
    assert [step for step, _ in resume.complete_checkpoints(tmp_path)] == [5, 10]
    assert resume.remove_incomplete_checkpoints(tmp_path) == ["checkpoint-15", "checkpoint-x"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-5"]


@pytest.fixture
def runs_of_my_own(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def open_checkpoints(fingerprint: dict, force: bool = False, measured: list | None = None):
    """A TrainerCheckpoints of run `r`, stage `sft`, inside a stage output that then fails
    (as a killed stage's would: nothing is renamed into place)."""
    with pytest.raises(RuntimeError, match="killed"):
        with runs.stage_output("r", "sft", {"lr": 1}, 1, fingerprint=fingerprint) as out:
            checkpoints = resume.TrainerCheckpoints(out, fingerprint, force)
            value = checkpoints.remember("eval_loss_before", lambda: (measured.append(1), 2.5)[1])
            raise RuntimeError("killed")
    return checkpoints, value


def test_same_fingerprint_keeps_checkpoints_and_what_was_measured_before(runs_of_my_own, capsys):
    measured = []
    checkpoints, value = open_checkpoints({"config_sha256": "a"}, measured=measured)
    make_checkpoint(checkpoints.folder, 10)
    make_checkpoint(checkpoints.folder, 20, complete=False)
    again, value_again = open_checkpoints({"config_sha256": "a"}, measured=measured)
    assert again.folder == runs_of_my_own / "r" / ".sft.resume" == checkpoints.folder  # no pid in the name
    assert again.latest()[0] == 10 and (value, value_again, len(measured)) == (2.5, 2.5, 1)
    assert "deleted checkpoint-20 in" in capsys.readouterr().out


def test_a_changed_fingerprint_or_force_discards_them_with_one_line(runs_of_my_own, capsys):
    checkpoints, _ = open_checkpoints({"config_sha256": "a"}, measured=[])
    make_checkpoint(checkpoints.folder, 10)
    changed, _ = open_checkpoints({"config_sha256": "b"}, measured=[])
    assert changed.latest() is None
    assert "discarding the checkpoints in" in capsys.readouterr().out
    make_checkpoint(changed.folder, 10)
    forced, _ = open_checkpoints({"config_sha256": "b"}, force=True, measured=[])
    assert forced.latest() is None and "discarding the checkpoints in" in capsys.readouterr().out
    assert json.loads((forced.folder / "fingerprint.json").read_text())["sha256"] == forced.sha


def test_checkpoint_keys_do_not_change_the_fingerprint():
    config = {"learning_rate": 1e-4, "save_steps": 20, "save_strategy": "steps", "save_total_limit": 1}
    other = {**config, "save_steps": 5, "save_total_limit": 3}
    assert runs.comparable_config(config) == runs.comparable_config(other) == {"learning_rate": 1e-4}


# ---- real stage processes --------------------------------------------------------------------------


def start_stage(stage: str, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"stages.{stage}", *args], cwd=REPO, env=dict(os.environ),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_checkpoint(folder: Path, process: subprocess.Popen, log: Path, at_least: int) -> int:
    """The step of the first complete checkpoint >= at_least, while `process` is still training."""
    deadline = time.time() + 600
    while time.time() < deadline:
        steps = [step for step, _ in resume.complete_checkpoints(folder) if step >= at_least]
        if steps:
            return steps[0]
        assert process.poll() is None, f"the stage ended (exit {process.returncode}) before a checkpoint:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint >= {at_least} in {folder} after 600 s")


def kill_when(process: subprocess.Popen, log: Path, ready) -> None:
    """SIGKILL `process` as soon as `ready()` holds (it must still be running then)."""
    deadline = time.time() + 600
    while not ready():
        assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def sft_args(run: str, tiny_model_dir, tiny_data) -> list[str]:
    return ["--run", run, "--model_name_or_path", str(tiny_model_dir), "--train_file", str(tiny_data["sft"]),
            "--eval_file", str(tiny_data["prompts"]), "--max_steps", "60", "--per_device_train_batch_size", "4",
            "--logging_steps", "1", "--save_steps", "5", "--report_to", "none"]


@pytest.mark.slow
def test_reward_killed_with_sigkill_resumes(runs_root, tiny_sft_run, tiny_data, tmp_path):
    run = "reward-killed"
    args = ["--run", run, "--sft_dir", str(runs_root / tiny_sft_run / "sft"), "--ranked_files", str(tiny_data["ranked"]),
            "--num_train_epochs", "25", "--save_steps", "4", "--logging_steps", "1", "--report_to", "none"]
    log = tmp_path / "first.log"
    process = start_stage("reward", args, log)
    folder = resume.resume_dir(runs_root / run, "reward")
    wait_for_checkpoint(folder, process, log, at_least=8)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (runs_root / run / "reward").exists()
    killed_at = resume.complete_checkpoints(folder)[-1][0]
    result = run_stage("reward", *args)
    assert_ok(result)
    manifest = json.loads((runs_root / run / "reward" / "manifest.json").read_text())
    assert f"[reward] resumed at step {killed_at} of {manifest['metrics']['train_steps']} from" in result.stdout
    assert manifest["resumed"]["from_step"] == killed_at and manifest["metrics"]["gate_passed"] is not None
    assert [step for step, _ in manifest["metrics"]["loss_curve"]] == list(range(1, manifest["metrics"]["train_steps"] + 1))
    assert not folder.exists()


@pytest.mark.slow
def test_sft_killed_with_sigkill_resumes_and_ends_as_an_uninterrupted_run(runs_root, tiny_model_dir, tiny_data,
                                                                           tmp_path):
    args = sft_args("killed", tiny_model_dir, tiny_data)
    log = tmp_path / "first.log"
    process = start_stage("sft", args, log)
    folder = resume.resume_dir(runs_root / "killed", "sft")
    wait_for_checkpoint(folder, process, log, at_least=10)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (runs_root / "killed" / "sft").exists()  # nothing looks finished
    killed_at = resume.complete_checkpoints(folder)[-1][0]
    assert 10 <= killed_at < 60

    result = run_stage("sft", *args)
    assert_ok(result)
    assert f"[sft] resumed at step {killed_at} of 60 from {folder / f'checkpoint-{killed_at}'}" in result.stdout
    resumed = json.loads((runs_root / "killed" / "sft" / "manifest.json").read_text())
    assert resumed["resumed"] == {"from_step": killed_at, "of_steps": 60, "checkpoint": f"checkpoint-{killed_at}"}
    assert resumed["metrics"]["train_steps"] == 60 and not folder.exists()  # the finished stage cleans up

    assert_ok(run_stage("sft", *sft_args("whole", tiny_model_dir, tiny_data)))
    whole = json.loads((runs_root / "whole" / "sft" / "manifest.json").read_text())
    assert "resumed" not in whole
    # the same steps, the same losses: data position, optimizer, scheduler and RNG all came back
    assert [step for step, _ in resumed["metrics"]["loss_curve"]] == list(range(1, 61))
    for (step, loss), (_, loss_whole) in zip(resumed["metrics"]["loss_curve"], whole["metrics"]["loss_curve"]):
        assert loss == pytest.approx(loss_whole, rel=1e-3, abs=1e-3), f"step {step}"
    for key in ("eval_loss_before", "eval_loss_after"):  # before: measured once, by the killed process
        assert resumed["metrics"][key] == pytest.approx(whole["metrics"][key], rel=1e-4), key


@pytest.mark.slow
def test_reward_stopped_by_sigterm_saves_that_step_and_resumes_there(runs_root, tiny_sft_run, tiny_data, tmp_path):
    run = "sigterm"
    args = ["--run", run, "--sft_dir", str(runs_root / tiny_sft_run / "sft"), "--ranked_files", str(tiny_data["ranked"]),
            "--num_train_epochs", "25", "--save_steps", "3", "--logging_steps", "1", "--report_to", "none"]
    log = tmp_path / "first.log"
    process = start_stage("reward", args, log)
    scratch = resume.resume_dir(runs_root / run, "reward")
    wait_for_checkpoint(scratch, process, log, at_least=3)  # training is under way
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == resume.INTERRUPTED_EXIT, log.read_text()[-3000:]
    stopped = re.search(r"\[reward\] stopped by SIGTERM at step (\d+) of (\d+); checkpoint saved in (\S+); "
                        r"run the same command to resume", log.read_text())
    assert stopped, log.read_text()[-3000:]
    step, total = int(stopped.group(1)), int(stopped.group(2))
    assert stopped.group(3) == str(scratch) and resume.complete_checkpoints(scratch)[-1][0] == step
    assert 3 <= step < total
    assert not (runs_root / run / "reward").exists()
    (failed,) = (runs_root / run).glob("reward.failed-*")
    assert json.loads((failed / "manifest.json").read_text())["status"] == "failed"

    result = run_stage("reward", *args)
    assert_ok(result)
    assert f"[reward] resumed at step {step} of {total} from" in result.stdout
    manifest = json.loads((runs_root / run / "reward" / "manifest.json").read_text())
    assert manifest["resumed"]["from_step"] == step and manifest["metrics"]["train_steps"] == total
    assert not scratch.exists()


@pytest.mark.slow
def test_on_policy_dpo_killed_after_a_round_goes_on_after_it(runs_root, cold_dry, tmp_path):
    from tests.test_dpo import DPO_ARGS

    run, parent = "dpo-killed", runs_root / cold_dry["run"]
    args = ["--run", run, "--sft_dir", str(parent / "sft"), "--reward_dir", str(parent / "reward"), "--rounds", "3",
            "--ranked_files", str(cold_dry["ranked"]), "--eval_file", str(cold_dry["prompts"]), *DPO_ARGS,
            "--truncated_answers", "keep", "--prompts_per_round", "8", "--report_to", "tensorboard"]
    log = tmp_path / "first.log"
    process = start_stage("dpo", args, log)
    folder = resume.resume_dir(runs_root / run, "dpo")
    kill_when(process, log, lambda: (folder / "round-1" / "state.json").is_file())
    assert not (runs_root / run / "dpo").exists()
    done, checkpoint = max((int(path.name.split("-")[1]), path) for path in folder.glob("round-*")
                           if (path / "state.json").is_file())
    saved = json.loads((checkpoint / "state.json").read_text())
    assert saved["weights"] == "adapter" and [row["round"] for row in saved["rows"]] == list(range(1, done + 1))

    result = run_stage("dpo", *args)
    assert_ok(result)
    assert f"[dpo] resumed after round {done} of 3 from {checkpoint}" in result.stdout
    output = runs_root / run / "dpo"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["resumed"] == {"after_round": done, "of_rounds": 3, "checkpoint": f"round-{done}"}
    rounds = manifest["metrics"]["rounds"]
    assert [row["round"] for row in rounds] == [1, 2, 3]
    assert rounds[:done] == saved["rows"]  # the finished rounds were kept, not redone
    if done < 3:  # the next round sampled the restored policy, not the SFT model: it has moved away
        assert rounds[done]["fresh_kl"] > 0
    for number in (1, 2, 3):  # every round's samples and pairs are in the output, the restored ones too
        assert (output / "rounds" / f"round-{number}-samples.jsonl").is_file()
    steps = [json.loads(line)["step"] for line in (output / "logs" / "steps.jsonl").read_text().splitlines()]
    # one timeline (a round's trainer logs its closing summary at its last step, so a step can repeat)
    assert steps == sorted(steps) and set(steps) == set(range(1, manifest["metrics"]["train_steps"] + 1))
    assert not folder.exists()
    # rounds are seeded per round and the adapter came back whole: an uninterrupted run samples the
    # same answers in every round, the rounds after the kill included
    whole_args = [*args]
    whole_args[whole_args.index(run)] = "dpo-whole"
    assert_ok(run_stage("dpo", *whole_args))
    for number in (1, 2, 3):
        name = f"round-{number}-samples.jsonl"
        resumed = [json.loads(line)["response"] for line in (output / "rounds" / name).read_text().splitlines()]
        whole = [json.loads(line)["response"] for line in
                 (runs_root / "dpo-whole" / "dpo" / "rounds" / name).read_text().splitlines()]
        assert resumed == whole, number


@pytest.mark.slow
def test_ppo_killed_after_an_update_goes_on_exactly_as_an_uninterrupted_run(runs_root, cold_dry, tmp_path):
    from tests.test_ppo_stage import PPO_ARGS

    parent = runs_root / cold_dry["run"]

    def args(run: str) -> list[str]:  # the default critic-only first update, so the kill falls right after it
        return ["--run", run, "--sft_dir", str(parent / "sft"), "--reward_dir", str(parent / "reward"),
                "--ranked_files", str(cold_dry["ranked"]), "--eval_file", str(cold_dry["prompts"]), *PPO_ARGS,
                "--critic_warmup_updates", "1"]

    log = tmp_path / "first.log"
    process = start_stage("ppo", args("ppo-killed"), log)
    folder = resume.resume_dir(runs_root / "ppo-killed", "ppo")
    kill_when(process, log, lambda: (folder / "update-1" / "state.json").is_file())
    assert not (runs_root / "ppo-killed" / "ppo").exists()
    done, checkpoint = max((int(path.name.split("-")[1]), path) for path in folder.glob("update-*")
                           if (path / "state.json").is_file())
    assert done < 3, "the run finished before it was killed"

    result = run_stage("ppo", *args("ppo-killed"))
    assert_ok(result)
    assert f"[ppo] resumed after update {done} of 3 from {checkpoint}" in result.stdout
    output = runs_root / "ppo-killed" / "ppo"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["resumed"] == {"after_update": done, "of_updates": 3, "checkpoint": f"update-{done}"}
    for number in (1, 2, 3):
        assert (output / "rollouts" / f"update-{number}-samples.jsonl").is_file()
    assert not folder.exists()

    assert_ok(run_stage("ppo", *args("ppo-whole")))
    whole = json.loads((runs_root / "ppo-whole" / "ppo" / "manifest.json").read_text())
    # Rollouts are seeded per update and the updater's weights, optimizers and RNG came back: the
    # updates after the kill are the uninterrupted run's, number for number.
    for resumed_row, whole_row in zip(manifest["metrics"]["updates"], whole["metrics"]["updates"], strict=True):
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg",
                    "kl_coef"):
            assert resumed_row[key] == pytest.approx(whole_row[key], rel=1e-4, abs=1e-5), (resumed_row["update"], key)
    assert manifest["metrics"]["train_steps"] == whole["metrics"]["train_steps"]
    assert manifest["metrics"]["mean_reward_ppo"] == pytest.approx(whole["metrics"]["mean_reward_ppo"], rel=1e-4)
    # The warm-up update trained the critic only: update 2 still samples the reference (KL 0), update 3 does not
    updates = whole["metrics"]["updates"]
    assert updates[1]["objective/kl_k3"] == pytest.approx(0.0, abs=1e-6) and updates[2]["objective/kl_k3"] > 1e-4


@pytest.mark.slow
def test_offline_dpo_killed_mid_pass_resumes_from_its_checkpoint(runs_root, cold_dry, tmp_path):
    from tests.test_dpo import DPO_ARGS

    run, parent = "dpo-offline-killed", runs_root / cold_dry["run"]
    # 16 pairs / batch 2 x 20 epochs = 160 steps, a checkpoint every 5
    args = ["--run", run, "--sft_dir", str(parent / "sft"), "--reward_dir", str(parent / "reward"), "--mode", "offline",
            "--ranked_files", str(cold_dry["ranked"]), "--eval_file", str(cold_dry["prompts"]), *DPO_ARGS,
            "--per_device_train_batch_size", "2", "--num_train_epochs", "20", "--save_steps", "5"]
    log = tmp_path / "first.log"
    process = start_stage("dpo", args, log)
    folder = resume.resume_dir(runs_root / run, "dpo")
    wait_for_checkpoint(folder, process, log, at_least=10)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (runs_root / run / "dpo").exists()
    killed_at = resume.complete_checkpoints(folder)[-1][0]

    result = run_stage("dpo", *args)
    assert_ok(result)
    assert f"[dpo] resumed at step {killed_at} of 160 from {folder / f'checkpoint-{killed_at}'}" in result.stdout
    manifest = json.loads((runs_root / run / "dpo" / "manifest.json").read_text())
    assert manifest["resumed"]["from_step"] == killed_at and manifest["metrics"]["train_steps"] == 160
    steps = [json.loads(line)["step"] for line in (runs_root / run / "dpo" / "logs" / "steps.jsonl").read_text().splitlines()]
    assert set(steps) == set(range(1, 161)) and steps == sorted(steps)  # the killed process's steps replayed first
    assert not folder.exists()
