"""Save a trained SAVLT adapter together with what a loader must check before trusting it."""

from __future__ import annotations

from pathlib import Path

import torch

from savlt_model.checkpoint import save_adapter
from savlt_model.config import Config
from savlt_model.model.adapters import trainable_state
from savlt_model.model.savlt import SavltModel


def adapter_meta(model: SavltModel, cfg: Config, **extra) -> dict:
    """Backbone and anchor fingerprints, class list and run config, plus ``extra``."""
    return {
        "backbone": model.backbone_id,
        "backbone_fingerprint": model.backbone_fingerprint,
        "anchor_fingerprint": model.anchor_fingerprint,
        "classes": model.classes,
        "config": cfg.to_dict(),
        **extra,
    }


def save_trained(
    model: SavltModel,
    cfg: Config,
    path: Path,
    state: dict[str, torch.Tensor] | None = None,
    **extra,
) -> Path:
    """``state`` (default: the model's trainable state) as ``path``, atomically, with
    :func:`adapter_meta`. A federated global state also carries FedEx residuals."""
    tensors = trainable_state(model) if state is None else state
    return save_adapter(path, tensors, adapter_meta(model, cfg, **extra))
