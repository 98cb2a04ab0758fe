"""Non-federated training: the centralised baseline (``central``, the original protocol on
pooled data) and each hospital alone (``local``). Both use the one training loop."""

from __future__ import annotations

import logging
from pathlib import Path

from savlt_model.adapters import trainable_state
from savlt_model.checkpoint import save_adapter
from savlt_model.config import Config
from savlt_model.data import Sample
from savlt_model.evaluation import CenterScore, save_figures, score_centers
from savlt_model.model import SavltModel
from savlt_model.protocol import data_root, is_synthetic, paper_protocol
from savlt_model.results import make_record
from savlt_model.train import build_model, image_sets, train_steps

log = logging.getLogger(__name__)


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


def fit_and_score(
    cfg: Config,
    tag: str,
    seed: int,
    train: list[Sample],
    tests: dict[str, list[Sample]],
    steps: int,
    out_dir: Path,
    progress: bool = True,
) -> tuple[dict[str, CenterScore], float]:
    """Train one model on ``train`` for ``steps`` steps, save its adapter, score every test set."""
    model = build_model(cfg, seed)
    train_set = image_sets(cfg, {"train": train}, train=True)["train"]
    stats = train_steps(model, train_set, cfg, steps, seed, desc=tag if progress else None)
    log.info("%s: %d steps on %d images, mean loss %.4f", tag, stats.steps, len(train), stats.loss)
    scores = score_centers(model, image_sets(cfg, tests, train=False), cfg.train.eval_batch_size)
    save_figures(scores, model, out_dir / "figures", tag, is_synthetic(data_root(cfg)))
    save_adapter(
        out_dir / "adapters" / f"{tag}.safetensors",
        trainable_state(model),
        adapter_meta(model, cfg, method=tag.split("_")[0], seed=seed),
    )
    return scores, stats.loss


def run_central(cfg: Config, out_dir: Path, progress: bool = True) -> list[dict]:
    """The original protocol: pooled K-shot mixed set, every seed, every test centre."""
    records: list[dict] = []
    for seed in cfg.seeds:
        center, tests = paper_protocol(cfg, seed)
        scores, loss = fit_and_score(
            cfg,
            f"central_seed{seed}",
            seed,
            center.train,
            tests,
            cfg.total_iterations,
            out_dir,
            progress,
        )
        records += [
            make_record("central", c, seed, cfg.data.shots, s.metrics, train_loss=loss)
            for c, s in scores.items()
        ]
    return records
