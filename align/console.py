"""What a stage prints: one-line summaries, loud warnings, clean fatal errors."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

from align.errors import AlignError

_STARTED = time.time()  # the stage process's start: summaries report wall time from here


def quiet_libraries() -> None:
    """Keep third-party chatter out of the way of our own progress output."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*gguf.*", category=UserWarning)


FAST_ALLOCATORS = ("tcmalloc", "jemalloc")


def fast_allocator_loaded(maps_file: str = "/proc/self/maps") -> str | None:
    """The preloaded tcmalloc/jemalloc this process runs with, or None (glibc malloc or not Linux)."""
    try:
        with open(maps_file) as maps:
            text = maps.read()
    except OSError:
        return None
    return next((name for name in FAST_ALLOCATORS if f"lib{name}" in text), None)


def tcmalloc_library() -> str | None:
    """Debian's libtcmalloc_minimal.so.4 on this machine (what `make <stage>` preloads), or None."""
    import glob

    found = sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4"))
    return found[0] if found else None


def note_allocator() -> None:
    """One line when torch runs on glibc malloc: CPU steps are measurably slower there."""
    if sys.platform.startswith("linux") and fast_allocator_loaded() is None:
        print("note: running on glibc malloc; CPU training steps were 1.6-2x faster with tcmalloc preloaded "
              "(`make <stage>` does it; by hand: LD_PRELOAD=$(ls /usr/lib/*/libtcmalloc_minimal.so.4), "
              "Debian package libtcmalloc-minimal4)", file=sys.stderr, flush=True)


def run_stage(main, argv=None, uses_torch: bool = True, single_process: str | None = None) -> None:
    """Run a stage's `main`; a user error prints one line and exits 2.

    uses_torch False (Argilla admin commands): no allocator note, it would be noise there.
    single_process: why this tool must not run under torchrun / accelerate launch (it talks to a
    server or samples with one engine); started as several processes, it prints one line, exits 2."""
    from align import processes

    refusal = processes.single_process_refusal(_tool_name(), single_process) if single_process else None
    if refusal:
        print(f"error: {refusal}", file=sys.stderr, flush=True)
        sys.exit(2)
    quiet_libraries()
    if uses_torch:
        note_allocator()
    # SIGTERM (make's ^C, a job scheduler) becomes SystemExit, so the stage's
    # output is marked failed and renamed instead of left half-written.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        main(argv)
    except AlignError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted after {time.time() - _STARTED:.0f} s; no output was marked complete", file=sys.stderr)
        sys.exit(130)
    except MemoryError:
        print("error: out of memory; try a smaller --per_device_train_batch_size or --max_length", file=sys.stderr)
        sys.exit(3)
    except Exception as error:
        problem = out_of_disk(error)
        if problem is None:
            raise  # a bug: keep its traceback
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(OUT_OF_DISK_EXIT)


OUT_OF_DISK_EXIT = 4
LOW_DISK_BYTES = 32 * 2**20  # less than this free under runs/ after a failure: the disk is the likely cause
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# how libraries that do not raise OSError say it: safetensors ("No space left on device (os error 28)")
_DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "File too large", "os error 27")


def out_of_disk(error: BaseException) -> str | None:
    """One line when `error` (or what caused it) is a full disk, a quota or a file-size limit, or
    when the runs folder's file system has almost no space left (torch.save then fails with an
    unhelpful "unexpected pos"); None otherwise. The previous finished output is untouched: a
    stage writes into a temporary folder and renames it only when whole (align/runs.py)."""
    import shutil

    from align.runs import runs_root

    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    said = any((isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS)
               or any(text in str(e) for text in _DISK_FULL_TEXTS) for e in chain)
    size_limit = any((isinstance(e, OSError) and e.errno == errno.EFBIG)
                     or "File too large" in str(e) or "os error 27" in str(e) for e in chain)
    root = runs_root()
    try:
        free = shutil.disk_usage(root if root.exists() else root.resolve().parent).free
    except OSError:
        free = None
    if not said and (free is None or free >= LOW_DISK_BYTES):
        return None
    room = f" ({free / 2**20:.0f} MiB free there)" if free is not None else ""
    first_line = str(error).splitlines()[0] if str(error) else ""
    what = "over this process's file-size limit (ulimit -f)" if size_limit else "out of disk space"
    return (f"{what} writing under {root.resolve()}{room}: {type(error).__name__}: {first_line[:200]}. "
            "The previous finished output is untouched; free space (the partial output is in the "
            "<stage>.failed-* folder named above) or point ALIGN_RUNS elsewhere, then run the same command again")


def _tool_name() -> str:
    """`stages.candidates` for `python -m stages.candidates`, else the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def summary(stage: str, **numbers) -> str:
    """`[sft] done in 212 s | eval_loss 2.31 -> 1.42 | ...` printed once at the end of a stage."""
    parts = []
    for key, value in numbers.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key.replace('_', ' ')} {value}")
    parts.append(f"wall {time.time() - _STARTED:.0f} s")
    line = f"[{stage}] " + " | ".join(parts)
    print(line, flush=True)
    return line


def warn(message: str) -> None:
    print(f"\n!!! WARNING: {message}\n", file=sys.stderr, flush=True)


def warn_skipped(errors: list, what: str = "malformed pair skipped", shown: int = 5) -> None:
    """One warning per skipped record (`file:line: field: problem`), the first `shown`, then a count."""
    for error in errors[:shown]:
        warn(f"{what}: {error}")
    if len(errors) > shown:
        warn(f"... and {len(errors) - shown} more ({what})")
