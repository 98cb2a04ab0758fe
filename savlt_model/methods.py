"""The one registry of training methods: each is declared once, here, with its maths.

A federated method is its name, the loss terms a hospital adds to the SAVLT loss, the rule
that turns the hospitals' reported statistics into aggregation weights, the ``fl`` config
keys it reads and its help text. Config validation, the CLI, the server's strategy (which
sends the loss terms in every round's plan, so a ClientApp needs no per-method code) and
the simulation runner all read :data:`METHODS`. Adding a method is one :class:`Method`
entry plus its weighting function.

Baselines (``central``, ``local``) are listed too, so that ``fl.methods`` is validated in
one place; they run in the simulation layer, not through Flower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from savlt_model.errors import SavltError

if TYPE_CHECKING:  # config validation reads this registry, so no runtime import back
    from savlt_model.config import FederatedConfig


@dataclass(frozen=True)
class LossTerms:
    """Regularisers a hospital adds to the SAVLT loss during a federated round."""

    prox_mu: float = 0.0  # FedProx: (mu / 2) ||w - w_global||^2 over the trainable set
    anchor_weight: float = 0.0  # text anchoring of the prototypes: CE(s P T^T, identity)


@dataclass(frozen=True)
class HospitalStats:
    """What the weighting may use, one row per hospital (K) and one column per class (C)."""

    examples: np.ndarray  # (K,) n_k > 0
    class_counts: np.ndarray  # (K, C) n_kc >= 0
    # (K, C) a_kc in [-1, 1], computed by the server from the upload (never self-reported);
    # meaningless where n_kc == 0
    agreement: np.ndarray


# (stats, fl config) -> (shared weights (K,), prototype-row weights (K, C)), each summing to 1
Weighting = Callable[[HospitalStats, "FederatedConfig"], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    federated: bool
    weighting: Weighting | None = None  # None for baselines
    loss_terms: Callable[[FederatedConfig], LossTerms] = lambda fl: LossTerms()
    config_keys: tuple[str, ...] = ()  # the fl.* keys it reads, for the help text
    # Central DP calibrates its noise for weights that do not depend on the hospitals' data.
    data_dependent_weights: bool = False


def _normalise(raw: np.ndarray) -> np.ndarray:
    """Scale along axis 0 to sum 1 (float64)."""
    return raw / raw.sum(axis=0, keepdims=True)


def _softweights(n: np.ndarray, logits: np.ndarray, present: np.ndarray) -> np.ndarray:
    """n * exp(logits - max) over ``present`` rows, normalised along axis 0.

    FedAvg passes zero logits: exp(0) == 1.0 exactly, so with lambda = 0 text-anchored and
    FedAvg run identical float operations and agree bitwise.
    """
    shifted = np.where(present, logits, -np.inf)
    shifted = shifted - shifted.max(axis=0, keepdims=True)
    return _normalise(np.where(present, n * np.exp(shifted), 0.0))


def sample_weights(stats: HospitalStats, fl: FederatedConfig) -> tuple[np.ndarray, np.ndarray]:
    """FedAvg: every tensor, prototype rows included, weighted by n_k."""
    k, c = stats.class_counts.shape
    shared = _softweights(stats.examples, np.zeros(k), np.ones(k, dtype=bool))
    proto = _softweights(stats.examples[:, None], np.zeros((k, c)), np.ones((k, c), dtype=bool))
    return shared, proto


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
    stats: HospitalStats, fl: FederatedConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Shared tensors by n_k exp(lambda mean_c a_kc); prototype row c by n_kc exp(lambda a_kc).

    Row c is learnt from class-c images, so it is weighted by how many a hospital holds: one
    without class c does not drag it, and one with 1 image weighs 1/25 of one with 25.
    lambda = 0: shared tensors are exactly FedAvg (bitwise, see :func:`_softweights`) and
    prototype row c is the class-c sample-weighted average, which equals FedAvg's only when
    every hospital has the same class mix. A class nobody holds keeps the shared weights.
    Then :func:`cap_weights`: no hospital gets more than ``fl.max_weight_ratio`` times its
    lambda = 0 share, however well its upload agrees with the anchors.
    """
    counts, n = stats.class_counts, stats.examples
    present = counts > 0
    if not present.any(axis=1).all():
        raise SavltError("text-anchored weighting needs every client to report a class count")
    agreement = np.where(present, stats.agreement, 0.0)  # NaN for absent classes must not leak
    shared_logits = fl.anchor_lambda * (agreement.sum(axis=1) / present.sum(axis=1))
    shared = _softweights(n, shared_logits, np.ones(len(n), dtype=bool))
    shared = cap_weights(shared, n / n.sum(), fl.max_weight_ratio)
    nobody = ~present.any(axis=0)  # no client has class c: fall back to the shared weights
    n_kc = np.where(nobody, 1.0, counts)
    proto = _softweights(n_kc, fl.anchor_lambda * agreement, present | nobody)
    proto = cap_weights(proto, _normalise(n_kc), fl.max_weight_ratio)
    return shared, np.where(nobody, shared[:, None], proto)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("central", "centralised SAVLT on the pooled data (the original protocol)", False),
        Method("local", "each hospital alone, with its per-hospital federated compute", False),
        Method("fedavg", "FedAvg: every tensor weighted by its n_k", True, sample_weights),
        Method(
            "fedprox",
            "FedProx: FedAvg weights plus a proximal term on the hospital",
            True,
            sample_weights,
            loss_terms=lambda fl: LossTerms(prox_mu=fl.prox_mu),
            config_keys=("prox_mu",),
        ),
        Method(
            "text-anchored",
            "weights from the hospitals' agreement with the frozen text anchors, plus local "
            "prototype anchoring",
            True,
            text_anchored_weights,
            loss_terms=lambda fl: LossTerms(anchor_weight=fl.anchor_loss_weight),
            config_keys=("anchor_lambda", "anchor_loss_weight", "max_weight_ratio"),
            data_dependent_weights=True,
        ),
    )
}


# What fl.methods runs by default: the methods declared above (not ones added at run time,
# e.g. by a test, which a ClientApp process started elsewhere would not know).
DEFAULT_METHODS = tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``, or a one-line error listing the known ones."""
    if name not in METHODS:
        raise SavltError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def federated_methods() -> tuple[str, ...]:
    return tuple(name for name, m in METHODS.items() if m.federated)


def describe() -> str:
    """One line per method for ``--help``: name, what it does, the keys it reads."""
    return "\n".join(
        f"{m.name}: {m.help}" + (f" (fl.{', fl.'.join(m.config_keys)})" if m.config_keys else "")
        for m in METHODS.values()
    )
