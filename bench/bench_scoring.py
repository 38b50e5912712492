"""Reward scoring and KL forward passes: batches in the given order vs batches sorted by length.

Sampled answers run from a few tokens to the cap, so a batch in sampling order is padded to its
longest row; `align.logprobs.length_sorted_batches` groups rows of similar length. This bench
scores the same texts both ways with the same reward model, side by side in one process
(interleaved, best of `--repeats`), and prints tokens padded per real token, seconds, the ratio,
and the largest score difference (padding must not change a score).

    python bench/bench_scoring.py --reward_dir runs/default/reward \\
        --samples runs/default/dpo/rounds/round-1-samples.jsonl [--batch_size 16] [--dtype bfloat16]

Prints "skipped: ..." and exits 0 without a reward model or samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from align import hardware  # noqa: E402


def given_order(model, tokenizer, all_ids, batch_size):
    """The old way: consecutive rows, padded to the longest of each batch."""
    import torch

    scores = []
    with torch.inference_mode():
        for start in range(0, len(all_ids), batch_size):
            batch = tokenizer.pad({"input_ids": all_ids[start : start + batch_size]}, padding=True, return_tensors="pt")
            scores.extend(model(**batch).logits[:, 0].float().tolist())
    return scores


def padded_share(lengths, batches) -> float:
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches) / sum(lengths)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward_dir", type=Path, default=REPO / "runs" / "default" / "reward")
    parser.add_argument("--samples", type=Path, default=REPO / "runs" / "default" / "dpo" / "rounds" / "round-1-samples.jsonl")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16" if hardware.cpu_has_bf16() else "float32")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    if not (options.reward_dir / "model").is_dir() or not options.samples.is_file():
        print(f"skipped: needs {options.reward_dir / 'model'} and {options.samples} (make sft reward dpo)")
        return 0

    from align.logprobs import length_sorted_batches
    from align.scoring import RewardScorer, reward_ids, score_texts

    scorer = RewardScorer(options.reward_dir / "model", batch_size=options.batch_size, dtype=options.dtype)
    rows = [json.loads(line) for line in options.samples.read_text().splitlines() if line.strip()]
    texts = [scorer.text(row["prompt"], row["response"]) for row in rows]
    all_ids = [reward_ids(scorer.tokenizer, text) for text in texts]
    lengths = [len(ids) for ids in all_ids]
    consecutive = [list(range(start, min(start + options.batch_size, len(rows))))
                   for start in range(0, len(rows), options.batch_size)]
    print(f"[bench_scoring] {len(rows)} texts, mean {sum(lengths) / len(lengths):.0f} tokens, batch "
          f"{options.batch_size}, {options.dtype}; CPU flags: {hardware.describe_cpu()}", flush=True)
    times = {"given order": [], "length-sorted": []}
    for _ in range(options.repeats):  # interleaved: a machine whose load changes hits both alike
        started = time.perf_counter()
        old = given_order(scorer.model, scorer.tokenizer, all_ids, options.batch_size)
        times["given order"].append(time.perf_counter() - started)
        started = time.perf_counter()
        new = score_texts(scorer.model, scorer.tokenizer, texts, options.batch_size)
        times["length-sorted"].append(time.perf_counter() - started)
    shares = {"given order": padded_share(lengths, consecutive),
              "length-sorted": padded_share(lengths, length_sorted_batches(lengths, options.batch_size))}
    for name, values in times.items():
        print(f"  {name:<14} {min(values):7.2f} s (best of {options.repeats})  padded/real tokens {shares[name]:.2f}")
    print(f"  speed-up {min(times['given order']) / min(times['length-sorted']):.2f}x; largest score difference "
          f"{max(abs(a - b) for a, b in zip(old, new)):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
