"""A disk that fills up while a stage saves: one clear line (exit 4), no traceback, the previous
finished output untouched, and the same command works once there is room again.

The runs folder is a real, small file system (a tmpfs mounted for the test; we are root on the
project's machines). Where mounting is not allowed, the stage process runs under a file-size
limit instead (RLIMIT_FSIZE, SIGXFSZ ignored): writes past it fail with EFBIG, the same failure
path. Either way the stage's own writes fail; nothing is mocked."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from align.console import OUT_OF_DISK_EXIT
from tests.conftest import REPO, assert_ok

FILE_LIMIT = 4 * 2**20  # the fallback: no file may grow past 4 MiB (the tiny model's weights are ~25 MiB)


@pytest.fixture
def small_disk(tmp_path):
    """(folder, mounted): a 256 MiB tmpfs, or a plain folder when mounting is refused."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield folder, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed by the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def sft(runs: Path, args: list[str], limited: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.sft", *args], cwd=REPO,
                          env={**os.environ, "ALIGN_RUNS": str(runs)}, capture_output=True, text=True, timeout=900,
                          preexec_fn=limit_file_size if limited else None)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_finished_output(small_disk, tiny_model_dir, tiny_data):
    runs, mounted = small_disk
    args = ["--run", "full", "--model_name_or_path", str(tiny_model_dir), "--train_file", str(tiny_data["sft"]),
            "--eval_file", str(tiny_data["prompts"]), "--max_steps", "1", "--per_device_train_batch_size", "4",
            "--report_to", "none"]
    assert_ok(sft(runs, args))
    finished = runs / "full" / "sft"
    before = folder_hashes(finished)

    filler = runs / "filler.bin"
    if mounted:  # leave 8 MiB: the merged model alone needs ~25
        free = shutil.disk_usage(runs).free
        with open(filler, "wb") as handle:
            handle.truncate(0)
            handle.write(b"\0" * (free - 8 * 2**20))
    result = sft(runs, [*args, "--force"], limited=not mounted)

    assert result.returncode == OUT_OF_DISK_EXIT, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    what = "out of disk space" if mounted else "over this process's file-size limit (ulimit -f)"
    assert line.startswith(f"error: {what} writing under {runs.resolve()}"), line
    assert "run the same command again" in line
    assert folder_hashes(finished) == before  # the previous output, byte for byte
    (failed,) = (runs / "full").glob("sft.failed-*")  # the partial output, named in the stage's line
    assert str(failed) in result.stderr and not list((runs / "full").glob(".sft.tmp-*"))

    filler.unlink(missing_ok=True)
    shutil.rmtree(failed)
    again = sft(runs, [*args, "--force"])
    assert_ok(again)
    assert (finished / "model" / "model.safetensors").is_file()
