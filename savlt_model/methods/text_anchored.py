"""Text-anchored aggregation: hospitals weighted by how well their class evidence agrees
with the frozen text anchors T, which are the same at every hospital (docs/method.md,
"Text-anchored aggregation"); plus local prototype anchoring.

The evidence (``evidence``) is the prototypes a hospital uploads, or the class means of
its own train features under the incoming global model, which it sends as per-class sums:
the same model judges every hospital's labels, so one that grades two classes the other way
disagrees with T on exactly those two (docs/federation.md, "Per-class evidence").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from savlt_model.errors import SavltError
from savlt_model.methods.base import HospitalStats, LossTerms, Method, normalise, softweights


@dataclass
class TextAnchoredConfig:
    """``methods.text_anchored``."""

    anchor_lambda: float = 5.0  # lambda of n_k exp(lambda a_k); 0: FedAvg's shared weights
    anchor_loss_weight: float = 0.1  # weight of the local CE(s P T^T, identity) term
    # no hospital weighs more than this multiple of its lambda = 0 share (.inf: no cap)
    max_weight_ratio: float = 2.0
    # a_kc from the uploaded prototypes, or from the class means of the hospital's train
    # features under the incoming global model (sent as class sums: per class, not per scan)
    evidence: Literal["prototypes", "class-means"] = "prototypes"


def cap_weights(weights: np.ndarray, base: np.ndarray, max_ratio: float) -> np.ndarray:
    """``weights`` (summing to 1 along axis 0) with no entry above ``max_ratio * base``.

    Water-filling per column: entries over their bound are set to it and the mass they lose
    goes to the others in proportion to their weights, until none is over. The result still
    sums to 1 (``base`` sums to 1 and ``max_ratio >= 1``; ``inf``: no cap), the uncapped
    hospitals keep their relative weights, and weights already within the bounds are
    returned untouched (bitwise).
    """
    if max_ratio == np.inf:
        return weights
    out = weights.astype(np.float64, copy=True).reshape(weights.shape[0], -1)
    bounds = (max_ratio * base).reshape(out.shape)
    for col, bound in zip(out.T, bounds.T, strict=True):  # views into ``out``
        capped = np.zeros(len(col), dtype=bool)
        while (over := (col > bound) & ~capped).any():
            capped |= over
            col[capped] = bound[capped]
            free = col[~capped].sum()
            col[~capped] *= (1.0 - col[capped].sum()) / free if free > 0 else 0.0
    return out.reshape(weights.shape)


def text_anchored_weights(
    stats: HospitalStats, params: TextAnchoredConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The weights of ``params.evidence``: :func:`prototype_weights` or
    :func:`class_mean_weights`."""
    lam = params.anchor_lambda
    if not math.isfinite(lam):
        raise SavltError(f"anchor_lambda must be finite, got {lam}")
    if not (stats.class_counts > 0).any(axis=1).all():
        raise SavltError("text-anchored weighting needs every client to report a class count")
    if params.evidence == "class-means":
        return class_mean_weights(stats, params)
    return prototype_weights(stats, params)


def prototype_weights(
    stats: HospitalStats, params: TextAnchoredConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Shared tensors by n_k exp(lambda mean_c a_kc); prototype row c by n_kc exp(lambda a_kc).

    Row c is learnt from class-c images, so it is weighted by how many a hospital holds: one
    without class c does not drag it, and one with 1 image weighs 1/25 of one with 25.
    lambda = 0: shared tensors are exactly FedAvg (bitwise, see
    :func:`savlt_model.methods.base.softweights`) and prototype row c is the class-c
    sample-weighted average, which equals FedAvg's only when every hospital has the same
    class mix. A class nobody holds keeps the shared weights. Then :func:`cap_weights`: no
    hospital gets more than ``max_weight_ratio`` times its lambda = 0 share, however well its
    upload agrees with the anchors.
    """
    lam = params.anchor_lambda
    counts, n = stats.class_counts, stats.examples
    present = counts > 0
    agreement = np.where(present, stats.agreement, 0.0)  # NaN for absent classes must not leak
    shared_logits = lam * (agreement.sum(axis=1) / present.sum(axis=1))
    shared = softweights(n, shared_logits, np.ones(len(n), dtype=bool))
    shared = cap_weights(shared, n / n.sum(), params.max_weight_ratio)
    nobody = ~present.any(axis=0)  # no client has class c: fall back to the shared weights
    n_kc = np.where(nobody, 1.0, counts)
    proto = softweights(n_kc, lam * agreement, present | nobody)
    proto = cap_weights(proto, normalise(n_kc), params.max_weight_ratio)
    return shared, np.where(nobody, shared[:, None], proto)


def class_mean_weights(
    stats: HospitalStats, params: TextAnchoredConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Weights per hospital and class from a_kc = cos(class-c mean feature of k, T_c).

    Hospital k's say on class c is s_kc = exp(lambda min(0, a_kc - median_j a_jc)), in
    (0, 1]: a hospital whose class-c images sit further from T_c than the typical
    hospital's (the median over those that sent class-c evidence) loses say on class c,
    and agreeing better than the typical hospital earns nothing. The median, not the
    best: the absolute cosine moves with the global model's progress and the class, and
    a hospital above the typical one (by its site, or by claiming perfect agreement) must
    not take the others' say. Where k holds class c but sent no evidence (fewer than
    ``CLASS_SUM_MIN_IMAGES`` images), its say is 1: nothing measured, nothing lost.

    - prototype row c: n_kc s_kc, normalised over the hospitals;
    - shared tensors: n_k sum_c n_kc s_kc / sum_c n_kc, i.e. each of k's images counts with
      its class's say: a hospital that disagrees on two classes loses their images' share
      and keeps the rest, where ``prototypes``' n_k exp(lambda mean_c a_kc) would shrink
      all of it.

    lambda = 0: every say is 1.0, so the shared weights are FedAvg's bit for bit and
    prototype row c is the class-c sample-weighted average; then the cap, as for prototypes.
    """
    lam = params.anchor_lambda
    counts, n = stats.class_counts, stats.examples
    if stats.class_agreement is None:
        raise SavltError(
            "methods.text_anchored.evidence: class-means needs the hospitals' class feature "
            "sums, which the round plan asks for (class-means); none came"
        )
    present = counts > 0
    seen = present & np.isfinite(stats.class_agreement)
    typical = np.array(
        [
            np.median(a[held]) if held.any() else 0.0
            for a, held in zip(stats.class_agreement.T, seen.T, strict=True)
        ]
    )
    gap = np.where(seen, np.minimum(0.0, stats.class_agreement - typical), 0.0)
    say = np.exp(lam * gap)
    factor = (counts * say).sum(axis=1) / counts.sum(axis=1)
    shared = softweights(n, np.log(factor), np.ones(len(n), dtype=bool))
    shared = cap_weights(shared, n / n.sum(), params.max_weight_ratio)
    nobody = ~present.any(axis=0)
    n_kc = np.where(nobody, 1.0, counts)
    proto = softweights(n_kc, lam * gap, present | nobody)
    proto = cap_weights(proto, normalise(n_kc), params.max_weight_ratio)
    return shared, np.where(nobody, shared[:, None], proto)


TEXT_ANCHORED = Method(
    "text-anchored",
    "weights from the hospitals' agreement with the frozen text anchors, plus local "
    "prototype anchoring",
    True,
    text_anchored_weights,
    loss_terms=lambda p: LossTerms(anchor_weight=p.anchor_loss_weight),
    params=TextAnchoredConfig,
    data_dependent_weights=True,
    class_means=lambda p: p.evidence == "class-means",
)
