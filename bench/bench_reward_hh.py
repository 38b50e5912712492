"""Reward model on real human preferences: held-out pairwise accuracy on HH-RLHF (harmless),
and what the length tools do to it.

Reads ../shared/datasets/hh-rlhf-harmless/pairs.jsonl (1,800 crowdworker
judgments, `{"chosen", "rejected"}` dialogues; outside the repository and never
copied into it), hands the file as it is to the reward stage, which reads
HH-RLHF text itself (align/data.py: the shared dialogue up to the last
`Assistant:` becomes the prompt messages, the two final assistant answers the
ranked responses), and trains a reward model on part of it by running the real
stage, `python -m stages.reward`, from the default model (no SFT parent), once per
variant, each in its own temporary runs folder (same seed: same split, same held-out
prompts). Reported side by side: pairwise accuracy (with its bootstrap interval),
the gate's length check (Spearman of score and answer length, |.| <= 0.5), how often
the model prefers the shorter answer against how often people did, ECE and time;
and two baselines, "prefer the shorter answer" and "prefer the longer answer"
(harmless answers are often short refusals, so length alone is a real competitor).

    python bench/bench_reward_hh.py [--train_pairs 1500] [--max_length 512]
        [--variant NAME="STAGE ARGS" ...] [--keep] [--reuse NAME=FOLDER ...]
        [-- extra stage args for every variant]

After the table: each variant's accuracy where people chose the shorter answer and where they
chose the longer one, and each variant minus the first on the same held-out pairs (paired
bootstrap over pairs). `--keep` keeps each run's folder; `--reuse NAME=FOLDER` puts a kept run
first in a later comparison without training it again (its data, --train_pairs and
--max_length must be this run's). With --reuse and no --variant, nothing is trained.

Variants by default: `plain` (the stage's loss) and `decorrelated`
(`--length_decorrelation 1`, align/length_bias.py). Prints "skipped: ... not found"
and exits 0 when the data set is absent.

Measured 2026-11-23 on a 2-core AVX-512 CPU while other jobs loaded it, max_length 256
(1,063 pairs trained: a third of the pairs were longer), LoRA in the top 8 layers,
1 epoch: accuracy 0.624 (95% CI 0.557-0.688) vs 0.509 for the best length baseline;
the gate failed that model on length (Spearman -0.65). The README's "Length bias on real
data" has the newer figures, among them the HH recipe's setting (LoRA in every layer, 2 epochs:
0.661 [0.606, 0.716] on an AMX Xeon, 2026-12-07, against 0.628 after 1 epoch):

    python bench/bench_reward_hh.py --variant every_layer="--length_decorrelation 1 --lora_top_layers null" \
        --variant two_epochs="--length_decorrelation 1 --lora_top_layers null --num_train_epochs 2"
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
TARGET = 0.65  # issue 15: held-out accuracy at least 0.65, with the gate's length check passing
# Stage settings for this bench: one epoch; pairs over max_length dropped and counted; pairs of
# similar length batched together (HH dialogues run from 30 to 500 tokens: random batches are mostly
# padding); held-out scoring in bf16 only where the CPU has it. Anything after `--` overrides them.
STAGE_ARGS = ["--num_train_epochs", "1", "--score_dtype", "auto", "--train_sampling_strategy", "group_by_length"]
VARIANTS = {"plain": [], "decorrelated": ["--length_decorrelation", "1"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_pairs", type=int, default=1500, help="pairs (= prompts) to train on; rest held out")
    parser.add_argument("--max_length", type=int, default=512, help="longer pairs are dropped (tokens)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="STAGE ARGS"',
                        help="a setting to compare (repeatable); default: plain and decorrelated")
    parser.add_argument("--keep", action="store_true", help="keep the temporary runs folders and print their paths")
    parser.add_argument("--reuse", action="append", default=[], metavar="NAME=FOLDER",
                        help="a run an earlier --keep printed, compared without training it again (repeatable; "
                             "reused runs come first and the paired differences are against the first; with "
                             "--reuse and no --variant nothing is trained)")
    parser.add_argument("stage_args", nargs="*", help="extra `python -m stages.reward` arguments (after --)")
    options = parser.parse_args()

    data_path = Path(options.data)
    if not data_path.is_file():
        print(f"skipped: {data_path} not found (the HH-RLHF sample lives beside the project, not in it)")
        return 0
    variants = VARIANTS
    if options.variant:
        variants = {}
        for text in options.variant:
            name, _, stage_args = text.partition("=")
            if not name:
                print(f'error: --variant {text!r}: expected NAME="STAGE ARGS"')
                return 2
            variants[name] = stage_args.split()
    # the stage reads HH-RLHF's own text (align.data): each pair is ranked chosen 1, rejected 2; the
    # few malformed ones (an empty final answer, broken turns) are bad rankings, skipped and listed
    pairs_in_file = sum(1 for line in data_path.read_text(encoding="utf-8").splitlines() if line.strip())
    heldout_fraction = 1 - options.train_pairs / pairs_in_file
    if not 0 < heldout_fraction < 1:
        print(f"error: --train_pairs {options.train_pairs} leaves nothing held out of {pairs_in_file} pairs")
        return 2

    results = {}
    expected = {"ranked_files": [str(data_path)], "heldout_fraction": heldout_fraction,
                "max_length": options.max_length}
    variant_names = {text.partition("=")[0] for text in options.variant}
    for text in options.reuse:
        name, _, folder = text.partition("=")
        if not name or not folder or name in results or name in variant_names:
            print(f"error: --reuse {text!r}: expected NAME=FOLDER, with a name no other --reuse or --variant has")
            return 2
        results[name] = read_kept_variant(name, Path(folder), expected)
        if results[name] is None:
            return 2
    if options.reuse and not options.variant:
        variants = {}
    for name, variant_args in variants.items():
        results[name] = run_variant(name, [*variant_args, *options.stage_args], data_path, heldout_fraction, options)
        if results[name] is None:
            return 1
    print_table(results, options.max_length)
    return 0


def run_variant(name: str, stage_args: list[str], data_path: Path, heldout_fraction: float, options) -> dict | None:
    """One reward stage in its own scratch runs folder: its metrics, held-out scores and wall time."""
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-reward-hh-{name}-"))
    command = [sys.executable, "-m", "stages.reward", "--run", "hh", "--model_name_or_path", "default",
               "--ranked_files", str(data_path), "--heldout_fraction", f"{heldout_fraction:.6f}",
               "--max_length", str(options.max_length), *STAGE_ARGS, *stage_args]
    env = {**os.environ, "ALIGN_RUNS": str(scratch / "runs"), "HF_HUB_OFFLINE": "1"}
    print(f"[bench] {name}: {' '.join(command[2:])}", flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=REPO, env=env)
    wall = time.time() - started
    if result.returncode != 0:
        print(f"[bench] {name}: the reward stage failed (exit {result.returncode}); scratch kept in {scratch}")
        return None
    folder = scratch / "runs" / "hh" / "reward"
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    scores = [json.loads(line) for line in (folder / "heldout_scores.jsonl").read_text().splitlines()]
    if options.keep:
        print(f"[bench] {name}: kept {scratch}")
    else:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return {"metrics": metrics, "scores": scores, "wall": wall}


def read_kept_variant(name: str, folder: Path, expected: dict) -> dict | None:
    """A variant trained earlier: the scratch folder `--keep` printed (or its runs/hh/reward inside). Its
    data file, held-out fraction and max_length must be this run's, or its held-out pairs differ."""
    reward = folder / "runs" / "hh" / "reward" if (folder / "runs").is_dir() else folder
    manifest, scores = reward / "manifest.json", reward / "heldout_scores.jsonl"
    if not manifest.is_file() or not scores.is_file():
        print(f"error: --reuse {name}={folder}: no manifest.json and heldout_scores.jsonl there; pass a folder that "
              "`--keep` printed")
        return None
    recorded = json.loads(manifest.read_text())
    for key, value in expected.items():
        was = recorded["config"].get(key)
        same = abs(float(was) - value) < 1e-5 if key == "heldout_fraction" and was is not None else was == value
        if not same:
            print(f"error: --reuse {name}={folder}: that run's {key} was {was!r}, this one's is {value!r}; rerun "
                  f"with the same --data, --train_pairs and --max_length")
            return None
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    return {"metrics": recorded["metrics"], "scores": rows, "wall": recorded.get("wall_s", float("nan"))}


