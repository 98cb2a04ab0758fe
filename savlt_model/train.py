"""The one training loop and the one evaluation loop.

Centralised training, local-only baselines and every federated client call the same
:func:`train_steps`; the federated round only decides which slice of the cosine schedule a
call covers and which regulariser (FedProx, text anchoring) is on.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from savlt_model.adapters import payload_parameters
from savlt_model.backbone import Backbone, load_backbone
from savlt_model.config import Config
from savlt_model.data import ImageSet, Sample, make_loader
from savlt_model.model import SavltModel


def pick_device(name: str = "auto") -> torch.device:
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name == "auto"
        else torch.device(name)
    )
    if device.type == "cuda":  # TF32 matmuls: free speed for a frozen fp32 backbone
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on CUDA only (CPU bf16 is slower than fp32 on most CPUs)."""
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )


@functools.lru_cache(maxsize=2)
def cached_backbone(name: str, pretrained: str | None) -> Backbone:
    """Load (and fingerprint) a backbone once per process; models deep-copy it."""
    return load_backbone(name, pretrained)


def build_model(cfg: Config, seed: int) -> SavltModel:
    """A fresh SAVLT model whose trainable initialisation depends only on ``seed``."""
    backbone = cached_backbone(cfg.model.name, cfg.model.pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SavltModel(cfg, backbone)
    return model.to(pick_device(cfg.train.device))


_CACHED_MODELS: dict[tuple[str, int], SavltModel] = {}


def cached_model(cfg: Config, seed: int) -> SavltModel:
    """One model per process, reused across federated rounds (no rebuild cost per message).

    Callers load a global state with :meth:`SavltModel.load_global_state`, which overwrites
    every trainable tensor and every frozen weight under LoRA, so reuse is exact.
    """
    key = (json.dumps(cfg.to_dict(), sort_keys=True), seed)
    if key not in _CACHED_MODELS:
        _CACHED_MODELS.clear()  # one configuration at a time: bounded memory
        _CACHED_MODELS[key] = build_model(cfg, seed)
    return _CACHED_MODELS[key]


def image_sets(cfg: Config, samples: dict[str, list[Sample]], train: bool) -> dict[str, ImageSet]:
    """ImageSets sized and normalised for the configured backbone."""
    bb = cached_backbone(cfg.model.name, cfg.model.pretrained)
    return {k: ImageSet(v, bb.image_size, bb.mean, bb.std, train=train) for k, v in samples.items()}


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    """Cosine decay from ``lr`` to ``min_lr`` over ``total`` steps (the original schedule)."""
    progress = min(step, total) / max(total, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


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
    desc: str | None = None,
) -> TrainStats:
    """Run ``steps`` AdamW steps covering [start_step, start_step + steps) of the schedule.

    ``prox_mu`` > 0 adds FedProx's (mu / 2) ||w - w_start||^2 over the trainable set;
    ``anchor_weight`` > 0 adds the text-anchoring term on the prototypes.
    """
    t = cfg.train
    total = total_steps or steps
    device = next(model.parameters()).device
    params = payload_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=t.lr, weight_decay=t.weight_decay)
    start = {k: p.detach().clone() for k, p in params.items()} if prox_mu else {}
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
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(start_step + done, total, t.lr, t.min_lr)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, t.amp):
                loss = model.loss(model(images), labels, anchor_weight)
            if prox_mu:
                loss = loss + 0.5 * prox_mu * sum(
                    (p - start[k]).pow(2).sum() for k, p in params.items()
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.detach()
            done += 1
            bar.update()
    bar.close()
    model.eval()
    return TrainStats(loss=float(running) / max(done, 1), steps=done, examples=done * batch)


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
