"""Training-step speed by memory allocator: glibc malloc vs preloaded tcmalloc (and jemalloc).

Why this exists: with glibc malloc a CPU training step of the default model spent
about a third of its time in the kernel (page faults on freshly mapped buffers,
e.g. autocast's per-step bf16 weight copies). The Makefile therefore preloads
tcmalloc for every stage, benchmark and test run; this script is the evidence.

Each arm is bench_sft.py's "align defaults" SFT run (same model, data, steps and
seed) in its own process, started with a different LD_PRELOAD; arms alternate
round by round so a noisy machine slows them alike. Reported: tokens/s, user and
kernel CPU seconds per arm (best round), and each allocator's ratio to glibc.

    python bench/bench_malloc.py [--steps 6] [--repeats 2] [--model default]
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench_sft  # noqa: E402  (its arms, each in a fresh process)
ALLOCATORS = {  # arm name -> (shared library glob, extra environment)
    "glibc": (None, {}),
    "tcmalloc": ("/usr/lib/*/libtcmalloc_minimal.so.4", {}),
    # jemalloc gives freed pages back after 10 s by default, which brings the page faults back
    "jemalloc": ("/usr/lib/*/libjemalloc.so.2", {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
}


def run_arm(library: str | None, extra_env: dict, model: str, steps: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env.update(extra_env)
    if library:
        env["LD_PRELOAD"] = library
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = bench_sft.run_child("align defaults", model, steps, str(REPO / "data" / "sft.jsonl"), env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.update(user_s=after.ru_utime - before.ru_utime, kernel_s=after.ru_stime - before.ru_stime)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    arms = {}
    for name, (pattern, extra_env) in ALLOCATORS.items():
        found = sorted(glob.glob(pattern)) if pattern else [None]
        if not found:
            print(f"[bench-malloc] {name}: {pattern} not installed, arm skipped")
            continue
        arms[name] = (found[0], extra_env)
    print(f"[bench-malloc] SFT, align defaults, {args.steps} steps x {args.repeats} rounds; arms: {', '.join(arms)}")
    best: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name, (library, extra_env) in arms.items():
            result = run_arm(library, extra_env, args.model, args.steps)
            print(f"  round {repeat + 1}: {name:<9} {result['tokens_per_s']:6.0f} tokens/s | "
                  f"user {result['user_s']:5.1f} s, kernel {result['kernel_s']:5.1f} s", flush=True)
            if name not in best or result["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = result

    print("\n| allocator | tokens/s | x glibc | kernel CPU s | train loss |")
    print("|---|---:|---:|---:|---:|")
    for name, result in best.items():
        ratio = result["tokens_per_s"] / best["glibc"]["tokens_per_s"]
        print(f"| {name} | {result['tokens_per_s']:.0f} | {ratio:.2f}x | {result['kernel_s']:.1f} | "
              f"{result['train_loss']:.4f} |")


if __name__ == "__main__":
    main()
