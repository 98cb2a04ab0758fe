"""Selective prediction: every scan gets a class or "refer" (to a human reader).

Why: at a scanner the model never saw, its ranking can be poor and no label-free map is
known to fix every scanner (docs/scanner-shift.md). What stays safe is to say so per scan:
the confidence of a prediction is its largest calibrated probability, and scans below a
threshold are referred. The threshold is set for a target coverage (share of
in-distribution scans accepted) on the training hospitals' validation scans, from counts
on a fixed, shared grid of confidence bins: each hospital sends, per bin, how many of its
validation scans fall there and how many of them were right; counts add, so the server
sets the threshold from the totals exactly as it would from the pooled scans, and no
scan-level value leaves a hospital (:mod:`server.calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFER = "refer"  # the decision for a scan the model should not read alone
# The shared bin grid: bin b holds confidences in [b / B, (b + 1) / B) (1.0 in the last).
# Fixed so that every hospital's counts line up; 1 % wide, so a threshold set at a bin
# edge accepts at most one bin's share of scans more than the target.
CONFIDENCE_BINS = 100


def confidence(probs: np.ndarray) -> np.ndarray:
    """Confidence of each prediction: the largest calibrated class probability."""
    return np.asarray(probs, dtype=np.float64).max(axis=1)


def bin_of(conf: np.ndarray) -> np.ndarray:
    """Index of each confidence on the shared grid."""
    b = np.floor(np.asarray(conf, dtype=np.float64) * CONFIDENCE_BINS).astype(int)
    return np.clip(b, 0, CONFIDENCE_BINS - 1)


@dataclass(frozen=True)
class ReferralCounts:
    """Scans and correct predictions per confidence bin; leading axes (e.g. one row per
    temperature of the calibration grid) are allowed. Counts of disjoint sets add."""

    count: np.ndarray  # (..., B)
    correct: np.ndarray  # (..., B)

    @classmethod
    def of(cls, probs: np.ndarray, labels: np.ndarray) -> ReferralCounts:
        """Counts of one set of scored scans (probabilities (N, C), true classes (N,))."""
        p = np.asarray(probs, dtype=np.float64)
        which = bin_of(confidence(p)) if len(p) else np.zeros(0, dtype=int)
        right = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64) if len(p) else []
        return cls(
            np.bincount(which, minlength=CONFIDENCE_BINS).astype(np.float64),
            np.bincount(which, weights=right, minlength=CONFIDENCE_BINS).astype(np.float64),
        )

    def __add__(self, other: ReferralCounts) -> ReferralCounts:
        return ReferralCounts(self.count + other.count, self.correct + other.correct)


def threshold_for_coverage(count: np.ndarray, coverage: float) -> float:
    """The highest bin edge t whose accepted share (scans with confidence >= t) is at least
    ``coverage``; 0.0 (accept all) without scans. Pure: the same totals give the same t."""
    if not 0 < coverage <= 1:
        raise ValueError(f"referral coverage must be in (0, 1], got {coverage}")
    c = np.asarray(count, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return 0.0
    accepted = np.cumsum(c[::-1])[::-1] / total  # share with confidence >= edge b
    ok = np.flatnonzero(accepted >= coverage - 1e-12)
    return float(ok.max()) / CONFIDENCE_BINS


def decide(probs: np.ndarray, classes: list[str], threshold: float) -> list[str]:
    """Per scan: its predicted class, or :data:`REFER` when the confidence is below
    ``threshold`` (compared on the shared grid, so a scan and its bin agree)."""
    p = np.asarray(probs, dtype=np.float64)
    edge = round(threshold * CONFIDENCE_BINS)
    accept = bin_of(confidence(p)) >= edge
    return [classes[int(k)] if a else REFER for k, a in zip(p.argmax(axis=1), accept, strict=True)]


def accepted(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of the scans the model reads itself (not referred)."""
    return bin_of(confidence(probs)) >= round(threshold * CONFIDENCE_BINS)


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) when the k most confident scans are accepted, k = 1..N: the error
    rate among them. For the risk-coverage curve."""
    p = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-confidence(p), kind="stable")
    wrong = (p.argmax(axis=1) != np.asarray(labels))[order].astype(np.float64)
    k = np.arange(1, len(p) + 1)
    return k / max(len(p), 1), np.cumsum(wrong) / k


def accepted_scores(
    probs: np.ndarray, labels: np.ndarray, positive: list[int], threshold: float
) -> dict[str, float | None]:
    """Referral rate, and sensitivity and specificity of the high-risk call (predicted
    class in ``positive``, as :func:`savlt_model.metrics.compute_metrics`) among the
    accepted scans only, all in %; None where there is no scan to count."""
    keep, counts = accepted_counts(probs, labels, positive, threshold)
    (tp, n_pos), (tn, n_neg) = counts["sensitivity"], counts["specificity"]
    return {
        "referral_rate": 100 * float(1 - keep.mean()) if len(keep) else None,
        "accepted_sensitivity": 100 * tp / n_pos if n_pos else None,
        "accepted_specificity": 100 * tn / n_neg if n_neg else None,
    }


def accepted_counts(
    probs: np.ndarray, labels: np.ndarray, positive: list[int], threshold: float
) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """The accepted-scan mask and, among those scans, (hits, cases) of the high-risk call:
    ``sensitivity`` (true positives, positives) and ``specificity`` (true negatives,
    negatives)."""
    p = np.asarray(probs, dtype=np.float64)
    keep = accepted(p, threshold)
    pos = np.asarray(positive)
    truth = np.isin(np.asarray(labels), pos)[keep]
    call = np.isin(p.argmax(axis=1), pos)[keep]
    return keep, {
        "sensitivity": (int((call & truth).sum()), int(truth.sum())),
        "specificity": (int((~call & ~truth).sum()), int((~truth).sum())),
    }