def pair_correct(row: dict) -> float:
    """1 when the chosen answer scored higher, 0.5 on a tie (as the gate's accuracy counts it), else 0."""
    return float(row["r_chosen"] > row["r_rejected"]) + 0.5 * float(row["r_chosen"] == row["r_rejected"])


def accuracy_by_length(rows: list[dict]) -> tuple[float, int, float, int]:
    """Accuracy where people chose the shorter answer, and where they chose the longer one (with counts)."""
    shorter = [pair_correct(r) for r in rows if r["chosen_tokens"] < r["rejected_tokens"]]
    longer = [pair_correct(r) for r in rows if r["chosen_tokens"] > r["rejected_tokens"]]
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    return mean(shorter), len(shorter), mean(longer), len(longer)


def print_paired(results: dict) -> None:
    """Each variant minus the first on the same held-out pairs: paired bootstrap over pairs."""
    from align import evaluation

    names = list(results)
    base = {row["prompt_id"]: pair_correct(row) for row in results[names[0]]["scores"]}
    for name in names[1:]:
        other = {row["prompt_id"]: pair_correct(row) for row in results[name]["scores"]}
        shared = sorted(base.keys() & other.keys())
        if len(shared) < max(len(base), len(other)):
            print(f"paired {name} - {names[0]}: only {len(shared)} held-out pairs shared ({len(other)} and "
                  f"{len(base)}: another split?)")
        if not shared:
            continue
        diff = evaluation.paired_difference([other[k] for k in shared], [base[k] for k in shared])
        print(f"paired {name} - {names[0]}: accuracy {diff['difference']:+.3f} [{diff['low']:+.3f}, "
              f"{diff['high']:+.3f}] over {len(shared)} pairs (bootstrap over pairs)")


