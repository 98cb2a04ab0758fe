"""Centralised SAVLT training on the original protocol: the baseline every federated run
is compared with (method name ``central``)."""

from __future__ import annotations

import logging
from pathlib import Path

from savlt_model.adapters import trainable_state
from savlt_model.checkpoint import save_adapter
from savlt_model.config import Config
from savlt_model.data import ImageSet, Sample
from savlt_model.evaluation import save_figures, score_centers, score_records
from savlt_model.model import SavltModel
from savlt_model.protocol import data_root, is_synthetic, paper_protocol
from savlt_model.train import build_model, cached_backbone, train_steps

log = logging.getLogger(__name__)


def image_sets(cfg: Config, samples: dict[str, list[Sample]], train: bool) -> dict[str, ImageSet]:
    """ImageSets sized and normalised for the configured backbone."""
    bb = cached_backbone(cfg.model.name, cfg.model.pretrained)
    return {k: ImageSet(v, bb.image_size, bb.mean, bb.std, train=train) for k, v in samples.items()}


def adapter_meta(model: SavltModel, cfg: Config, **extra) -> dict:
    """What a loader must check before trusting an adapter file."""
    return {
        "backbone": model.backbone_id,
        "backbone_fingerprint": model.backbone_fingerprint,
        "anchor_fingerprint": model.anchor_fingerprint,
        "classes": model.classes,
        "config": cfg.to_dict(),
        **extra,
    }


def run_central(cfg: Config, out_dir: Path, progress: bool = True) -> list[dict]:
    """Train on the pooled K-shot mixed set for every seed; score each test centre."""
    synthetic = is_synthetic(data_root(cfg))
    records: list[dict] = []
    for seed in cfg.seeds:
        train_center, tests = paper_protocol(cfg, seed)
        train_set = image_sets(cfg, {"train": train_center.train}, train=True)["train"]
        test_sets = image_sets(cfg, tests, train=False)
        model = build_model(cfg, seed)
        stats = train_steps(
            model,
            train_set,
            cfg,
            cfg.total_iterations,
            seed,
            desc=f"central seed {seed}" if progress else None,
        )
        log.info("central seed %d: %d steps, mean loss %.4f", seed, stats.steps, stats.loss)
        scores = score_centers(model, test_sets, cfg.train.eval_batch_size)
        records += score_records(scores, "central", seed, cfg.data.shots, train_loss=stats.loss)
        save_figures(scores, model, out_dir / "figures", f"central_seed{seed}", synthetic)
        save_adapter(
            out_dir / "adapters" / f"central_seed{seed}.safetensors",
            trainable_state(model),
            adapter_meta(model, cfg, method="central", seed=seed),
        )
    return records
