"""The HH-RLHF recipe end to end on real human preferences: SFT on the chosen answers, the reward
model, on-policy DPO, and `make compare` on held-out HH prompts.

Reads ../shared/datasets/hh-rlhf-harmless/pairs.jsonl (crowdworker judgments in HH-RLHF's
`Human:/Assistant:` text; outside the repository and never copied into it), splits its lines
with a seeded shuffle into a test file (`--test_pairs`) and a train file (`--train_pairs`),
both in a scratch folder, and runs the real stages as `make <stage> RECIPE=hh-rlhf` does: each
`python -m stages.<stage> --config configs/recipes/hh-rlhf/<stage>.yaml`, with HH_TRAIN and
HH_TEST pointing at the two files and ALIGN_RUNS at the scratch folder, from the offline
default model. Printed: each stage's wall time and its headline figure, then the verdict the
issue asks for: the aligned model's reward-model win rate over SFT on the held-out prompts,
with its 95% interval (goal >= 60%), the paired reward difference, KL to SFT and the length
change, and the machine's CPU flags.

    python bench/bench_hh_recipe.py [--train_pairs 400] [--reward_pairs 1600] [--test_pairs 200]
        [--seed 0] [--stage sft="--num_train_epochs 2" ...] [--keep]

Sizes: SFT and the DPO prompts use `--train_pairs`, the reward model `--reward_pairs` (those and
the next ones): on a 2-core CPU SFT costs ~3 s a pair (every assistant turn of a dialogue is an
example), the reward model ~1 s, and a reward model of 309 HH pairs failed its gate (accuracy
0.53) where 1,441 gave 0.61.

`--stage NAME="ARGS"` adds arguments to one stage (repeatable), e.g. a quicker run with
`--stage dpo="--rounds 1"`. Prints "skipped: ... not found" and exits 0 when the data set is
absent. The reward model judging the win rate is the recipe's own (trained on the training
split only): a held-out human verdict needs `make compare-to-argilla`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "datasets" / "hh-rlhf-harmless" / "pairs.jsonl"
RECIPE = REPO / "configs" / "recipes" / "hh-rlhf"
STAGES = ("sft", "reward", "dpo", "compare")
TARGET_WIN_RATE = 0.60  # issue 15: the aligned model's reward-model win rate over SFT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_pairs", type=int, default=400, help="pairs for SFT (chosen answers) and DPO prompts")
    parser.add_argument("--reward_pairs", type=int, default=1600,
                        help="pairs for the reward model (the train pairs and the next ones; at least --train_pairs)")
    parser.add_argument("--test_pairs", type=int, default=200, help="held-out pairs: their prompts judge SFT vs DPO")
    parser.add_argument("--seed", type=int, default=0, help="the split's shuffle")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--stage", action="append", default=[], metavar='NAME="ARGS"',
                        help="extra arguments for one stage (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and print its path")
    options = parser.parse_args()

    data_path = Path(options.data)
    if not data_path.is_file():
        print(f"skipped: {data_path} not found (the HH-RLHF sample lives beside the project, not in it)")
        return 0
    extra = {stage: [] for stage in STAGES}
    for text in options.stage:
        name, _, args = text.partition("=")
        if name not in extra:
            print(f"error: --stage {text!r}: NAME is one of {', '.join(STAGES)}")
            return 2
        extra[name] += shlex.split(args)

    from align import hardware

    scratch = Path(tempfile.mkdtemp(prefix="bench-hh-recipe-"))
    files = split_pairs(data_path, scratch, options)
    if files is None:
        return 2
    train, reward_train, test = files
    env = {**os.environ, "HH_TRAIN": str(train), "HH_TEST": str(test), "ALIGN_RUNS": str(scratch / "runs"),
           "HF_HUB_OFFLINE": "1"}
    extra["reward"] = ["--ranked_files", str(reward_train), *extra["reward"]]
    print(f"[bench] HH-RLHF recipe: {options.train_pairs} train pairs (SFT, DPO prompts), {options.reward_pairs} "
          f"for the reward model, {options.test_pairs} test pairs (seed {options.seed}) from {data_path}; "
          f"CPU flags: {hardware.describe_cpu()}; scratch {scratch}", flush=True)
    walls = {}
    for stage in STAGES:
        command = [sys.executable, "-m", f"stages.{stage}", "--run", "hh", "--config", str(RECIPE / f"{stage}.yaml"),
                   *extra[stage]]
        print(f"[bench] {stage}: {' '.join(command[2:])}", flush=True)
        started = time.time()
        result = subprocess.run(command, cwd=REPO, env=env)
        walls[stage] = time.time() - started
        if result.returncode != 0:
            print(f"[bench] {stage} failed (exit {result.returncode}); scratch kept in {scratch}")
            return 1
    print_summary(scratch / "runs" / "hh", walls)
    if options.keep:
        print(f"[bench] kept {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def split_pairs(data_path: Path, scratch: Path, options):
    """The file's lines, shuffled with `seed`: the first `test_pairs` to test.jsonl, the next
    `reward_pairs` to reward_train.jsonl, whose first `train_pairs` are train.jsonl (as they are:
    the stages read and validate HH text themselves). None when the sizes do not fit."""
    lines = [line for line in data_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    test_pairs, train_pairs, reward_pairs = options.test_pairs, options.train_pairs, options.reward_pairs
    if test_pairs + reward_pairs > len(lines) or min(train_pairs, test_pairs) < 1 or reward_pairs < train_pairs:
        print(f"error: --test_pairs {test_pairs} + --reward_pairs {reward_pairs} must fit the {len(lines)} pairs of "
              f"{data_path}, with --train_pairs {train_pairs} <= --reward_pairs and each at least 1")
        return None
    random.Random(options.seed).shuffle(lines)
    files = scratch / "train.jsonl", scratch / "reward_train.jsonl", scratch / "test.jsonl"
    for path, chosen in zip(files, (lines[test_pairs:test_pairs + train_pairs],
                                    lines[test_pairs:test_pairs + reward_pairs], lines[:test_pairs])):
        path.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return files


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def print_summary(run_dir: Path, walls: dict) -> None:
    sft, reward, dpo = (manifest(run_dir, stage)["metrics"] for stage in ("sft", "reward", "dpo"))
    report = json.loads((run_dir / "compare" / "report.json").read_text())
    (comparison,) = [c for c in report["comparisons"] if c["aligned"] == "dpo"]
    low, high = reward["pairwise_accuracy_ci95"]
    print()
    print(f"{'stage':<8} {'wall s':>7}  result")
    print(f"{'sft':<8} {walls['sft']:>7.0f}  {sft['train_examples']} chosen answers, {sft['train_steps']} steps; "
          f"held-out eval loss {sft['eval_loss_before']:.3f} -> {sft['eval_loss_after']:.3f}")
    print(f"{'reward':<8} {walls['reward']:>7.0f}  accuracy {reward['pairwise_accuracy']:.3f} [{low:.3f}, {high:.3f}] "
          f"on {reward['heldout_pairs']} pairs, length Spearman {reward['length_correlation']:+.3f}, "
          f"gate {'PASS' if reward['gate_passed'] else 'FAIL'}; scores the longer answer higher in "
          f"{reward['longer_scored_higher_fraction']:.0%} of pairs (people chose the longer in {reward['chosen_longer_fraction']:.0%})")
    print(f"{'dpo':<8} {walls['dpo']:>7.0f}  {dpo['verdict_line']}")
    print(f"{'compare':<8} {walls['compare']:>7.0f}  {comparison['verdict_line']}")
    print(f"{'total':<8} {sum(walls.values()):>7.0f}")
    win, difference, kl = comparison["win_rate"], comparison["reward_difference"], comparison["kl"]
    rate = win["rate"]
    met = rate is not None and rate >= TARGET_WIN_RATE
    rate_text = "n/a" if rate is None else f"{rate:.1%}"
    print()
    print(f"DPO vs SFT on {report['prompts']} held-out HH prompts, judged by the recipe's reward model: win rate "
          f"{rate_text} [{win['low']:.1%}, {win['high']:.1%}] ({win['wins']} wins, {win['ties']} ties, {win['losses']} "
          f"losses); reward {difference['difference']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]; "
          f"KL {kl['mean']:.3f} nats; length {comparison['length_change']:+.0%}")
    print(f"goal: win rate >= {TARGET_WIN_RATE:.0%}: {'MET' if met else 'not met'}"
          f"{'' if win['low'] > 0.5 else ' (the interval does not exclude 50%)'}")


if __name__ == "__main__":
    sys.exit(main())
