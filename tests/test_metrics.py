"""compute_metrics must agree with scikit-learn and never emit NaN."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)

from savlt_model.errors import SavltError
from savlt_model.metrics import METRIC_KEYS, binary_scores, compute_metrics, roc_auc
from server.strategy import RoundLog, load_checkpoint, save_checkpoint


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _case(seed: int, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 1.0  # better than chance, not perfect
    return _softmax(logits), labels


@pytest.mark.parametrize(
    ("seed", "n", "c", "positive"),
    [
        (0, 200, 5, [0, 3]),  # the cervical task: cancer + HSIL
        (1, 57, 5, [2]),
        (2, 120, 3, [1]),
        (3, 80, 4, [0, 2]),
        (4, 33, 2, [1]),
    ],
)
def test_matches_sklearn(seed: int, n: int, c: int, positive: list[int]) -> None:
    probs, labels = _case(seed, n, c)
    m = compute_metrics(probs, labels, positive)
    pred = probs.argmax(axis=1)
    y = np.isin(labels, positive).astype(int)
    yp = np.isin(pred, positive).astype(int)
    scores = probs[:, positive].sum(axis=1)

    expected = {
        "acc_multiclass": accuracy_score(labels, pred),
        "acc_binary": accuracy_score(y, yp),
        "auc_binary": roc_auc_score(y, scores),
        "sensitivity": recall_score(y, yp, pos_label=1),
        "specificity": recall_score(y, yp, pos_label=0),
        "ppv": precision_score(y, yp, pos_label=1),
        "npv": precision_score(y, yp, pos_label=0),
    }
    for k in METRIC_KEYS:
        assert m[k] == pytest.approx(100 * expected[k], abs=1e-3), k
    assert m["confusion"] == confusion_matrix(labels, pred, labels=range(c)).tolist()
    assert m["n"] == n
    np.testing.assert_allclose(binary_scores(probs, positive), scores)
    json.dumps(m, allow_nan=False)


def test_undefined_values_are_none() -> None:
    # Only negative cases, all predicted negative: no AUC, sensitivity or PPV.
    probs = np.array([[0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.6, 0.1]])
    m = compute_metrics(probs, np.array([1, 2, 1]), [0])
    assert m["auc_binary"] is None
    assert m["sensitivity"] is None
    assert m["ppv"] is None
    assert m["specificity"] == 100.0
    assert m["npv"] == 100.0
    assert m["acc_multiclass"] == pytest.approx(100.0)
    json.dumps(m, allow_nan=False)

    # Only positive cases, all predicted positive: no AUC, specificity or NPV.
    m = compute_metrics(np.array([[0.9, 0.1], [0.7, 0.3]]), np.array([0, 0]), [0])
    assert m["auc_binary"] is None
    assert m["specificity"] is None
    assert m["npv"] is None
    assert m["sensitivity"] == 100.0
    assert m["ppv"] == 100.0
    assert m["confusion"] == [[2, 0], [0, 0]]


def test_binary_prediction_follows_argmax() -> None:
    # Positive mass 0.6 but the argmax (class 2) is negative: predicted negative.
    probs = np.array([[0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])
    m = compute_metrics(probs, np.array([0, 2]), [0, 1])
    assert m["sensitivity"] == 0.0
    assert m["ppv"] is None
    assert m["acc_binary"] == 50.0


@pytest.mark.parametrize(
    ("probs", "labels", "positive"),
    [
        (np.ones(5) / 5, np.array([0]), [0]),  # 1-D probs
        (np.full((2, 3), 1 / 3), np.array([0]), [0]),  # length mismatch
        (np.full((2, 3), 1 / 3), np.array([0, 3]), [0]),  # label out of range
        (np.full((2, 3), 1 / 3), np.array([0, -1]), [0]),  # negative label
        (np.full((2, 3), 1 / 3), np.array([0.0, 1.0]), [0]),  # float labels
        (np.full((2, 3), 1 / 3), np.array([0, 1]), []),  # empty positive
        (np.full((2, 3), 1 / 3), np.array([0, 1]), [3]),  # positive out of range
        (np.full((2, 3), 1 / 3), np.array([0, 1]), [0, 1, 2]),  # no negative class
        (np.full((2, 3), 1 / 3), np.array([0, 1]), [1, 1]),  # repeated positive
        (np.array([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]]), np.array([0, 1]), [0]),  # logits
        (np.array([[np.nan, 0.5, 0.5], [0.2, 0.4, 0.4]]), np.array([0, 1]), [0]),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), [0]),  # empty
    ],
)
def test_bad_input_raises(probs: np.ndarray, labels: np.ndarray, positive: list[int]) -> None:
    with pytest.raises(SavltError):
        compute_metrics(probs, labels, positive)


def test_binary_scores_rejects_bad_positive() -> None:
    with pytest.raises(SavltError):
        binary_scores(np.full((2, 3), 1 / 3), [5])


def test_a_checkpoint_from_before_the_metric_rename_resumes(tmp_path):
    """Curves saved as acc_5class come back as acc_multiclass, which the server prints."""
    old = {"method": "fedavg", "center": "mixed", "round": 1, "acc_5class": 40.0}
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, 1, RoundLog(evals=[old]))
    loaded = load_checkpoint(path)
    assert loaded is not None
    _, round_, history = loaded
    assert round_ == 1
    assert history.evals == [
        {"method": "fedavg", "center": "mixed", "round": 1, "acc_multiclass": 40.0}
    ]


def test_roc_auc_equals_sklearn_with_ties() -> None:
    """The numpy AUC (no sklearn import in the ClientApp) counts a tie as one half."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(60) < 0.4
        scores = rng.integers(0, 5, 60) / 4.0  # many ties
        assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
