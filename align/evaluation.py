"""Evaluation arithmetic: reward-model gate metrics and checks, bootstrap intervals,
win rates, and the paired statistics of the compare stage.

Pure numpy functions, no models. Hand-written because the project's stack has
no scipy/sklearn (Spearman, ECE, Wilson and bootstrap intervals are a few lines
each); each function states its exact definition so reports can quote it.

Paired statistics (`prompt_means` ... `decide`): the unit is the PROMPT. Both
models answered the same prompts, so differences are taken per prompt (prompt
difficulty cancels out) and intervals resample prompts, never samples of one
prompt (they are not independent).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Gate thresholds a reward model must meet (configs/reward.yaml sets them): threshold key -> (metric, rule).
GATE_KEYS = {
    "min_accuracy": ("pairwise_accuracy", ">="),
    "min_mean_margin": ("mean_margin", ">="),
    "max_ece": ("ece", "<="),
    "max_abs_length_corr": ("length_correlation", "abs<="),
}
GATE_LABELS = {
    "min_accuracy": "pairwise accuracy",
    "min_mean_margin": "mean margin (r_chosen - r_rejected)",
    "max_ece": "calibration error (ECE)",
    "max_abs_length_corr": "length correlation (Spearman)",
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
                      "observed": float(y[mask].mean()) if n else None})
    return table


def expected_calibration_error(probabilities, outcomes, bins: int = 10) -> float:
    """ECE = sum over equal-width bins of (bin count / N) * |mean predicted - observed frequency|."""
    table = calibration_bins(probabilities, outcomes, bins)
    total = sum(row["count"] for row in table)
    return float(sum(row["count"] / total * abs(row["mean_probability"] - row["observed"])
                     for row in table if row["count"]))


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


@dataclass(frozen=True)
class GateCheck:
    """One threshold of the gate: `passed` is None when its limit is None (not checked)."""

    label: str  # for reports: "pairwise accuracy"
    metric: str  # the metric's key: "pairwise_accuracy"
    value: float | None
    key: str  # the threshold's key: "min_accuracy"
    limit: float | None
    rule: str  # ">=", "<=" or "abs<="
    passed: bool | None
    reason: str | None = None  # why it failed, as in GateResult.reasons

    @property
    def threshold_text(self) -> str:
        """`>= 0.6`, `abs <= 0.5`, or `-` when not checked."""
        return "-" if self.limit is None else f"{self.rule.replace('abs<=', 'abs <=')} {self.limit}"


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict: `passed`, `reasons` (one line per failed check) and every `checks` entry."""

    passed: bool
    reasons: list[str]
    checks: list[GateCheck]

    @classmethod
    def not_measured(cls, reason: str) -> GateResult:
        """A gate that could not be checked (no held-out pairs): failed, no checks."""
        return cls(passed=False, reasons=[reason], checks=[])


def reward_gate(metrics: dict, thresholds: dict) -> GateResult:
    """Every threshold given (not None) must hold; one GateCheck per GATE_KEYS entry, in that order
    (a threshold that is None or not given is a check with `passed` None: not checked).

    thresholds keys: min_accuracy, min_mean_margin, max_ece, max_abs_length_corr.
    A missing or NaN metric fails its check (it could not be shown to hold)."""
    for key in thresholds:
        if key not in GATE_KEYS:
            raise ValueError(f"unknown gate threshold {key!r}; known: {', '.join(GATE_KEYS)}")
    checks = [_gate_check(key, thresholds.get(key), metrics) for key in GATE_KEYS]
    reasons = [check.reason for check in checks if check.reason]
    return GateResult(passed=not reasons, reasons=reasons, checks=checks)


def _gate_check(key: str, limit: float | None, metrics: dict) -> GateCheck:
    metric, rule = GATE_KEYS[key]
    value = metrics.get(metric)
    reason = None
    if limit is None:
        passed = None
    elif value is None or (isinstance(value, float) and math.isnan(value)):
        passed, reason = False, f"{metric} is undefined (needed for {key} {limit})"
    elif rule == ">=":
        passed = value >= limit
        reason = None if passed else f"{metric} {value:.3f} < {key} {limit}"
    elif rule == "<=":
        passed = value <= limit
        reason = None if passed else f"{metric} {value:.3f} > {key} {limit}"
    else:  # abs<=
        passed = abs(value) <= limit
        reason = None if passed else f"|{metric}| {abs(value):.3f} > {key} {limit}"
    return GateCheck(label=GATE_LABELS[key], metric=metric, value=value, key=key, limit=limit, rule=rule,
                     passed=None if passed is None else bool(passed), reason=reason)


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
                   rate_ties_half=(wins + 0.5 * ties) / a.size)


def _pair_arrays(first, second) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1 or first.size == 0:
        raise ValueError(f"expected two non-empty 1-D arrays of equal length, got {first.shape} and {second.shape}")
    return first, second


# ----------------------------------------------------------------------------- paired statistics (compare stage)


def prompt_means(samples_per_prompt: list[list[float]]) -> np.ndarray:
    """One number per prompt: the mean over its samples."""
    if not samples_per_prompt or any(len(values) == 0 for values in samples_per_prompt):
        raise ValueError("every prompt needs at least one sample")
    return np.array([float(np.mean(values)) for values in samples_per_prompt], dtype=np.float64)


