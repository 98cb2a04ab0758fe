"""What a training method is: its name, the loss terms a hospital adds, its aggregation
weighting, its server optimiser or drift control, and its own hyperparameters (a
dataclass, like a peft tuner's config).

The weighting helpers shared by the methods live here too, so that FedAvg and text-anchored
weighting run the same float operations (their lambda = 0 equality is bitwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


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
    # (K, C) cos(class-c mean feature of hospital k, T_c) from the class sums a hospital
    # sends when the plan asks (NaN: no evidence, too few images); None when not asked
    class_agreement: np.ndarray | None = None


# (stats, the method's hyperparameters or None) -> (shared weights (K,), prototype-row
# weights (K, C)), each summing to 1
Weighting = Callable[[HospitalStats, Any], tuple[np.ndarray, np.ndarray]]
Tensors = dict[str, torch.Tensor]
# A server optimiser (FedOpt, Reddi et al. 2021): (pseudo-gradients g = x - aggregate by
# tensor name, float64; its state from the last round, float32, empty in the first; its
# hyperparameters) -> (the step to subtract from x, float64; its new state, float32)
ServerStep = Callable[[Tensors, Tensors, Any], tuple[Tensors, Tensors]]


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    federated: bool
    weighting: Weighting | None = None  # None for baselines
    # (the method's hyperparameters or None) -> what a hospital adds to its loss
    loss_terms: Callable[[Any], LossTerms] = lambda params: LossTerms()
    # the dataclass of its hyperparameters: config section ``methods.<section>``
    params: type | None = None
    # Central DP calibrates its noise for weights that do not depend on the hospitals' data.
    data_dependent_weights: bool = False
    # the server steps from the aggregate instead of taking it (server.aggregation.server_step)
    server_step: ServerStep | None = None
    # SCAFFOLD's control variates: the server sends c, each hospital corrects its local steps
    # by c - c_i (server/controls.py, client/controls.py)
    controls: bool = False
    # (the method's hyperparameters or None) -> whether hospitals send their class feature
    # sums (HospitalStats.class_agreement); the round plan carries the answer
    class_means: Callable[[Any], bool] = lambda params: False

    @property
    def section(self) -> str:
        """Its config section under ``methods`` (a YAML/--set key: no hyphen)."""
        return self.name.replace("-", "_")

    @property
    def config_keys(self) -> tuple[str, ...]:
        """Its dotted config keys, for the help text."""
        if self.params is None:
            return ()
        return tuple(f"methods.{self.section}.{f.name}" for f in dataclasses.fields(self.params))

    def settings(self, methods: Any) -> Any:
        """Its hyperparameters from a config's ``methods`` section, or None if it has none."""
        return None if self.params is None else getattr(methods, self.section)

    def losses(self, methods: Any) -> LossTerms:
        """Its loss terms under a config's ``methods`` section."""
        return self.loss_terms(self.settings(methods))

    def wants_class_means(self, methods: Any) -> bool:
        """Whether its weighting under a config's ``methods`` section needs class sums."""
        return self.class_means(self.settings(methods))


def normalise(raw: np.ndarray) -> np.ndarray:
    """Scale along axis 0 to sum 1 (float64)."""
    return raw / raw.sum(axis=0, keepdims=True)


def softweights(n: np.ndarray, logits: np.ndarray, present: np.ndarray) -> np.ndarray:
    """n * exp(logits - max) over ``present`` rows, normalised along axis 0.

    FedAvg passes zero logits: exp(0) == 1.0 exactly, so with lambda = 0 text-anchored and
    FedAvg run identical float operations and agree bitwise.
    """
    shifted = np.where(present, logits, -np.inf)
    shifted = shifted - shifted.max(axis=0, keepdims=True)
    return normalise(np.where(present, n * np.exp(shifted), 0.0))
