"""Aligned vs SFT: the numbers of the compare stage.

`stages/compare.py` generates and scores; the numbers it reports are computed here
from the sample rows (samples.jsonl), with the paired statistics of
`align.evaluation`; `align.reports` renders them (report.md, report.html, plots),
and `align.ab_test` adds the human verdict of a blind A/B test.

Unit of analysis: the PROMPT. Every model answers every held-out prompt with the
same decoding settings and seed (`samples_per_prompt` samples each). A prompt's
reward is the mean reward of its samples; intervals bootstrap over prompts and
the reward-model win rate counts one win, tie or loss per prompt. Samples of one
prompt are not independent, so treating them as separate items would make the
intervals too narrow.

Definitions (each number in the report is one of these):
- reward difference: mean over prompts of (aligned prompt reward - baseline
  prompt reward), with a percentile bootstrap interval (prompts resampled with
  replacement; `align.evaluation.paired_difference`).
- win rate: prompts where aligned's reward exceeds baseline's by more than
  `tie_tolerance`, over prompts decided either way; ties (including identical
  responses, which score exactly the same) are counted apart; Wilson interval
  (`align.evaluation.win_rate`).
- KL(aligned || baseline): mean over aligned samples y of
  sum_t [log p_aligned(y_t | x, y_<t) - log p_baseline(y_t | x, y_<t)], both terms
  from a forward pass under the same settings (`align.logprobs`). Unbiased only
  for samples drawn from the aligned model itself (temperature 1, top_p 1),
  which is why the stage draws them at `kl_temperature` (default 1.0).
- length: response tokens without the end-of-turn token; relative change of the
  mean. A cut answer counts at the cap, so a model that rambles past the cap less
  often is "shorter" even when its finished answers are as long as before: the
  relative change of the finished answers' mean is reported beside it
  (`finished_length_change`), and the notes say which of the two moved.
- style: pass rate of each house-style rule of the example project
  (`align.style.check_response`), and the mean style score (share of rules passed).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from align.evaluation import (
    decide, length_adjusted_difference, length_correlation, mean_interval, paired_difference, pass_rates, prompt_means,
    prompt_win_rate, relative_change,
)
from align.files import read_jsonl_records
from align.scoring import effective_reward
from align.style import check_response, is_unsafe_prompt, last_user_text, style_score, word_count

# The statistics' settings, the same for `make compare` (its config's defaults) and a policy stage's
# held-out verdict (align.online.HeldOut): tests/test_config.py checks that the two agree.
STATISTICS = {"bootstrap_resamples": 2000, "confidence": 0.95, "tie_tolerance": 0.0, "length_warn": 0.2,
              "style_warn": 0.1}
SAMPLES = "samples.jsonl"  # one row per response: prompt, model, sample, text, reward, tokens, style checks
VERDICTS = {"better": "aligned is better", "worse": "aligned is WORSE", "inconclusive": "inconclusive"}


def cost_notes(length_change: float, style_change: dict[str, float], length_warn: float, style_warn: float,
               cut_change: float = 0.0, finished_length_change: float = float("nan")) -> list[str]:
    """Warnings for the verdict: length hacking (mean length up more than `length_warn`, a fraction),
    length collapse (down more than that), answers cut at the cap (their share up by more than 10
    points) and style drift (a rule's pass rate down more than `style_warn`, absolute).

    A mean that fell while the finished answers kept their length (within `length_warn`) is
    fewer answers cut at the cap, not brevity: the note says so instead of warning."""
    notes = []
    if not math.isnan(length_change) and length_change > length_warn:
        notes.append(f"responses {length_change:+.0%} longer: check for length hacking")
    if not math.isnan(length_change) and length_change < -length_warn:
        if not math.isnan(finished_length_change) and abs(finished_length_change) <= length_warn:
            notes.append(f"responses {length_change:+.0%} shorter from fewer answers cut at the cap "
                         f"(finished answers {finished_length_change:+.0%})")
        else:
            notes.append(f"responses {length_change:+.0%} shorter: check the gain is not brevity alone")
    if cut_change > 0.1:
        notes.append(f"{cut_change:+.0%} more answers cut at max_new_tokens")
    drops = [f"{rule} {change:+.0%}" for rule, change in style_change.items() if change < -style_warn]
    if drops:
        notes.append("style drift: " + ", ".join(drops))
    return notes


def summarize_model(rows: list[dict], resamples: int, seed: int, confidence: float) -> dict:
    """Per-model numbers from its sample rows (all prompts, all samples)."""
    by_prompt = group_by_prompt(rows)
    rewards = prompt_means([[row["reward"] for row in group] for group in by_prompt.values()])
    tokens = [row["tokens"] for row in rows]
    checks = [row["style"] for row in rows]
    scores = [row["reward"] for row in rows]
    correlation = length_correlation(scores, tokens) if len(rows) > 1 else float("nan")
    return {
        "reward": mean_interval(rewards, resamples, seed, confidence),
        "reward_std": float(np.std(scores)),
        "tokens_mean": float(np.mean(tokens)),
        "tokens_median": float(np.median(tokens)),
        "finished_tokens_mean": mean_or_nan([row["tokens"] for row in rows if row["finish_reason"] != "length"]),
        "words_mean": float(np.mean([row["words"] for row in rows])),
        "truncated_share": float(np.mean([row["finish_reason"] == "length" for row in rows])),
        "reward_model_score_mean": float(np.mean([row.get("reward_model_score", row["reward"]) for row in rows])),
        "style_score": float(np.mean([row["style_score"] for row in rows])),
        "style_pass_rates": pass_rates(checks),
        "reward_length_spearman": correlation,
        "samples": len(rows),
        "prompts": len(by_prompt),
    }


def mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def group_by_prompt(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt_id"], []).append(row)
    return groups


def compare_pair(aligned: str, baseline: str, rows: dict[str, list[dict]], summaries: dict[str, dict],
                 kl_samples: dict | None, options: dict) -> dict:
    """All numbers of one aligned-vs-baseline comparison.

    kl_samples: {"estimator", "values": per-sample KL, "k1": per-sample k1 values,
    "prompt_ids": prompt of each sample, "tokens": total completion tokens}, or None."""
    resamples, seed, confidence = options["bootstrap_resamples"], options["seed"], options["confidence"]
    aligned_groups, baseline_groups = group_by_prompt(rows[aligned]), group_by_prompt(rows[baseline])
    if set(aligned_groups) != set(baseline_groups):
        raise ValueError(f"{aligned} and {baseline} answered different prompts")
    prompt_ids = list(baseline_groups)
    aligned_rewards = prompt_means([[r["reward"] for r in aligned_groups[p]] for p in prompt_ids])
    baseline_rewards = prompt_means([[r["reward"] for r in baseline_groups[p]] for p in prompt_ids])
    difference = paired_difference(aligned_rewards, baseline_rewards, resamples, seed, confidence)
    wins = prompt_win_rate(aligned_rewards, baseline_rewards, options["tie_tolerance"], confidence)

    kl = None
    if kl_samples is not None:
        kl = kl_interval(kl_samples, resamples, seed, confidence)

    a, b = summaries[aligned], summaries[baseline]
    length = relative_change(a["tokens_mean"], b["tokens_mean"])
    finished_length = relative_change(a["finished_tokens_mean"], b["finished_tokens_mean"])
    style = {rule: a["style_pass_rates"][rule] - b["style_pass_rates"][rule] for rule in b["style_pass_rates"]}
    notes = cost_notes(length, style, options["length_warn"], options["style_warn"],
                       a["truncated_share"] - b["truncated_share"], finished_length)
    adjusted = length_adjusted_difference(
        *([[(r["reward"], r["tokens"]) for r in groups[p]] for p in prompt_ids] for groups in (aligned_groups, baseline_groups)),
        resamples, seed, confidence)
    if adjusted is not None and abs(length) > options["length_warn"]:  # a NaN length change compares False
        notes.append(length_adjusted_note(adjusted))
    label = decide(difference, wins)
    comparison = {
        "aligned": aligned, "baseline": baseline, "reward_difference": difference, "win_rate": wins, "kl": kl,
        "length_adjusted_difference": adjusted, "length_change": length, "finished_length_change": finished_length,
        "cut_share": {aligned: a["truncated_share"], baseline: b["truncated_share"]},
        "style_score_change": a["style_score"] - b["style_score"],
        "style_pass_rate_change": style, "verdict": label, "notes": notes,
    }
    comparison["verdict_line"] = verdict_line(comparison)
    return comparison


def length_adjusted_note(adjusted: dict) -> str:
    """`length-adjusted reward +0.18 [0.14, 0.23]` (`align.evaluation.length_adjusted_difference`), and
    whether the length change can explain the whole difference."""
    note = (f"length-adjusted reward {fmt_signed(adjusted['difference'])} [{adjusted['low']:.2f}, {adjusted['high']:.2f}]"
            f" at the reward model's slope {adjusted['slope']:+.2f} per unit of log length")
    if adjusted["low"] <= 0 <= adjusted["high"]:
        note += ": the length change may explain the difference"
    return note


def kl_interval(kl_samples: dict, resamples: int, seed: int, confidence: float) -> dict:
    """Mean per-response KL with a bootstrap interval over prompts (a prompt's KL: mean over its samples)."""
    per_prompt: dict[str, list[float]] = {}
    for prompt_id, value in zip(kl_samples["prompt_ids"], kl_samples["values"]):
        per_prompt.setdefault(prompt_id, []).append(float(value))
    kl = mean_interval(prompt_means(list(per_prompt.values())), resamples, seed, confidence)
    values = np.asarray(kl_samples["values"], dtype=np.float64)
    kl.update(estimator=kl_samples["estimator"], samples=int(values.size),
              per_token=float(values.sum() / kl_samples["tokens"]) if kl_samples["tokens"] else float("nan"),
              k1_mean=float(np.mean(kl_samples["k1"])))
    return kl


def fmt_signed(value: float, digits: int = 2) -> str:
    return f"{value:+.{digits}f}"


def missing(value) -> bool:
    """None (a NaN after a JSON round trip) or NaN: a number that could not be computed."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value, spec: str) -> str:
    return "n/a" if missing(value) else format(value, spec)


def fmt_pct(value: float) -> str:
    return fmt(value, ".0%")


def verdict_line(comparison: dict, stage: str = "compare") -> str:
    """`[compare] dpo vs sft: reward +0.42 [0.21, 0.63], win rate 68% [59%, 76%], KL 0.12 nats, length +8% -> aligned is better`"""
    d, w, kl = comparison["reward_difference"], comparison["win_rate"], comparison["kl"]
    parts = [
        f"reward {fmt_signed(d['difference'])} [{d['low']:.2f}, {d['high']:.2f}]",
        f"win rate {fmt_pct(w['rate'])} [{fmt_pct(w['low'])}, {fmt_pct(w['high'])}] ({w['ties']} ties)",
    ]
    if kl is not None:
        parts.append(f"KL {kl['mean']:.3g} nats")
    length = f"length {fmt(comparison['length_change'], '+.0%')}"
    cut = comparison.get("cut_share")
    if cut:  # older reports (before cut answers were counted) have neither
        # no " -> " inside: that arrow separates the numbers from the verdict
        length += (f" (finished answers {fmt(comparison['finished_length_change'], '+.0%')}; cut at the cap: "
                   f"{comparison['baseline']} {fmt_pct(cut[comparison['baseline']])}, "
                   f"{comparison['aligned']} {fmt_pct(cut[comparison['aligned']])})")
    parts.append(length)
    line = f"[{stage}] {comparison['aligned']} vs {comparison['baseline']}: " + ", ".join(parts)
    line += f" -> {VERDICTS[comparison['verdict']]}"
    if comparison["notes"]:
        line += " (" + "; ".join(comparison["notes"]) + ")"
    return line


def response_rows(prompts: list[dict], label: str, samples: list[list], checkpoint: str) -> list[dict]:
    """One row per response (no rewards yet), as samples.jsonl holds them: `prompts` are
    `align.data.load_prompts` records, `samples` per prompt the model's `Sample`s."""
    rows = []
    for prompt, group in zip(prompts, samples):
        unsafe = is_unsafe_prompt(last_user_text(prompt["prompt"]))
        for index, sample in enumerate(group):
            tokens = len(sample.token_ids) - (1 if sample.finish_reason == "stop" else 0)  # without the eos
            rows.append({
                "prompt_id": prompt["prompt_id"], "prompt": prompt["prompt"], "unsafe_prompt": unsafe,
                "model": label, "checkpoint": checkpoint, "sample": index, "text": sample.text,
                "tokens": tokens, "words": word_count(sample.text), "finish_reason": sample.finish_reason,
                "style": check_response(sample.text, unsafe), "style_score": style_score(sample.text, unsafe),
            })
    return rows


def score_rows(scorer, rows: list[dict], truncation_penalty: float = 0.0) -> None:
    """`reward_model_score` of every row, and its `reward` (`align.scoring.effective_reward`: a cut answer
    scores `truncation_penalty` lower). Each distinct (prompt, response) is scored once, so identical
    responses tie exactly."""
    keys, unique = {}, []
    for row in rows:
        key = (row["prompt_id"], row["text"])
        if key not in keys:
            keys[key] = len(unique)
            unique.append(row)
    scores = scorer.score([row["prompt"] for row in unique], [row["text"] for row in unique], progress="reward")
    for row in rows:
        row["reward_model_score"] = scores[keys[(row["prompt_id"], row["text"])]]
        row["reward"] = effective_reward(row["reward_model_score"], row["finish_reason"], truncation_penalty)


def compare_models(rows: list[dict], labels: list[str], kl: dict, options: dict) -> tuple[dict, list[dict]]:
    """(per-model summaries, one comparison per model after the first, the baseline): what compare
    reports and what a policy stage's held-out verdict is. `kl`: per aligned label, `compare_pair`'s
    kl_samples (or None)."""
    by_model = {label: [row for row in rows if row["model"] == label] for label in labels}
    summaries = {label: summarize_model(by_model[label], options["bootstrap_resamples"], options["seed"],
                                        options["confidence"]) for label in labels}
    comparisons = [compare_pair(label, labels[0], by_model, summaries, kl.get(label), options) for label in labels[1:]]
    return summaries, comparisons


def read_samples(folder: Path) -> list[dict]:
    return read_jsonl_records(Path(folder) / SAMPLES)