def mean_interval(values, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """{"mean", "low", "high"}: percentile bootstrap interval of the mean."""
    mean, low, high = bootstrap_mean_ci(values, resamples, seed, confidence)
    return {"mean": mean, "low": low, "high": high}


def paired_difference(aligned, baseline, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean of the paired differences aligned - baseline (one pair per prompt) with its bootstrap interval.

    Paired, not two independent means: both models answered the same prompts, and
    prompt difficulty (which moves both rewards together) cancels out."""
    aligned, baseline = np.asarray(aligned, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if aligned.shape != baseline.shape or aligned.size == 0:
        raise ValueError(f"paired values must be non-empty and equally long, got {aligned.shape} and {baseline.shape}")
    interval = mean_interval(aligned - baseline, resamples, seed, confidence)
    return {"aligned": float(aligned.mean()), "baseline": float(baseline.mean()), "difference": interval["mean"],
            "low": interval["low"], "high": interval["high"], "prompts": int(aligned.size)}


def length_adjusted_difference(aligned: list[list[tuple[float, int]]], baseline: list[list[tuple[float, int]]],
                               resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict | None:
    """The paired reward difference with the part that the length change explains taken out.

    `aligned`, `baseline`: per prompt (the same prompts, in the same order), each sample's
    (reward, response tokens). Hand-written: no library offers it. The reward model's length slope
    is estimated where only length varies, between samples of one model for one prompt:
        slope = sum (l - l_pm)(r - r_pm) / sum (l - l_pm)^2,   l = log(1 + tokens),
    `_pm` the mean of prompt p's samples from model m. Then, per prompt,
        adjusted_p = (r_ap - r_bp) - slope * (l_ap - l_bp),
    means over each model's samples. The slope comes from within a model, so a gain that comes
    with the new policy's other changes is not counted as length; the linear model is an
    assumption (it extrapolates the within-prompt slope to the length change). In the spirit of
    AlpacaEval 2's length-controlled win rate, on the reward scale.

    Returns {"difference", "low", "high" (percentile bootstrap over prompts, the slope re-estimated
    in each resample), "slope" (reward per unit log length), "log_length_ratio" (mean l_a - l_b),
    "prompts"}, or None when no two samples of a model for a prompt differ in length (one sample
    each): then there is nothing to estimate the slope from."""
    if len(aligned) != len(baseline) or not aligned:
        raise ValueError(f"paired prompts must be non-empty and equally many, got {len(aligned)} and {len(baseline)}")
    covariance, variance, difference, log_ratio = (np.zeros(len(aligned)) for _ in range(4))
    for index, groups in enumerate(zip(aligned, baseline)):
        means = []
        for group in groups:
            rewards = np.array([reward for reward, _ in group], dtype=np.float64)
            lengths = np.log1p(np.array([tokens for _, tokens in group], dtype=np.float64))
            covariance[index] += ((lengths - lengths.mean()) * (rewards - rewards.mean())).sum()
            variance[index] += ((lengths - lengths.mean()) ** 2).sum()
            means.append((rewards.mean(), lengths.mean()))
        (reward_a, length_a), (reward_b, length_b) = means
        difference[index], log_ratio[index] = reward_a - reward_b, length_a - length_b
    if variance.sum() == 0:
        return None
    slope = covariance.sum() / variance.sum()
    picks = np.random.default_rng(seed).integers(0, len(aligned), size=(resamples, len(aligned)))
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without length variation: NaN, left out
        slopes = covariance[picks].sum(axis=1) / variance[picks].sum(axis=1)
    adjusted = (difference[picks] - slopes[:, None] * log_ratio[picks]).mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(adjusted, [tail, 100 - tail])
    return {"difference": float((difference - slope * log_ratio).mean()), "low": float(low), "high": float(high),
            "slope": float(slope), "log_length_ratio": float(log_ratio.mean()), "prompts": len(aligned)}


def prompt_win_rate(aligned, baseline, tie_tolerance: float = 0.0, confidence: float = 0.95) -> dict:
    """Wins / ties / losses of aligned over baseline per prompt; rate = wins / (wins + losses), Wilson interval."""
    return win_rate(aligned, baseline, tie_tolerance=tie_tolerance, confidence=confidence).as_dict()


def relative_change(new: float, old: float) -> float:
    """(new - old) / |old|; NaN when old is 0."""
    return (new - old) / abs(old) if old else float("nan")


def pass_rates(checks: list[dict[str, bool]]) -> dict[str, float]:
    """Share of responses passing each rule."""
    if not checks:
        return {}
    return {rule: float(np.mean([bool(check[rule]) for check in checks])) for rule in checks[0]}


def decide(difference: dict, wins: dict) -> str:
    """better | worse | inconclusive.

    better: the reward-difference interval lies above 0 AND the win-rate interval
    lies above 50%. worse: both below. Anything else (an interval touching the
    no-effect value, or the two measures disagreeing) is inconclusive."""
    decided = wins["wins"] + wins["losses"] > 0
    if difference["low"] > 0 and decided and wins["low"] > 0.5:
        return "better"
    if difference["high"] < 0 and decided and wins["high"] < 0.5:
        return "worse"
    return "inconclusive"
