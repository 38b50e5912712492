"""Evaluation arithmetic: reward-model gate metrics, bootstrap intervals, win rates.

Pure numpy functions, no models. Hand-written because the project's stack has
no scipy/sklearn (Spearman, ECE, Wilson and bootstrap intervals are a few lines
each); each function states its exact definition so reports can quote it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Gate thresholds a reward model must meet (configs/reward.yaml sets them).
GATE_KEYS = {
    "min_accuracy": ("pairwise_accuracy", ">="),
    "min_mean_margin": ("mean_margin", ">="),
    "max_ece": ("ece", "<="),
    "max_abs_length_corr": ("length_correlation", "abs<="),
}


def pairwise_accuracy(chosen_scores, rejected_scores) -> float:
    """Fraction of pairs where the chosen response scores higher; an exact tie counts one half
    (so a model that scores everything the same gets 0.5, like a coin)."""
    chosen, rejected = _pair_arrays(chosen_scores, rejected_scores)
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


def mean_margin(chosen_scores, rejected_scores) -> float:
    """Mean of r_chosen - r_rejected (in reward units)."""
    chosen, rejected = _pair_arrays(chosen_scores, rejected_scores)
    return float(np.mean(chosen - rejected))


def sigmoid(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))  # 1 / (1 + e^-x) without overflow


def pair_probabilities(chosen_scores, rejected_scores) -> tuple[np.ndarray, np.ndarray]:
    """Bradley-Terry probabilities and outcomes for calibration, both orientations of each pair.

    Scored only as (chosen, rejected), every outcome is 1 and ECE collapses to
    1 - mean(p). Each pair is therefore also read as (rejected, chosen): p' = 1 - p,
    outcome 0. The set is symmetric, so it does not matter which side was listed first."""
    chosen, rejected = _pair_arrays(chosen_scores, rejected_scores)
    p = sigmoid(chosen - rejected)
    return np.concatenate([p, 1.0 - p]), np.concatenate([np.ones_like(p), np.zeros_like(p)])


def calibration_bins(probabilities, outcomes, bins: int = 10) -> list[dict]:
    """Equal-width bins over [0, 1]: count, mean predicted probability, observed frequency."""
    p, y = np.asarray(probabilities, dtype=np.float64), np.asarray(outcomes, dtype=np.float64)
    if p.shape != y.shape or p.size == 0:
        raise ValueError("probabilities and outcomes must be non-empty and the same length")
    index = np.minimum((p * bins).astype(int), bins - 1)  # p == 1.0 goes in the last bin
    table = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        table.append({"low": b / bins, "high": (b + 1) / bins, "count": n,
                      "mean_probability": float(p[mask].mean()) if n else None,
                      "observed": float(y[mask].mean()) if n else None})  # fmt: skip
    return table


def expected_calibration_error(probabilities, outcomes, bins: int = 10) -> float:
    """ECE = sum over equal-width bins of (bin count / N) * |mean predicted - observed frequency|."""
    table = calibration_bins(probabilities, outcomes, bins)
    total = sum(row["count"] for row in table)
    return float(sum(row["count"] / total * abs(row["mean_probability"] - row["observed"])
                     for row in table if row["count"]))  # fmt: skip


def rank_average(values) -> np.ndarray:
    """Ranks 1..n, tied values sharing their average rank (as Spearman needs)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # average of ranks start+1..end
            start = end
    return ranks


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def length_correlation(scores, lengths) -> float:
    """Spearman rank correlation between reward scores and response lengths.

    Spearman, not Pearson: a reward model that "likes long answers" shows up as a
    monotone relation whatever its shape, and a few very long responses cannot
    dominate it. NaN when either side is constant."""
    scores, lengths = np.asarray(scores, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    if scores.shape != lengths.shape or scores.size < 2:
        raise ValueError("scores and lengths must be the same length, at least 2")
    return pearson(rank_average(scores), rank_average(lengths))


def reward_gate(metrics: dict, thresholds: dict) -> tuple[bool, list[str]]:
    """(passed, reasons): every threshold given (not None) must hold; reasons say which did not.

    thresholds keys: min_accuracy, min_mean_margin, max_ece, max_abs_length_corr.
    A missing or NaN metric fails its check (it could not be shown to hold)."""
    reasons = []
    for key, limit in thresholds.items():
        if key not in GATE_KEYS:
            raise ValueError(f"unknown gate threshold {key!r}; known: {', '.join(GATE_KEYS)}")
        if limit is None:
            continue
        metric, rule = GATE_KEYS[key]
        value = metrics.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            reasons.append(f"{metric} is undefined (needed for {key} {limit})")
            continue
        if rule == ">=" and not value >= limit:
            reasons.append(f"{metric} {value:.3f} < {key} {limit}")
        elif rule == "<=" and not value <= limit:
            reasons.append(f"{metric} {value:.3f} > {key} {limit}")
        elif rule == "abs<=" and not abs(value) <= limit:
            reasons.append(f"|{metric}| {abs(value):.3f} > {key} {limit}")
    return not reasons, reasons


def bootstrap_mean_ci(
    values, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean (resampling with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, values.size, size=(n_resamples, values.size))
    means = values[samples].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ((0, 1) when there are no trials)."""
    if trials == 0:
        return 0.0, 1.0
    z = _normal_quantile(1 - (1 - confidence) / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF by bisection on math.erf (exact enough for intervals)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            low = mid
        else:
            high = mid
    return (low + high) / 2


@dataclass
class WinRate:
    """A vs B on paired items. Ties are counted apart: `rate` is wins / (wins + losses)
    with a Wilson interval; `rate_ties_half` counts a tie as half a win over all items."""

    wins: int
    ties: int
    losses: int
    n: int
    rate: float
    low: float
    high: float
    rate_ties_half: float

    def as_dict(self) -> dict:
        return asdict(self)


def win_rate(a_scores, b_scores, tie_tolerance: float = 0.0, confidence: float = 0.95) -> WinRate:
    """Paired comparison: A wins an item when a - b > tie_tolerance, loses when b - a > tie_tolerance."""
    a, b = _pair_arrays(a_scores, b_scores)
    difference = a - b
    wins = int((difference > tie_tolerance).sum())
    losses = int((difference < -tie_tolerance).sum())
    ties = int(a.size - wins - losses)
    decisive = wins + losses
    low, high = wilson_interval(wins, decisive, confidence)
    return WinRate(wins=wins, ties=ties, losses=losses, n=int(a.size),
                   rate=wins / decisive if decisive else float("nan"), low=low, high=high,
                   rate_ties_half=(wins + 0.5 * ties) / a.size)  # fmt: skip


def _pair_arrays(first, second) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1 or first.size == 0:
        raise ValueError(f"expected two non-empty 1-D arrays of equal length, got {first.shape} and {second.shape}")
    return first, second
