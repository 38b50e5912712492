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
