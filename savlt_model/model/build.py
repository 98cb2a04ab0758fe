"""Build SAVLT models: the device, the backbone (loaded once per process), fresh and reused models.

Every path that needs a model (training, federated rounds, the server's reference, export)
comes here, so a seed always gives the same trainable initialisation and a process never
loads the frozen backbone twice.
"""

from __future__ import annotations

import functools
import json

import torch

from savlt_model.config import Config
from savlt_model.data.folders import Sample
from savlt_model.data.images import ImageSet
from savlt_model.model.adapters import freeze_lora_a
from savlt_model.model.backbone import Backbone, load_backbone
from savlt_model.model.consistency import CONSISTENCY_VIEWS
from savlt_model.model.savlt import SavltModel


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
    """A fresh SAVLT model whose trainable initialisation depends only on ``seed`` (and with
    ``fl.lora_aggregation: ffa``, its frozen LoRA A too)."""
    backbone = cached_backbone(cfg.model.name, cfg.model.pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SavltModel(cfg, backbone)
    if cfg.fl.lora_aggregation == "ffa":
        freeze_lora_a(model, seed)
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
    """ImageSets sized and normalised for the configured backbone, with the configured
    intensity standardisation (and, for training, scanner randomisation, with the clean
    and two randomised views per scan when the consistency term is on)."""
    bb = cached_backbone(cfg.model.name, cfg.model.pretrained)
    augment = cfg.train.scanner_augment if train else 0.0
    views = CONSISTENCY_VIEWS if train and cfg.train.consistency_weight > 0 else 1
    return {
        k: ImageSet(v, bb.image_size, bb.mean, bb.std, train, cfg.data.intensity, augment, views)
        for k, v in samples.items()
    }
