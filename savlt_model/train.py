"""The one training loop.

Centralised training, local-only baselines and every federated client call the same
:func:`train_steps`; the federated round only decides which slice of the cosine schedule a
call covers and which regulariser (FedProx, text anchoring) is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from savlt_model.config import Config
from savlt_model.data.images import ImageSet, make_loader
from savlt_model.model.adapters import PROTOTYPES, payload_parameters
from savlt_model.model.build import autocast
from savlt_model.model.consistency import consistency_loss
from savlt_model.model.savlt import SavltModel


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    """Cosine decay from ``lr`` to ``min_lr`` over ``total`` steps (the original schedule)."""
    progress = min(step, total) / max(total, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def lr_sums(cfg: Config, keys: list[str], start: int, steps: int, total: int) -> dict[str, float]:
    """Each payload tensor's sum of learning rates over steps [start, start + steps): what
    SCAFFOLD's option II divides by (savlt_model/methods/scaffold.py), the same number at
    the server and at every hospital."""
    t = cfg.train
    base = sum(cosine_lr(s, total, t.lr, t.min_lr) for s in range(start, start + steps))
    return {k: base * (t.prototype_lr_scale if k == PROTOTYPES else 1.0) for k in keys}


@dataclass
class TrainStats:
    loss: float
    steps: int
    examples: int


def train_steps(
    model: SavltModel,
    dataset: ImageSet,
    cfg: Config,
    steps: int,
    seed: int,
    start_step: int = 0,
    total_steps: int | None = None,
    prox_mu: float = 0.0,
    anchor_weight: float = 0.0,
    feature_shift: np.ndarray | None = None,
    desc: str | None = None,
    correction: dict[str, torch.Tensor] | None = None,
) -> TrainStats:
    """Run ``steps`` AdamW steps covering [start_step, start_step + steps) of the schedule.

    ``prox_mu`` > 0 adds FedProx's (mu / 2) ||w - w_start||^2 over the trainable set;
    ``anchor_weight`` > 0 adds the text-anchoring term on the prototypes;
    ``feature_shift`` re-centres every feature (:meth:`SavltModel.forward`);
    ``correction`` (SCAFFOLD's c - c_i by payload key) is subtracted after every AdamW
    step at that step's learning rate (:func:`_drift_correction`).
    """
    t = cfg.train
    total = total_steps or steps
    device = next(model.parameters()).device
    params = payload_parameters(model)
    groups = [
        {"params": [p for k, p in params.items() if k != PROTOTYPES], "lr_scale": 1.0},
        {
            "params": [p for k, p in params.items() if k == PROTOTYPES],
            "lr_scale": t.prototype_lr_scale,
        },
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=t.lr, weight_decay=t.weight_decay
    )
    drift = _drift_correction(optimizer, params, correction, device)
    start = {k: p.detach().clone() for k, p in params.items()} if prox_mu else {}
    shift = None if feature_shift is None else torch.as_tensor(feature_shift, device=device).float()
    batch = min(t.batch_size, len(dataset))
    loader = make_loader(
        dataset,
        batch,
        shuffle=True,
        seed=seed,
        drop_last=True,
        num_workers=t.workers,
        pin_memory=device.type == "cuda",
    )
    model.train()
    running = torch.zeros((), device=device)
    done = 0
    bar = tqdm(total=steps, desc=desc, leave=False, disable=desc is None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # augmentation draws from the global RNG
        epoch_iter = iter(loader)
        while done < steps:
            try:
                images, labels = next(epoch_iter)
            except StopIteration:
                epoch_iter = iter(loader)
                continue
            lr = cosine_lr(start_step + done, total, t.lr, t.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, t.amp):
                if images.dim() == 5:  # (B, views, 3, H, W): train.consistency_weight
                    loss = consistency_loss(
                        model, images, labels, shift, anchor_weight, t.consistency_weight
                    )
                else:
                    loss = model.loss(model(images, shift), labels, anchor_weight)
            if prox_mu:
                loss = loss + 0.5 * prox_mu * sum(
                    (p - start[k]).pow(2).sum() for k, p in params.items()
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for group, p, c in drift:
                p.data.add_(c, alpha=-group["lr"])
            running += loss.detach()
            done += 1
            bar.update()
    bar.close()
    model.eval()
    return TrainStats(loss=float(running) / max(done, 1), steps=done, examples=done * batch)


def _drift_correction(
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    correction: dict[str, torch.Tensor] | None,
    device: torch.device,
) -> list[tuple[dict, torch.nn.Parameter, torch.Tensor]]:
    """(param group, parameter, its correction) for SCAFFOLD: after AdamW's step each
    parameter moves by -lr_group (c - c_i), which keeps the correction in the units AdamW
    moves in and makes option II's (x - y) / sum(lr) exact (savlt_model/methods/scaffold.py)."""
    if correction is None:
        return []
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return [(group_of[id(p)], p, correction[k].to(device, p.dtype)) for k, p in params.items()]
