"""The stage runner's environment checks: which allocator torch runs on."""

import subprocess
from pathlib import Path

from align.console import fast_allocator_loaded

REPO = Path(__file__).resolve().parent.parent


def test_allocator_read_from_the_process_memory_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert fast_allocator_loaded(str(maps)) is None
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n")
    assert fast_allocator_loaded(str(maps)) == "tcmalloc"
    assert fast_allocator_loaded(str(tmp_path / "missing")) is None


def test_make_runs_stage_processes_on_tcmalloc():
    # the same LD_PRELOAD recipe line every `make <stage>` uses, on the real installed library
    done = subprocess.run(["make", "-s", "--no-print-directory", "allocator"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "tcmalloc"


def test_out_of_disk_is_recognised_through_the_cause_chain(tmp_path, monkeypatch):
    import errno

    from align.console import out_of_disk

    monkeypatch.setenv("ALIGN_RUNS", str(tmp_path))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as low:
            raise RuntimeError("saving failed") from low
    except RuntimeError as wrapped:
        line = out_of_disk(wrapped)
    assert line.startswith(f"out of disk space writing under {tmp_path.resolve()} (") and "\n" not in line
    assert "RuntimeError: saving failed" in line and "run the same command again" in line
    assert out_of_disk(RuntimeError("Error while serializing: I/O error: File too large (os error 27)")).startswith(
        "over this process's file-size limit (ulimit -f)")
    assert out_of_disk(ValueError("a bug, with plenty of room left")) is None  # keeps its traceback
