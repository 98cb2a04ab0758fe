"""Score a trained model on each test centre: metrics, confusion matrices and ROC curves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from savlt_model.data import ImageSet
from savlt_model.metrics import binary_scores, compute_metrics
from savlt_model.model import SavltModel
from savlt_model.plots import plot_confusion, plot_roc
from savlt_model.train import predict


@dataclass
class CenterScore:
    metrics: dict
    probs: np.ndarray
    labels: np.ndarray


def score_centers(
    model: SavltModel, tests: dict[str, ImageSet], batch_size: int
) -> dict[str, CenterScore]:
    scores = {}
    for center, dataset in tests.items():
        probs, labels, _ = predict(model, dataset, batch_size)
        scores[center] = CenterScore(compute_metrics(probs, labels, model.positive), probs, labels)
    return scores


def save_figures(
    scores: dict[str, CenterScore],
    model: SavltModel,
    out_dir: Path,
    tag: str,
    synthetic: bool,
) -> None:
    """One confusion matrix per centre and one ROC figure (high-risk score) for all centres."""
    for center, s in scores.items():
        plot_confusion(
            s.metrics["confusion"],
            model.classes,
            out_dir / f"confusion_{tag}_{center}.png",
            title=f"{tag} — {center}",
            synthetic=synthetic,
        )
    positive = np.asarray(model.positive)
    curves = {
        c: (np.isin(s.labels, positive).astype(int), binary_scores(s.probs, model.positive))
        for c, s in scores.items()
    }
    plot_roc(
        curves, out_dir / f"roc_{tag}.png", title=f"High-risk ROC — {tag}", synthetic=synthetic
    )
