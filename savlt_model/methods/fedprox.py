"""FedProx: FedAvg's weights, plus a proximal term on each hospital's training."""

from __future__ import annotations

from dataclasses import dataclass

from savlt_model.methods.base import LossTerms, Method
from savlt_model.methods.fedavg import sample_weights


@dataclass
class FedProxConfig:
    """``methods.fedprox``."""

    mu: float = 0.01  # (mu / 2) ||w - w_global||^2 over the trainable set


FEDPROX = Method(
    "fedprox",
    "FedProx: FedAvg weights plus a proximal term on the hospital",
    True,
    sample_weights,
    loss_terms=lambda p: LossTerms(prox_mu=p.mu),
    params=FedProxConfig,
)
