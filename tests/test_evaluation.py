"""Gate metrics, intervals and win rates against hand-computed cases; and the gate
failing on a deliberately bad (untrained, random-head) reward model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from align.evaluation import (
    bootstrap_mean_ci, calibration_bins, expected_calibration_error, length_correlation, mean_margin,
    pair_probabilities, pairwise_accuracy, rank_average, reward_gate, sigmoid, wilson_interval, win_rate,
)  # fmt: skip

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
    assert reward_gate(good, THRESHOLDS) == (True, [])
    bad = {"pairwise_accuracy": 0.55, "mean_margin": -0.1, "ece": 0.3, "length_correlation": 0.7}
    passed, reasons = reward_gate(bad, THRESHOLDS)
    assert not passed
    assert reasons == ["pairwise_accuracy 0.550 < min_accuracy 0.6", "mean_margin -0.100 < min_mean_margin 0.0",
                       "ece 0.300 > max_ece 0.2", "|length_correlation| 0.700 > max_abs_length_corr 0.5"]  # fmt: skip
    # a negative correlation is as suspicious as a positive one
    assert not reward_gate({**good, "length_correlation": -0.6}, THRESHOLDS)[0]
    # undefined metric fails; a threshold of None is not checked
    assert reward_gate({**good, "length_correlation": float("nan")}, THRESHOLDS)[1] == [
        "length_correlation is undefined (needed for max_abs_length_corr 0.5)"]
    assert reward_gate({**good, "ece": 0.9}, {**THRESHOLDS, "max_ece": None}) == (True, [])
    with pytest.raises(ValueError, match="unknown gate threshold"):
        reward_gate(good, {"min_acc": 0.5})


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
                                                        + [len(p["rejected"]) for p in pairs])}  # fmt: skip
    passed, reasons = reward_gate(metrics, THRESHOLDS)
    assert not passed and reasons
