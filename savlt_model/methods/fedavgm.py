"""FedAvgM: FedAvg's weights, and a server step with momentum over the aggregate's deltas.

Hsu et al. 2019 (as Reddi et al. 2021 write it): the pseudo-gradient g = x - mean(y) of
every tensor the server holds (server.aggregation.server_step says which, per LoRA mode),
m = momentum * m + g, x+ = x - server_lr * m. With server_lr 1 and momentum 0 it is FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass

from savlt_model.methods.base import Method, Tensors
from savlt_model.methods.fedavg import sample_weights

MOMENTUM = "momentum."  # state key prefix


@dataclass
class FedAvgMConfig:
    """``methods.fedavgm``."""

    server_lr: float = 1.0  # eta of x+ = x - eta m
    momentum: float = 0.9  # beta of m = beta m + g; 0: no momentum


def momentum_step(grads: Tensors, state: Tensors, p: FedAvgMConfig) -> tuple[Tensors, Tensors]:
    """(server_lr * m, the new m) for pseudo-gradients ``grads`` (float64 maths)."""
    step, new = {}, {}
    for key, g in grads.items():
        m = g if MOMENTUM + key not in state else p.momentum * state[MOMENTUM + key].double() + g
        new[MOMENTUM + key] = m.float()
        step[key] = p.server_lr * new[MOMENTUM + key].double()  # the stored m: exact on resume
    return step, new


FEDAVGM = Method(
    "fedavgm",
    "FedAvg weights, then a server step with momentum over the aggregated deltas",
    True,
    sample_weights,
    params=FedAvgMConfig,
    server_step=momentum_step,
)
