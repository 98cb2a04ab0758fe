"""FedAdam: FedAvg's weights, and an Adam step on the server over the aggregate's deltas.

Reddi et al. 2021, Algorithm 2 (no bias correction, as there): the pseudo-gradient
g = x - mean(y) of every tensor the server holds (server.aggregation.server_step says which,
per LoRA mode), m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2,
x+ = x - server_lr m / (sqrt(v) + tau). Each element moves by about server_lr per round
once |g| >> tau, whatever the hospitals' step size.
"""

from __future__ import annotations

from dataclasses import dataclass

from savlt_model.methods.base import Method, Tensors
from savlt_model.methods.fedavg import sample_weights

FIRST, SECOND = "m.", "v."  # state key prefixes


@dataclass
class FedAdamConfig:
    """``methods.fedadam``."""

    server_lr: float = 0.01  # eta: about the per-element move per round
    beta1: float = 0.9  # first moment decay
    beta2: float = 0.99  # second moment decay
    tau: float = 1e-3  # adaptivity: elements with |g| << tau move by about eta |g| / tau


def adam_step(grads: Tensors, state: Tensors, p: FedAdamConfig) -> tuple[Tensors, Tensors]:
    """(server_lr m / (sqrt(v) + tau), the new m and v) for ``grads`` (float64 maths)."""
    step, new = {}, {}
    for key, g in grads.items():
        m, v = state.get(FIRST + key), state.get(SECOND + key)
        m = (1 - p.beta1) * g if m is None else p.beta1 * m.double() + (1 - p.beta1) * g
        v = (1 - p.beta2) * g * g if v is None else p.beta2 * v.double() + (1 - p.beta2) * g * g
        new[FIRST + key], new[SECOND + key] = m.float(), v.float()
        m, v = new[FIRST + key].double(), new[SECOND + key].double()  # exact on resume
        step[key] = p.server_lr * m / (v.sqrt() + p.tau)
    return step, new


FEDADAM = Method(
    "fedadam",
    "FedAvg weights, then an Adam step on the server over the aggregated deltas",
    True,
    sample_weights,
    params=FedAdamConfig,
    server_step=adam_step,
)
