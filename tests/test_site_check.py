"""``savlt site-check``'s numbers: Wilson intervals on hand-computed cases, the accepted
spot-check scans' sensitivity and specificity, and the labelling budget of a no-go."""

from __future__ import annotations

import numpy as np
import pytest

from tools.site_check import measured, scans_to_label, wilson


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # p = 0.8, n = 10: centre (0.8 + 0.19208) / 1.38416 = 0.71673,
        # half 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.22658
        (8, 10, 0.4902, 0.9433),
        (0, 10, 0.0, 0.2775),  # centre = half = 0.19208 / 1.38416 = 0.13877
        (10, 10, 0.7225, 1.0),
        (20, 40, 0.3520, 0.6480),  # half 1.96 * sqrt(0.00625 + 0.0006002) / 1.09604
        (17, 20, 0.6396, 0.9476),  # centre 0.94604 / 1.19208, half 0.18361 / 1.19208
    ],
)
def test_wilson_interval_on_hand_computed_cases(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(3, 2)
    with pytest.raises(ValueError, match="n > 0"):
        wilson(0, 0)


def test_spot_check_counts_only_accepted_scans():
    # classes (low, high); positive = [1]; threshold 0.6 refers the two 0.55 scans
    probs = np.array(
        [[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.7, 0.3], [0.45, 0.55], [0.55, 0.45], [0.1, 0.9]]
    )
    labels = np.array([0, 1, 1, 1, 1, 0, 0])
    got = measured(probs, labels, [1], 0.6)
    assert got["accepted"] == 5 and got["labelled"] == 7
    # accepted positives: scans 1, 2 (called high), 3 (called low) -> 2 / 3
    assert got["sensitivity"]["k"] == 2 and got["sensitivity"]["n"] == 3
    assert got["sensitivity"]["value"] == pytest.approx(200 / 3)
    assert got["sensitivity"]["wilson95"] == pytest.approx([100 * v for v in wilson(2, 3)])
    # accepted negatives: scan 0 (low, right), scan 6 (called high, wrong) -> 1 / 2
    assert (got["specificity"]["k"], got["specificity"]["n"]) == (1, 2)
    assert got["specificity"]["value"] == 50.0


def test_a_no_go_asks_for_enough_labels_for_a_15_point_interval():
    # 1.96^2 * 0.25 / 0.15^2 = 42.7 -> 43 per binary class
    assert scans_to_label() == 86
    lo, hi = wilson(21, 43)
    assert hi - lo <= 0.30
