"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct each hospital's drift.

The server keeps a control c and each hospital its own c_i, over exactly the tensors a
hospital trains (the payload: LoRA factors, or B alone under ffa; prototypes, prompt
context, ROI pooling, projection). Each local step is corrected by c - c_i; after the round
option II sets c_i+ = c_i - c + (x - y_i) / L, and the server c+ = c + sum_i p_i (c_i+ - c_i)
with p_i the hospital's FedAvg share (times the share of hospitals in the round), so c stays
the weighted mean of the hospitals' controls. The global model is the round's aggregate
(global step 1), whatever fl.lora_aggregation does with it.

What "the learning rate" is under AdamW and a cosine schedule: the correction is applied
after AdamW's step, at that step's learning rate (p -= lr_t (c - c_i);
:func:`savlt_model.train.train_steps`), and L is the sum of the per-step learning rates of
p's group (:func:`savlt_model.train.lr_sums`). Then x - y_i = sum_t lr_t (d_t + c - c_i)
with d_t AdamW's direction (weight decay included), so option II gives c_i+ = sum_t lr_t
d_t / sum_t lr_t, the hospital's lr-weighted mean direction, and c - c_i replaces that
hospital's mean direction by the federation's: SCAFFOLD's correction, in the units AdamW
moves in. With SGD this is SCAFFOLD exactly. Adding c - c_i to the gradient before AdamW
instead would put a control measured in update units (AdamW's direction is about 1 per
element) into gradient units, and AdamW would rescale it by its own running gradient RMS.

c_i+ - c_i = (x - y_i) / L - c does not depend on c_i: the server computes it from the
update it receives (:func:`control_delta`), so no control leaves a hospital, and a hospital
cannot move c other than by its checked update.
"""

from __future__ import annotations

from savlt_model.methods.base import Method, Tensors
from savlt_model.methods.fedavg import sample_weights


def control_delta(x: Tensors, y: Tensors, c: Tensors, lr_sum: dict[str, float]) -> Tensors:
    """c_i+ - c_i = (x - y_i) / L - c per tensor (float64): option II's change of a
    hospital's control, from the state it started at (x), the one it ends at (y_i), the
    server's control and each tensor's sum of learning rates."""
    return {k: (x[k].double() - y[k].double()) / lr_sum[k] - c[k].double() for k in c}


def server_control(c: Tensors, deltas: list[Tensors], shares: list[float]) -> Tensors:
    """c + sum_i p_i (c_i+ - c_i) (float64 sums, in the given order; float32 result)."""
    out = {}
    for key, value in c.items():
        total = value.double()
        for share, delta in zip(shares, deltas, strict=True):
            total = total + share * delta[key]
        out[key] = total.float()
    return out


SCAFFOLD = Method(
    "scaffold",
    "FedAvg weights, and control variates that correct each hospital's local drift",
    True,
    sample_weights,
    controls=True,
)
