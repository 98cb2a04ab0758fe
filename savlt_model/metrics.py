"""Classification metrics in percent, as reported in the SAVLT study (docs/method.md, "The
data protocol of the original study").

Binary task: a case is high-risk when its class is in ``positive`` (cancer and HSIL for the
cervical task). The binary prediction is "the argmax class is in ``positive``", so the
binary and multi-class predictions never disagree. The binary AUC scores each case with
the sum of the softmax probabilities of the positive classes (:func:`binary_scores`);
the original code used a softmax over summed logits instead, which is not a probability
of the positive group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from savlt_model.errors import SavltError

# The C-class accuracy has one name for every task (the paper's 5 classes, retinal OCT's
# 4, ...), so message keys, tables and plots never depend on the class list.
METRIC_KEYS = (
    "acc_multiclass",
    "acc_binary",
    "auc_binary",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
)

# Names written by earlier versions -> today's: results.json files and curves from before
# the rename still load, summarise and plot.
LEGACY_METRIC_KEYS = {"acc_5class": "acc_multiclass"}

_ROW_SUM_TOL = 1e-3  # loose enough for float16 softmax, tight enough to catch logits


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise SavltError(f"probs must have shape (N>=1, C>=2), got {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise SavltError("probs contains NaN or infinite values")
    if np.any(probs < 0) or not np.allclose(probs.sum(axis=1), 1.0, atol=_ROW_SUM_TOL):
        raise SavltError("probs rows must be softmax probabilities summing to 1 (got logits?)")
    return probs


def _check_positive(positive: Sequence[int], n_classes: int) -> np.ndarray:
    pos = np.asarray(list(positive))
    if pos.size == 0 or not np.issubdtype(pos.dtype, np.integer):
        raise SavltError(f"positive must be a non-empty list of class indices, got {positive!r}")
    if len(set(pos.tolist())) != pos.size:
        raise SavltError(f"positive has repeated class indices: {positive!r}")
    if pos.min() < 0 or pos.max() >= n_classes:
        raise SavltError(f"positive indices {positive!r} are outside 0..{n_classes - 1}")
    if pos.size == n_classes:
        raise SavltError("positive lists every class, so there is no negative (low-risk) group")
    return pos


def binary_scores(probs: np.ndarray, positive: Sequence[int]) -> np.ndarray:
    """High-risk score per case: the summed softmax probability of the positive classes."""
    probs = _check_probs(probs)
    pos = _check_positive(positive, probs.shape[1])
    return probs[:, pos].sum(axis=1)


def upgrade_keys(record: dict) -> dict:
    """A record or curve point with its legacy metric names renamed (a copy)."""
    out = dict(record)
    for old, new in LEGACY_METRIC_KEYS.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def _pct(num: int, den: int) -> float | None:
    return None if den == 0 else round(100.0 * num / den, 4)


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC AUC as the Mann-Whitney statistic (a tie counts one half): the same number
    as sklearn's roc_auc_score, without importing sklearn (1.3 s of every Ray actor's
    cold start, which computes these metrics every round)."""
    y = np.asarray(y_true, dtype=np.float64)
    return pair_auc(scores, y, 1.0 - y)


def pair_auc(scores: np.ndarray, high: np.ndarray, low: np.ndarray) -> float:
    """The share of (high-risk, low-risk) pairs of distinct scans that ``scores`` order
    right, a tie counting one half, when scan i counts as high-risk with weight ``high[i]``
    and as low-risk with ``low[i]``. With 0/1 labels it is the ROC AUC (:func:`roc_auc`);
    with a model's probabilities q and 1 - q, the AUC expected if q were the truth
    (:func:`savlt_model.adaptation.expected_auc_cost`). 0.5 when no pair is weighted.
    O(n log n): one sort, tied scores grouped."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    s = np.asarray(scores, dtype=np.float64)[order]
    h = np.asarray(high, dtype=np.float64)[order]
    lo = np.asarray(low, dtype=np.float64)[order]
    start = np.flatnonzero(np.r_[True, np.diff(s) != 0])
    g_high, g_low = np.add.reduceat(h, start), np.add.reduceat(lo, start)
    below = np.r_[0.0, np.cumsum(g_low)[:-1]]  # low-risk weight strictly below each group
    self_pairs = np.add.reduceat(h * lo, start)  # a scan is never paired with itself
    right = (g_high * below).sum() + 0.5 * (g_high * g_low - self_pairs).sum()
    total = h.sum() * lo.sum() - (h * lo).sum()
    return float(right / total) if total > 0 else 0.5


def compute_metrics(probs: np.ndarray, labels: np.ndarray, positive: Sequence[int]) -> dict:
    """The seven §2 metrics in percent, plus ``confusion`` (C×C, rows = true class) and ``n``.

    A metric with a zero denominator is ``None``, never NaN, so results stay valid JSON:
    ``auc_binary`` when only one binary class is present, ``sensitivity`` with no positive
    case, ``specificity`` with no negative case, ``ppv`` with no positive prediction and
    ``npv`` with no negative prediction. ``acc_multiclass`` is the C-class accuracy for any C
    (the paper's "5-class accuracy"; ``acc_5class`` in older results).
    """
    probs = _check_probs(probs)
    n, n_classes = probs.shape
    labels_arr = np.asarray(labels)
    if labels_arr.shape != (n,):
        raise SavltError(f"labels must have shape ({n},) to match probs, got {labels_arr.shape}")
    if labels_arr.dtype == bool or not np.issubdtype(labels_arr.dtype, np.integer):
        raise SavltError(f"labels must be integer class indices, got dtype {labels_arr.dtype}")
    if labels_arr.min() < 0 or labels_arr.max() >= n_classes:
        raise SavltError(f"labels must lie in 0..{n_classes - 1} (probs has {n_classes} columns)")
    pos = _check_positive(positive, n_classes)

    pred = probs.argmax(axis=1)
    y_true = np.isin(labels_arr, pos)
    y_pred = np.isin(pred, pos)
    tp = int(np.sum(y_true & y_pred))
    tn = int(np.sum(~y_true & ~y_pred))
    fp = int(np.sum(~y_true & y_pred))
    fn = int(np.sum(y_true & ~y_pred))

    auc: float | None = None
    if 0 < y_true.sum() < n:
        auc = round(100.0 * roc_auc(y_true, probs[:, pos].sum(axis=1)), 4)

    out: dict[str, Any] = {
        "acc_multiclass": _pct(int(np.sum(pred == labels_arr)), n),
        "acc_binary": _pct(tp + tn, n),
        "auc_binary": auc,
        "sensitivity": _pct(tp, tp + fn),
        "specificity": _pct(tn, tn + fp),
        "ppv": _pct(tp, tp + fp),
        "npv": _pct(tn, tn + fn),
    }
    cm = np.bincount(labels_arr * n_classes + pred, minlength=n_classes * n_classes)
    out["confusion"] = cm.reshape(n_classes, n_classes).astype(int).tolist()
    out["n"] = int(n)
    return out
