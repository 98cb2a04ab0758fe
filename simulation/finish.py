"""The one path that finishes a trained model: score, figures, adapter, records.

Centralised and local-only baselines, every federated job and ``savlt evaluate`` end here,
so a result always comes with the same figures and the same record format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from savlt_model.config import Config
from savlt_model.data.images import ImageSet
from savlt_model.evaluation import CenterScore, score_centers
from savlt_model.metrics import binary_scores
from savlt_model.model.savlt import SavltModel
from savlt_model.model.store import save_trained
from simulation.plots import plot_confusion, plot_roc
from simulation.results import make_record


@dataclass(frozen=True)
class Finish:
    """Where and under which names a trained model's results are written."""

    out_dir: Path
    tag: str  # file stem of figures and adapter, e.g. "fedavg_seed42"
    method: str
    seed: int
    shots: int | None
    synthetic: bool


def finish_model(
    model: SavltModel,
    tests: dict[str, ImageSet],
    batch_size: int,
    run: Finish,
    adapter_cfg: Config | None,
    adapter_state: dict[str, torch.Tensor] | None = None,
    adapter_extra: dict | None = None,
    **record_extra,
) -> tuple[dict[str, CenterScore], list[dict]]:
    """Score ``model`` on every test set (there may be none), draw its figures, save its
    adapter (unless ``adapter_cfg`` is None: an exported model already is one) and make its
    records."""
    scores = score_centers(model, tests, batch_size)
    if scores:
        save_figures(scores, model, run.out_dir / "figures", run.tag, run.synthetic)
    if adapter_cfg is not None:
        save_trained(
            model,
            adapter_cfg,
            run.out_dir / "adapters" / f"{run.tag}.safetensors",
            adapter_state,
            method=run.method,
            seed=run.seed,
            **(adapter_extra or {}),
        )
    records = [
        make_record(run.method, c, run.seed, run.shots, s.metrics, **record_extra)
        for c, s in scores.items()
    ]
    return scores, records


def save_figures(
    scores: dict[str, CenterScore],
    model: SavltModel,
    out_dir: Path,
    tag: str,
    synthetic: bool,
) -> None:
    """One confusion matrix per centre and one ROC figure (high-risk score) for all centres."""
    for center, s in scores.items():
        plot_confusion(
            s.metrics["confusion"],
            model.classes,
            out_dir / f"confusion_{tag}_{center}.png",
            title=f"{tag} — {center}",
            synthetic=synthetic,
        )
    positive = np.asarray(model.positive)
    curves = {
        c: (np.isin(s.labels, positive).astype(int), binary_scores(s.probs, model.positive))
        for c, s in scores.items()
    }
    plot_roc(
        curves, out_dir / f"roc_{tag}.png", title=f"High-risk ROC — {tag}", synthetic=synthetic
    )
