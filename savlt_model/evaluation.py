"""The one evaluation loop: predictions, per-class anchor agreement and per-centre scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from savlt_model.data.images import ImageSet, make_loader
from savlt_model.metrics import compute_metrics
from savlt_model.model.build import autocast
from savlt_model.model.savlt import SavltModel


@torch.no_grad()
def predict(
    model: SavltModel, dataset: ImageSet, batch_size: int, amp: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C), labels (N,) and image features (N, d) for a dataset."""
    model.eval()
    device = next(model.parameters()).device
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0)
    probs, labels, feats = [], [], []
    for images, y in loader:
        with autocast(device, amp):
            out = model(images.to(device, non_blocking=True))
        probs.append(F.softmax(out.logits.float(), dim=-1).cpu())
        feats.append(out.features.float().cpu())
        labels.append(y)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), torch.cat(feats).numpy()


@torch.no_grad()
def anchor_agreement(
    model: SavltModel, dataset: ImageSet, batch_size: int
) -> tuple[list[int], list[float]]:
    """Per-class counts n_c and mean cos(f(x), T_c) over the class-c images (0 when absent)."""
    _, labels, feats = predict(model, dataset, batch_size)
    anchors = model.anchors.float().cpu().numpy()
    counts, agreement = [], []
    for c in range(len(model.classes)):
        mask = labels == c
        counts.append(int(mask.sum()))
        agreement.append(float((feats[mask] @ anchors[c]).mean()) if mask.any() else 0.0)
    return counts, agreement


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
