"""Selective prediction (savlt_model.referral): the threshold from hospitals' summed bin
counts is the pooled one, it accepts the target share of in-distribution scans, and the
decisions, risk-coverage curve and accepted-scan scores are right on hand-made numbers."""

from __future__ import annotations

import math
from functools import reduce
from operator import add

import numpy as np
import pytest

from savlt_model.calibration import (
    LOG_T_GRID,
    CalibrationSums,
    FeatureStats,
    calibration_from_dict,
    calibration_to_dict,
    fit_calibrations,
    site_val_stats,
    softmax,
)
from savlt_model.config import CalibrationConfig
from savlt_model.messages import CALIBRATION_STATS_KEYS, referral_counts_from, val_stats_metrics
from savlt_model.referral import (
    CONFIDENCE_BINS,
    REFER,
    ReferralCounts,
    accepted,
    accepted_scores,
    decide,
    risk_coverage,
    threshold_for_coverage,
)

C, D = 5, 16


def _site(rng: np.random.Generator, n: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, C, n)
    f = centres[labels] + 1.2 * rng.normal(size=(n, D))
    return f / np.linalg.norm(f, axis=1, keepdims=True), labels


def _world(seed: int = 0) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(C, D))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return rng, centres, 8.0 * centres


def test_threshold_from_summed_hospital_counts_equals_the_pooled_one():
    rng, centres, w = _world(1)
    sites = [_site(rng, n, centres) for n in (40, 65, 90)]
    feats = np.concatenate([f for f, _ in sites])
    labels = np.concatenate([y for _, y in sites])
    reference = feats.mean(0)
    parts = [site_val_stats(f, y, w, reference) for f, y in sites]
    # each hospital's counts go through the reply message and back
    sent = [referral_counts_from(val_stats_metrics(*p)) for p in parts]
    assert set(val_stats_metrics(*parts[0])) == CALIBRATION_STATS_KEYS
    summed = reduce(add, sent)
    sums = CalibrationSums(
        FeatureStats.of(feats),
        reduce(add, (p[0] for p in parts)),
        reduce(add, (p[1] for p in parts)),
        summed,
    )
    inductive, recentred = fit_calibrations(sums, CalibrationConfig())
    # pooled: the same scans scored in one place at the fitted temperature, on the same bins
    pooled_probs = softmax(feats @ w.T / inductive.temperature)
    pooled = ReferralCounts.of(pooled_probs, labels)
    np.testing.assert_array_equal(summed.count[sums.plain.best], pooled.count)
    np.testing.assert_array_equal(summed.correct[sums.plain.best], pooled.correct)
    assert inductive.refer_below == threshold_for_coverage(pooled.count, 0.8)
    assert 0 < inductive.refer_below < 1
    assert recentred is not None and recentred.refer_below == inductive.refer_below
    # the threshold survives the JSON form an exported model keeps
    assert (
        calibration_from_dict(calibration_to_dict(inductive)).refer_below == inductive.refer_below
    )
    assert summed.count.shape == (len(LOG_T_GRID), CONFIDENCE_BINS)
    forged = val_stats_metrics(*parts[0])
    forged["referral-count"] = [*forged["referral-count"][:-1], 5]  # one row counts more scans
    with pytest.raises(ValueError, match="different numbers of scans"):
        referral_counts_from(forged)
    assert summed.count.sum() == len(LOG_T_GRID) * len(labels)


def test_in_distribution_acceptance_is_within_the_binomial_interval_of_the_target():
    rng, centres, w = _world(2)
    val = [_site(rng, 150, centres) for _ in range(3)]  # three hospitals' validation splits
    counts = reduce(add, (ReferralCounts.of(softmax(f @ w.T), y) for f, y in val))
    for target in (0.8, 0.6):
        t = threshold_for_coverage(counts.count, target)
        test_f, _ = _site(rng, 2000, centres)  # new in-distribution scans
        rate = accepted(softmax(test_f @ w.T), t).mean()
        half = 1.96 * math.sqrt(target * (1 - target) / 2000)
        assert abs(rate - target) <= half + 1 / 100, (target, rate)  # + one 1 % bin's slack


def test_threshold_decisions_and_risk_coverage_on_hand_numbers():
    count = np.zeros(CONFIDENCE_BINS)
    count[[30, 50, 70, 90]] = [2, 3, 3, 2]  # 10 scans
    assert threshold_for_coverage(count, 0.8) == 0.50  # 8 of 10 have confidence >= 0.50
    assert threshold_for_coverage(count, 0.5) == 0.70  # 5 of 10 >= 0.70
    assert threshold_for_coverage(count, 1.0) == 0.30
    assert threshold_for_coverage(np.zeros(CONFIDENCE_BINS), 0.8) == 0.0
    with pytest.raises(ValueError, match="coverage"):
        threshold_for_coverage(count, 0.0)
    probs = np.array([[0.9, 0.1], [0.45, 0.55], [0.3, 0.7], [0.5, 0.5]])
    labels = np.array([0, 0, 1, 1])
    assert decide(probs, ["a", "b"], 0.6) == ["a", REFER, "b", REFER]
    cov, risk = risk_coverage(probs, labels)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.0, 1 / 3, 2 / 4])  # 0.55 -> b (wrong), 0.5 -> a
    scores = accepted_scores(probs, labels, [1], 0.6)
    assert scores == {
        "referral_rate": 50.0,
        "accepted_sensitivity": 100.0,
        "accepted_specificity": 100.0,
    }
