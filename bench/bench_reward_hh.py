"""Reward model on real human preferences: held-out pairwise accuracy on HH-RLHF (harmless).

Reads ../shared/datasets/hh-rlhf-harmless/pairs.jsonl (1,800 crowdworker
judgments, `{"chosen", "rejected"}` dialogues; outside the repository and never
copied into it), hands the file as it is to the reward stage, which reads
HH-RLHF text itself (align/data.py: the shared dialogue up to the last
`Assistant:` becomes the prompt messages, the two final assistant answers the
ranked responses), and trains a reward model on part of it by running the real stage, `python -m stages.reward`, from the default model
(no SFT parent), in a temporary runs folder. Reported side by side on the same
held-out prompts: the reward model's pairwise accuracy (with its bootstrap
interval) and two baselines, "prefer the shorter answer" and "prefer the longer
answer" (harmless answers are often short refusals, so length alone is a
real competitor).

    python bench/bench_reward_hh.py [--train_pairs 1500] [--max_length 256] [-- extra stage args]

Prints "skipped: ... not found" and exits 0 when the data set is absent.

Measured 2026-11-23 on the 2-core CPU while other jobs loaded it (load 6-9,
OMP_NUM_THREADS=1), stage defaults (LoRA in the top 8 layers, 1 epoch):
1,063 pairs trained (the 1,500 minus those over 256 tokens with the chat
template), 221 held out: accuracy 0.624 (95% CI 0.557-0.688) vs 0.509 for the
best length baseline; 133 steps, 1,231 s training, 1,400 s stage wall. The
stage's own gate failed that model on length (Spearman -0.65: it learned that
short answers, often refusals, are harmless).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "datasets" / "hh-rlhf-harmless" / "pairs.jsonl"
TARGET = 0.60
# Stage settings for this bench: one epoch, long dialogues capped (pairs beyond are
# dropped and counted), bf16 held-out scoring. Anything after `--` overrides them.
STAGE_ARGS = ["--num_train_epochs", "1", "--score_dtype", "bfloat16"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_pairs", type=int, default=1500, help="pairs (= prompts) to train on; rest held out")
    parser.add_argument("--max_length", type=int, default=256, help="longer pairs are dropped (tokens)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--keep", action="store_true", help="keep the temporary runs folder and print its path")
    parser.add_argument("stage_args", nargs="*", help="extra `python -m stages.reward` arguments (after --)")
    options = parser.parse_args()

    data_path = Path(options.data)
    if not data_path.is_file():
        print(f"skipped: {data_path} not found (the HH-RLHF sample lives beside the project, not in it)")
        return 0
    # the stage reads HH-RLHF's own text (align.data): each pair is ranked chosen 1, rejected 2; the
    # few malformed ones (an empty final answer, broken turns) are bad rankings, skipped and listed
    pairs_in_file = sum(1 for line in data_path.read_text(encoding="utf-8").splitlines() if line.strip())
    heldout_fraction = 1 - options.train_pairs / pairs_in_file
    if not 0 < heldout_fraction < 1:
        print(f"error: --train_pairs {options.train_pairs} leaves nothing held out of {pairs_in_file} pairs")
        return 2

    scratch = Path(tempfile.mkdtemp(prefix="bench-reward-hh-"))
    command = [sys.executable, "-m", "stages.reward", "--run", "hh", "--model_name_or_path", "default",
               "--ranked_files", str(data_path), "--heldout_fraction", f"{heldout_fraction:.6f}",
               "--max_length", str(options.max_length), *STAGE_ARGS, *options.stage_args]
    env = {**os.environ, "ALIGN_RUNS": str(scratch / "runs"), "HF_HUB_OFFLINE": "1"}
    print(f"[bench] {pairs_in_file} HH pairs; training on ~{options.train_pairs}, "
          f"held-out ~{pairs_in_file - options.train_pairs}; stage: {' '.join(command[2:])}", flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=REPO, env=env)
    wall = time.time() - started
    if result.returncode != 0:
        print(f"[bench] the reward stage failed (exit {result.returncode}); scratch kept in {scratch}")
        return result.returncode

    folder = scratch / "runs" / "hh" / "reward"
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    scores = [json.loads(line) for line in (folder / "heldout_scores.jsonl").read_text().splitlines()]
    shorter = sum((r["chosen_tokens"] < r["rejected_tokens"]) + 0.5 * (r["chosen_tokens"] == r["rejected_tokens"])
                  for r in scores) / len(scores)
    accuracy = metrics["pairwise_accuracy"]
    low, high = metrics["pairwise_accuracy_ci95"]
    print()
    dropped = metrics["dropped_too_long_train"] + metrics["dropped_too_long_heldout"]
    malformed = metrics["bad_rankings"]
    print(f"HH-RLHF harmless, held-out pairwise accuracy ({metrics['heldout_pairs']} pairs, "
          f"{metrics['train_pairs']} trained; {dropped} dropped > {options.max_length} tokens, {malformed} malformed)")
    print(f"  reward model            {accuracy:.3f}  (95% CI {low:.3f}-{high:.3f})  target >= {TARGET:.2f}: "
          f"{'MET' if accuracy >= TARGET else 'NOT MET'}")
    print(f"  prefer shorter answer   {shorter:.3f}")
    print(f"  prefer longer answer    {1 - shorter:.3f}")
    print(f"  ratio model / best length baseline: {accuracy / max(shorter, 1 - shorter):.2f}")
    print(f"  length correlation {metrics['length_correlation']:.3f}, ECE {metrics['ece']:.3f}, "
          f"train loss {metrics['train_loss']:.3f}, steps {metrics['train_steps']}, "
          f"train {metrics['train_runtime_s']:.0f} s, stage wall {wall:.0f} s")
    if options.keep:
        print(f"  kept: {scratch}")
    else:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
