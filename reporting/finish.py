"""The one path that finishes a trained model: score, figures, adapter, records.

Centralised and local-only baselines, every federated job and ``savlt evaluate`` end here,
so a result always comes with the same figures and the same record format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import reduce
from operator import add
from pathlib import Path

import numpy as np
import torch

from reporting.plots import plot_confusion, plot_reliability, plot_risk_coverage, plot_roc
from reporting.results import TRANSDUCTIVE, make_record
from savlt_model.calibration import (
    Calibration,
    CalibrationSums,
    calibration_to_dict,
    fit_calibrations,
    reliability,
)
from savlt_model.config import Config
from savlt_model.data.images import ImageSet
from savlt_model.data.partition import Hospital, Partition
from savlt_model.evaluation import (
    CenterScore,
    centre_outputs,
    score_outputs,
    site_calibration_stats,
    site_feature_stats,
)
from savlt_model.metrics import binary_scores
from savlt_model.model.build import image_sets
from savlt_model.model.savlt import SavltModel
from savlt_model.model.store import save_trained
from savlt_model.referral import risk_coverage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finish:
    """Where and under which names a trained model's results are written."""

    out_dir: Path
    tag: str  # file stem of figures and adapter, e.g. "fedavg_seed42"
    method: str
    seed: int
    shots: int | None
    synthetic: bool


def calibrations_for(
    model: SavltModel, cfg: Config, sites: list[Hospital]
) -> tuple[Calibration, Calibration | None] | None:
    """Calibrate ``model`` on the training sites' own data, in the two steps a federation
    runs over messages (:mod:`server.calibration`): every site's feature statistics make the
    reference, then every site's validation sums (re-centred on its own mean) fit the
    temperature and class bias. None without validation images."""
    if not any(h.val for h in sites):
        log.warning("%s: no validation images, so no calibration", "+".join(h.name for h in sites))
        return None
    batch = cfg.train.eval_batch_size
    sets = [image_sets(cfg, {"train": h.train, "val": h.val}, train=False) for h in sites]
    reference = reduce(add, (site_feature_stats(model, list(s.values()), batch) for s in sets))
    val_sums = [
        site_calibration_stats(model, s["val"], batch, reference.mean)
        for s in sets
        if len(s["val"])
    ]
    sums = CalibrationSums(
        reference, *(reduce(add, parts) for parts in zip(*val_sums, strict=True))
    )
    return fit_calibrations(sums, cfg.calibration)


def partition_fields(cfg: Config, partition: Partition) -> dict:
    """Record keys that say what the hospitals held: the partition, and the hospital that
    labels differently when there is one (``fl.bad_hospital`` as applied)."""
    bad = {} if partition.bad_hospital is None else {"bad_hospital": partition.bad_hospital}
    return {"partition": cfg.fl.partition, **bad}


def hospital_val_images(cfg: Config, hospitals: list[Hospital]) -> dict[str, ImageSet]:
    """The training hospitals' own validation sets, with their own labels (a hospital that
    labels differently is scored on its labels); hospitals without one are left out."""
    return image_sets(cfg, {h.name: h.val for h in hospitals if h.val}, train=False)


def hospital_val_fields(accuracy: dict[str, float]) -> dict:
    """Record keys for the hospitals' own validation accuracy: every hospital's, and the
    worst one's (the first of equals): what the pooled test centres can average away."""
    if not accuracy:
        return {}
    worst = min(accuracy, key=lambda name: accuracy[name])
    return {
        "hospital_val_acc_multiclass": accuracy,
        "worst_hospital": worst,
        "worst_hospital_val_acc_multiclass": accuracy[worst],
    }


def finish_model(
    model: SavltModel,
    tests: dict[str, ImageSet],
    batch_size: int,
    run: Finish,
    adapter_cfg: Config | None,
    calibrations: tuple[Calibration, Calibration | None] | None = None,
    adapter_state: dict[str, torch.Tensor] | None = None,
    adapter_extra: dict | None = None,
    hospital_val: dict[str, ImageSet] | None = None,
    **record_extra,
) -> tuple[dict[str, CenterScore], list[dict]]:
    """Score ``model`` on every test set (there may be none), draw its figures, save its
    adapter (unless ``adapter_cfg`` is None: an exported model already is one) and make its
    records.

    ``calibrations`` (inductive, re-centring; see
    :func:`savlt_model.evaluation.fit_calibrations`): the method's records use the inductive
    one (temperature fitted on validation); the re-centring one adds ``<method>+cal``
    records, marked "label-free, transductive". ``hospital_val`` (name: the hospital's own
    validation set): each variant's records also carry every hospital's accuracy there and
    the worst one (:func:`hospital_val_fields`), scored as that variant scores a centre.
    """
    inductive, recentred = calibrations or (None, None)
    outputs = centre_outputs(model, tests, batch_size)
    own = centre_outputs(model, hospital_val or {}, batch_size)
    variants = [(run, inductive, {})]
    if recentred is not None:
        cal_run = replace(run, tag=f"{run.tag}+cal", method=f"{run.method}+cal")
        variants.append((cal_run, recentred, {"calibration": TRANSDUCTIVE}))
    records = []
    scored = [score_outputs(model, outputs, calibration) for _, calibration, _ in variants]
    for (r, calibration, extra), s in zip(variants, scored, strict=True):
        at_hospitals = score_outputs(model, own, calibration)
        extra = {
            **hospital_val_fields(
                {h: x.metrics["acc_multiclass"] for h, x in at_hospitals.items()}
            ),
            **extra,
        }
        if s:
            save_figures(s, model, r.out_dir / "figures", r.tag, r.synthetic)
        records += [
            make_record(r.method, c, r.seed, r.shots, x.metrics, **record_extra, **extra)
            for c, x in s.items()
        ]
    if adapter_cfg is not None:
        calibration_meta = {
            "calibration": None if inductive is None else calibration_to_dict(inductive),
            "centre_calibration": None if recentred is None else calibration_to_dict(recentred),
        }
        save_trained(
            model,
            adapter_cfg,
            run.out_dir / "adapters" / f"{run.tag}.safetensors",
            adapter_state,
            method=run.method,
            seed=run.seed,
            **calibration_meta,
            **(adapter_extra or {}),
        )
    return scored[0], records


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
    plot_reliability(
        {c: reliability(s.probs, s.labels) for c, s in scores.items()},
        out_dir / f"reliability_{tag}.png",
        title=f"Reliability — {tag}",
        synthetic=synthetic,
    )
    plot_risk_coverage(
        {c: risk_coverage(s.probs, s.labels) for c, s in scores.items()},
        out_dir / f"risk_coverage_{tag}.png",
        title=f"Risk-coverage — {tag}",
        synthetic=synthetic,
    )
