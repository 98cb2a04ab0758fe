"""The one evaluation loop: predictions and per-centre scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from savlt_model.calibration import (
    Calibration,
    FeatureStats,
    ValStats,
    brier_score,
    expected_calibration_error,
    referral_counts_of,
    shift_score,
    site_val_stats,
)
from savlt_model.config import Config
from savlt_model.data.images import ImageSet, make_loader
from savlt_model.data.partition import build_partition
from savlt_model.metrics import compute_metrics
from savlt_model.model.build import autocast, cached_model, image_sets
from savlt_model.model.savlt import SavltModel
from savlt_model.referral import ReferralCounts, accepted_scores


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


@dataclass
class CenterScore:
    metrics: dict
    probs: np.ndarray
    labels: np.ndarray


@dataclass
class CenterOutputs:
    """One forward pass over a test set: what every scoring variant needs."""

    labels: np.ndarray
    features: np.ndarray
    probs: np.ndarray  # the model's own softmax


def centre_outputs(
    model: SavltModel, tests: dict[str, ImageSet], batch_size: int
) -> dict[str, CenterOutputs]:
    out = {}
    for center, dataset in tests.items():
        probs, labels, feats = predict(model, dataset, batch_size)
        out[center] = CenterOutputs(labels, feats, probs)
    return out


def score_outputs(
    model: SavltModel, outputs: dict[str, CenterOutputs], calibration: Calibration | None
) -> dict[str, CenterScore]:
    """The metrics per test centre; with ``calibration`` also ECE, Brier and shift score,
    and with its referral threshold the referral rate and the accepted scans' sensitivity
    and specificity (savlt_model.referral).

    A re-centring calibration uses each centre's own unlabelled features (label-free,
    transductive); labels are only used to score.
    """
    scores = {}
    w = model.classifier().cpu().numpy() if calibration is not None else None
    for center, o in outputs.items():
        probs, extra = o.probs, {}
        if calibration is not None:
            probs = calibration.at_centre(o.features).probs(o.features, w)
            extra = {
                "ece": 100 * expected_calibration_error(probs, o.labels),
                "brier": 100 * brier_score(probs, o.labels),
                "shift_score": shift_score(o.features, calibration.reference),
            }
            if calibration.refer_below is not None:
                extra.update(
                    accepted_scores(probs, o.labels, model.positive, calibration.refer_below)
                )
        metrics = {**compute_metrics(probs, o.labels, model.positive), **extra}
        scores[center] = CenterScore(metrics, probs, o.labels)
    return scores


def score_centers(
    model: SavltModel, tests: dict[str, ImageSet], batch_size: int
) -> dict[str, CenterScore]:
    """The model's own (uncalibrated) metrics per test centre, e.g. for per-round curves."""
    return score_outputs(model, centre_outputs(model, tests, batch_size), None)


def site_feature_stats(model: SavltModel, sets: list[ImageSet], batch_size: int) -> FeatureStats:
    """A training site's share of the reference: count and sum of its scans' features
    (empty sets, e.g. a site without validation images, add nothing)."""
    stats = FeatureStats(0, np.zeros(model.anchors.shape[1]))
    for dataset in sets:
        if len(dataset):
            stats = stats + FeatureStats.of(predict(model, dataset, batch_size)[2])
    return stats


def site_class_sums(model: SavltModel, dataset: ImageSet, batch_size: int) -> np.ndarray:
    """(C, d): per class, the sum of a site's features over its images of that label (its own
    labels): the class evidence text-anchored weighting compares with the anchors."""
    sums = np.zeros((len(model.classes), model.anchors.shape[1]))
    if len(dataset):
        _, labels, feats = predict(model, dataset, batch_size)
        np.add.at(sums, labels, feats.astype(np.float64))
    return sums


def site_calibration_stats(
    model: SavltModel, val: ImageSet, batch_size: int, reference: np.ndarray
) -> tuple[ValStats, ValStats, ReferralCounts]:
    """A training site's validation sums, as scored and re-centred on its own mean, and its
    referral counts (:func:`savlt_model.calibration.site_val_stats`); zero sums without
    validation scans."""
    if not len(val):
        logits, labels = np.zeros((0, len(model.classes))), np.zeros(0, dtype=int)
        empty = ValStats.of(logits, labels)
        return empty, empty, referral_counts_of(logits, labels)
    _, labels, feats = predict(model, val, batch_size)
    return site_val_stats(feats, labels, model.classifier().cpu().numpy(), reference)


# A global trainable state in, its scores per test centre out: what the ServerApp's starter
# injects for centralised evaluation (Flower's evaluate_fn convention).
Evaluate = Callable[[dict[str, torch.Tensor]], dict[str, CenterScore]]


def centre_evaluator(cfg: Config, seed: int) -> Evaluate | None:
    """Scores a global state on the partition's test centres, or None without
    ``fl.server_eval`` (or without test centres). The images are decoded once, here."""
    tests = build_partition(cfg, seed).tests if cfg.fl.server_eval else {}
    if not tests:
        return None
    sets = image_sets(cfg, tests, train=False)

    def evaluate(state: dict[str, torch.Tensor]) -> dict[str, CenterScore]:
        model = cached_model(cfg, seed)
        model.load_global_state(state)
        return score_centers(model, sets, cfg.train.eval_batch_size)

    return evaluate