def shorter_preferred(rows: list[dict], chosen_key: str, rejected_key: str) -> float:
    """Share of pairs where the side with the higher value is the shorter answer (ties count half)."""
    total = 0.0
    for row in rows:
        high_is_chosen = row[chosen_key] > row[rejected_key]
        tie = row[chosen_key] == row[rejected_key] or row["chosen_tokens"] == row["rejected_tokens"]
        chosen_shorter = row["chosen_tokens"] < row["rejected_tokens"]
        total += 0.5 if tie else float(high_is_chosen == chosen_shorter)
    return total / len(rows)


def print_table(results: dict, max_length: int) -> None:
    first = next(iter(results.values()))
    metrics, scores = first["metrics"], first["scores"]
    people_shorter = sum((r["chosen_tokens"] < r["rejected_tokens"]) + 0.5 * (r["chosen_tokens"] == r["rejected_tokens"])
                         for r in scores) / len(scores)
    dropped = metrics["dropped_too_long_train"] + metrics["dropped_too_long_heldout"]
    print()
    print(f"HH-RLHF harmless: {metrics['heldout_pairs']} held-out pairs, {metrics['train_pairs']} trained; {dropped} "
          f"dropped > {max_length} tokens, {metrics['bad_rankings']} malformed. Target: accuracy >= {TARGET:.2f} "
          "with |length Spearman| <= the gate's limit")
    width = max(14, *(len(name) for name in results))  # the first column fits every variant's name
    print(f"{'variant':<{width}} {'accuracy (95% CI)':<22} {'length Spearman':<18} {'prefers shorter':<16} "
          f"{'ECE':<6} {'steps':<6} {'train s':<8} {'wall s':<7} target")
    for name, result in results.items():
        m = result["metrics"]
        low, high = m["pairwise_accuracy_ci95"]
        limit = m["gate_thresholds"]["max_abs_length_corr"]
        length_ok = limit is None or abs(m["length_correlation"]) <= limit
        length_text = f"{m['length_correlation']:+.3f} {'ok' if length_ok else 'FAIL'}"
        shorter = shorter_preferred(result["scores"], "r_chosen", "r_rejected")
        met = m["pairwise_accuracy"] >= TARGET and length_ok
        print(f"{name:<{width}} {m['pairwise_accuracy']:.3f} ({low:.3f}-{high:.3f})    {length_text:<18} "
              f"{shorter:<16.1%} {m['ece']:<6.3f} {m['train_steps']:<6} {m['train_runtime_s']:<8.0f} "
              f"{result['wall']:<7.0f} {'MET' if met else 'not met'}")
    print(f"{'prefer shorter':<{width}} {people_shorter:.3f}")
    print(f"{'prefer longer':<{width}} {1 - people_shorter:.3f}")
    print(f"people chose the shorter answer in {people_shorter:.1%} of the held-out pairs")
    print()
    for name, result in results.items():
        on_shorter, shorter_count, on_longer, longer_count = accuracy_by_length(result["scores"])
        print(f"{name}: accuracy {on_shorter:.3f} where the chosen answer is shorter ({shorter_count} pairs), "
              f"{on_longer:.3f} where it is longer ({longer_count})")
    print_paired(results)


if __name__ == "__main__":
    sys.exit(main())
