"""Gate metrics and checks, intervals, win rates and the compare stage's paired statistics
against hand-computed cases; and the gate failing on a deliberately bad (untrained,
random-head) reward model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from align import comparison, evaluation
from align.evaluation import (
    GateCheck, bootstrap_mean_ci, calibration_bins, decide, expected_calibration_error, length_correlation,
    mean_margin, pair_probabilities, paired_difference, pairwise_accuracy, prompt_means, prompt_win_rate,
    rank_average, reward_gate, sigmoid, wilson_interval, win_rate,
)

THRESHOLDS = {"min_accuracy": 0.6, "min_mean_margin": 0.0, "max_ece": 0.2, "max_abs_length_corr": 0.5}


def test_pairwise_accuracy_and_margin():
    # pair 1 right, pair 2 tied (half), pair 3 wrong
    assert pairwise_accuracy([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)
    assert pairwise_accuracy([5, 5], [5, 5]) == 0.5  # a constant model is a coin
    assert mean_margin([1, 2, 3], [0, 2, 4]) == pytest.approx(0.0)
    assert mean_margin([3, 1], [1, 0]) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        pairwise_accuracy([1, 2], [1])


def test_expected_calibration_error_by_hand():
    # 2 bins: [0.1, 0.4] predict 0.25, observe 0.5; [0.8, 0.9] predict 0.85, observe 1.0
    # ECE = 2/4 * 0.25 + 2/4 * 0.15 = 0.2
    assert expected_calibration_error([0.1, 0.4, 0.8, 0.9], [0, 1, 1, 1], bins=2) == pytest.approx(0.2)
    table = calibration_bins([0.1, 0.4, 0.8, 1.0], [0, 1, 1, 1], bins=2)
    assert [row["count"] for row in table] == [2, 2]  # p = 1.0 falls in the last bin
    assert expected_calibration_error([0.3, 0.3, 0.3], [0, 0, 1], bins=10) == pytest.approx(1 / 3 - 0.3)


def test_pair_probabilities_read_both_ways():
    p, y = pair_probabilities([2.0, 0.0], [0.0, 0.0])
    assert p.tolist() == pytest.approx([sigmoid(2.0), 0.5, 1 - sigmoid(2.0), 0.5])
    assert y.tolist() == [1, 1, 0, 0]
    # all margins 0: predicts 0.5, observes half -> perfectly calibrated, though useless
    assert expected_calibration_error(*pair_probabilities([1, 1, 1], [1, 1, 1])) == pytest.approx(0.0)
    # confident and right
    assert expected_calibration_error(*pair_probabilities([20.0] * 4, [0.0] * 4)) < 1e-6
    # confident and wrong
    assert expected_calibration_error(*pair_probabilities([0.0] * 4, [20.0] * 4)) > 0.99


def test_length_correlation_is_spearman():
    assert length_correlation([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert length_correlation([4, 3, 2, 1], [1, 2, 3, 4]) == pytest.approx(-1.0)
    # ties share ranks: scores ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5)
    assert length_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert rank_average([10, 30, 20, 20]).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert math.isnan(length_correlation([1, 1, 1], [1, 2, 3]))


def test_reward_gate():
    good = {"pairwise_accuracy": 0.8, "mean_margin": 1.2, "ece": 0.05, "length_correlation": -0.1}
    result = reward_gate(good, THRESHOLDS)
    assert (result.passed, result.reasons) == (True, [])
    bad = {"pairwise_accuracy": 0.55, "mean_margin": -0.1, "ece": 0.3, "length_correlation": 0.7}
    result = reward_gate(bad, THRESHOLDS)
    passed, reasons = result.passed, result.reasons
    assert not passed
    assert reasons == ["pairwise_accuracy 0.550 < min_accuracy 0.6", "mean_margin -0.100 < min_mean_margin 0.0",
                       "ece 0.300 > max_ece 0.2", "|length_correlation| 0.700 > max_abs_length_corr 0.5"]
    # a negative correlation is as suspicious as a positive one
    assert not reward_gate({**good, "length_correlation": -0.6}, THRESHOLDS).passed
    # undefined metric fails; a threshold of None is not checked
    assert reward_gate({**good, "length_correlation": float("nan")}, THRESHOLDS).reasons == [
        "length_correlation is undefined (needed for max_abs_length_corr 0.5)"]
    result = reward_gate({**good, "ece": 0.9}, {**THRESHOLDS, "max_ece": None})
    assert (result.passed, result.reasons) == (True, [])
    with pytest.raises(ValueError, match="unknown gate threshold"):
        reward_gate(good, {"min_acc": 0.5})


def test_reward_gate_checks_are_structured():
    """One check per threshold, in a fixed order, with what a report needs: no string matching of reasons."""
    metrics = {"pairwise_accuracy": 0.55, "mean_margin": 1.2, "ece": float("nan"), "length_correlation": -0.7}
    result = reward_gate(metrics, {**THRESHOLDS, "min_mean_margin": None})
    assert [check.key for check in result.checks] == ["min_accuracy", "min_mean_margin", "max_ece", "max_abs_length_corr"]
    accuracy, margin, ece, length = result.checks
    assert accuracy == GateCheck(label="pairwise accuracy", metric="pairwise_accuracy", value=0.55, key="min_accuracy",
                                 limit=0.6, rule=">=", passed=False, reason="pairwise_accuracy 0.550 < min_accuracy 0.6")
    assert (margin.passed, margin.reason, margin.threshold_text) == (None, None, "-")  # not checked
    assert (ece.passed, ece.reason) == (False, "ece is undefined (needed for max_ece 0.2)")
    assert (length.passed, length.threshold_text) == (False, "abs <= 0.5")
    assert accuracy.threshold_text == ">= 0.6" and ece.threshold_text == "<= 0.2"
    # the reasons are exactly the failed checks' reasons, in check order
    assert result.reasons == [c.reason for c in result.checks if c.passed is False] and not result.passed
    assert all(c.passed for c in reward_gate({**metrics, "pairwise_accuracy": 0.9, "ece": 0.1,
                                              "length_correlation": 0.2}, THRESHOLDS).checks)
    # a gate on no keys at all still lists every check, none checked, and passes
    empty = reward_gate(metrics, {})
    assert empty.passed and [c.passed for c in empty.checks] == [None] * 4


def test_bootstrap_mean_ci():
    assert bootstrap_mean_ci([2.0] * 10) == (2.0, 2.0, 2.0)
    values = np.random.default_rng(0).normal(1.0, 1.0, size=400)
    mean, low, high = bootstrap_mean_ci(values, seed=1)
    assert low < mean < high and high - low == pytest.approx(2 * 1.96 / 20, rel=0.25)  # ~ +-1.96 sd/sqrt(n)
    assert bootstrap_mean_ci(values, seed=1) == (mean, low, high)  # seeded: reproducible


def test_wilson_and_win_rate():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    result = win_rate([3, 2, 1, 1], [1, 2, 2, 0])  # win, tie, loss, win
    assert (result.wins, result.ties, result.losses, result.n) == (2, 1, 1, 4)
    assert result.rate == pytest.approx(2 / 3) and result.rate_ties_half == pytest.approx(2.5 / 4)
    assert (result.low, result.high) == pytest.approx(wilson_interval(2, 3))
    near = win_rate([1.0, 1.05], [1.0, 1.0], tie_tolerance=0.1)
    assert (near.wins, near.ties, near.losses) == (0, 2, 0) and math.isnan(near.rate)


# ----------------------------------------------------------------------------- paired statistics (compare stage)


def test_prompt_means_average_samples_of_a_prompt():
    assert prompt_means([[1.0, 3.0], [2.0], [-1.0, 0.0, 4.0]]).tolist() == [2.0, 2.0, 1.0]
    with pytest.raises(ValueError):
        prompt_means([[1.0], []])


def test_paired_difference_hand_computed():
    # differences 1, 1, 1: every resample has mean 1, so the interval collapses on it
    d = paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0], resamples=500)
    assert (d["difference"], d["low"], d["high"]) == (1.0, 1.0, 1.0)
    assert d["aligned"] == 3.0 and d["baseline"] == 2.0 and d["prompts"] == 3
    # differences 0 and 1: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% percentiles are 0 and 1, and the mean is 0.5
    d = paired_difference([0.0, 1.0], [0.0, 0.0], resamples=4000, seed=3)
    assert (d["difference"], d["low"], d["high"]) == (0.5, 0.0, 1.0)
    # the share of resamples with mean 0.5 is about 1/2 (binomial check of the resampling itself)
    assert bootstrap_mean_ci([0.0, 1.0], 4000, 3, confidence=0.4)[1:] == (0.5, 0.5)


def test_win_rate_counts_ties_apart_hand_computed():
    # per prompt: win, loss, tie, win, tie  -> 2 wins, 1 loss, 2 ties; rate 2/3
    w = prompt_win_rate([3.0, 1.0, 2.0, 5.0, 0.5], [1.0, 2.0, 2.0, 4.0, 0.5])
    assert (w["wins"], w["losses"], w["ties"], w["n"]) == (2, 1, 2, 5)
    assert w["rate"] == pytest.approx(2 / 3)
    assert w["rate_ties_half"] == pytest.approx(3 / 5)
    # Wilson 95% for 2 of 3, by hand: z = 1.959964; centre (p + z^2/2n)/(1 + z^2/n); half-width z*sqrt(p(1-p)/n + z^2/4n^2)/(1 + z^2/n)
    z, n, p = 1.959964, 3, 2 / 3
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (w["low"], w["high"]) == (pytest.approx(centre - half, abs=1e-5), pytest.approx(centre + half, abs=1e-5))
    assert w["low"] == pytest.approx(0.2077, abs=1e-4) and w["high"] == pytest.approx(0.9385, abs=1e-4)
    # a tolerance turns small differences into ties
    w = prompt_win_rate([1.05, 1.0], [1.0, 1.2], tie_tolerance=0.1)
    assert (w["wins"], w["losses"], w["ties"]) == (0, 1, 1)


def test_verdict_rules():
    up = {"difference": 0.4, "low": 0.1, "high": 0.7}
    across = {"difference": 0.1, "low": -0.1, "high": 0.3}
    down = {"difference": -0.4, "low": -0.7, "high": -0.1}
    wins_up = {"wins": 30, "losses": 10, "low": 0.6, "high": 0.85}
    wins_across = {"wins": 12, "losses": 10, "low": 0.35, "high": 0.7}
    wins_down = {"wins": 10, "losses": 30, "low": 0.15, "high": 0.4}
    assert decide(up, wins_up) == "better"
    assert decide(down, wins_down) == "worse"
    assert decide(across, wins_up) == "inconclusive"
    assert decide(up, wins_across) == "inconclusive"
    assert decide(up, {"wins": 0, "losses": 0, "low": 0.0, "high": 1.0}) == "inconclusive"


def test_gate_fails_on_an_untrained_reward_model(tiny_model_dir, tiny_data):
    """A random score head on the tiny model: scores are noise, so the gate must fail."""
    from transformers import AutoModelForSequenceClassification

    from align import data
    from align.models import load_tokenizer
    from align.preferences import ranked_to_pairs
    from align.scoring import reward_text, score_texts

    import torch

    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)  # the new score head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    pairs, _ = ranked_to_pairs(data.load_ranked(tiny_data["ranked"]))
    chosen = score_texts(model, tokenizer, [reward_text(tokenizer, p["prompt"], p["chosen"]) for p in pairs])
    rejected = score_texts(model, tokenizer, [reward_text(tokenizer, p["prompt"], p["rejected"]) for p in pairs])
    metrics = {"pairwise_accuracy": pairwise_accuracy(chosen, rejected), "mean_margin": mean_margin(chosen, rejected),
               "ece": expected_calibration_error(*pair_probabilities(chosen, rejected)),
               "length_correlation": length_correlation(chosen + rejected, [len(p["chosen"]) for p in pairs]
                                                        + [len(p["rejected"]) for p in pairs])}
    result = reward_gate(metrics, THRESHOLDS)
    assert not result.passed and result.reasons


# ----------------------------------------------------------------------------- length-adjusted difference


def _samples(effect: float, slope: float, lengths: list[list[int]]) -> list[list[tuple[float, int]]]:
    """Per prompt, (reward, tokens) with reward = prompt level + effect + slope * log(1 + tokens)."""
    return [[(prompt / 10 + effect + slope * math.log1p(tokens), tokens) for tokens in group]
            for prompt, group in enumerate(lengths)]


def test_length_adjusted_difference_removes_what_the_length_slope_explains():
    """Noise-free rewards: the slope comes back exactly, and so does the model's own effect (0.3),
    though the aligned answers are twice as long and the plain difference is larger."""
    baseline_lengths = [[20 + prompt, 40 + prompt] for prompt in range(12)]
    aligned_lengths = [[2 * t for t in group] for group in baseline_lengths]
    aligned, baseline = _samples(0.3, 0.5, aligned_lengths), _samples(0.0, 0.5, baseline_lengths)
    result = evaluation.length_adjusted_difference(aligned, baseline, resamples=200, seed=0)
    assert result["slope"] == pytest.approx(0.5)
    assert result["difference"] == pytest.approx(0.3) and result["low"] == pytest.approx(0.3)
    assert result["high"] == pytest.approx(0.3)
    plain = np.mean([np.mean([r for r, _ in a]) - np.mean([r for r, _ in b]) for a, b in zip(aligned, baseline)])
    assert plain == pytest.approx(0.3 + 0.5 * result["log_length_ratio"]) and plain > 0.6
    assert result["prompts"] == 12


def test_a_gain_from_brevity_alone_adjusts_to_zero_and_the_note_says_so():
    """The reward model likes short answers (slope -0.4) and the policy only got shorter."""
    baseline_lengths = [[60 + prompt, 90 + 2 * prompt] for prompt in range(10)]
    aligned_lengths = [[t // 3 for t in group] for group in baseline_lengths]
    aligned, baseline = _samples(0.0, -0.4, aligned_lengths), _samples(0.0, -0.4, baseline_lengths)
    result = evaluation.length_adjusted_difference(aligned, baseline, resamples=200, seed=0)
    assert result["difference"] == pytest.approx(0.0, abs=1e-9) and result["slope"] == pytest.approx(-0.4)
    plain = np.mean([np.mean([r for r, _ in a]) - np.mean([r for r, _ in b]) for a, b in zip(aligned, baseline)])
    assert plain > 0.4
    assert comparison.length_adjusted_note({**result, "low": -0.01, "high": 0.01}).endswith(
        ": the length change may explain the difference")
    assert "may explain" not in comparison.length_adjusted_note({**result, "difference": 0.2, "low": 0.1, "high": 0.3})


def test_length_adjusted_slope_by_hand_and_none_without_length_variation():
    """One prompt; aligned samples (1.0, 3 tokens), (2.0, 7 tokens); baseline (0.0, 3), (0.0, 3)."""
    aligned, baseline = [[(1.0, 3), (2.0, 7)]], [[(0.0, 3), (0.0, 3)]]
    l3, l7 = math.log(4), math.log(8)
    slope = ((l7 - l3) / 2 * 0.5 * 2) / ((l7 - l3) ** 2 / 4 * 2)  # deviations +-(l7-l3)/2 and +-0.5
    result = evaluation.length_adjusted_difference(aligned, baseline, resamples=50)
    assert result["slope"] == pytest.approx(slope) == pytest.approx(1 / math.log(2))
    assert result["difference"] == pytest.approx(1.5 - slope * ((l3 + l7) / 2 - l3))
    assert evaluation.length_adjusted_difference([[(1.0, 5)]], [[(0.0, 9)]]) is None  # one sample each
    with pytest.raises(ValueError):
        evaluation.length_adjusted_difference([[(1.0, 5)]], [])
