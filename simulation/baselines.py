"""The non-federated baselines of the same run: ``central`` (pooled data, the original
protocol) and ``local`` (each hospital alone). Both use the one training loop and the one
finishing path, so they are scored exactly like the federated methods."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from reporting.finish import (
    Finish,
    calibrations_for,
    finish_model,
    hospital_val_fields,
    hospital_val_images,
    partition_fields,
)
from reporting.results import CALIBRATION_KEYS, make_record
from savlt_model.budget import budget, local_steps
from savlt_model.config import Config
from savlt_model.data.folders import Sample
from savlt_model.data.images import ImageSet
from savlt_model.data.partition import Hospital, Partition, build_partition
from savlt_model.data.protocol import data_root, is_synthetic, paper_protocol
from savlt_model.evaluation import CenterScore
from savlt_model.metrics import METRIC_KEYS
from savlt_model.model.build import build_model, image_sets
from savlt_model.train import train_steps
from synthetic.write import ensure_data

log = logging.getLogger(__name__)


def train_and_finish(
    cfg: Config,
    run: Finish,
    hospitals: list[Hospital],
    tests: dict[str, list[Sample]],
    steps: int,
    progress: bool = True,
    hospital_val: dict[str, ImageSet] | None = None,
    **record_extra,
) -> tuple[dict[str, CenterScore], list[dict]]:
    """Train one model on the hospitals' pooled train images for ``steps`` steps, calibrate
    it on their pooled data (one site: the data it was trained on), then
    :func:`finish_model` it (scored on ``hospital_val`` too, when given)."""
    model = build_model(cfg, run.seed)
    train = [s for h in hospitals for s in h.train]
    pooled = Hospital(
        "+".join(h.name for h in hospitals), train, [s for h in hospitals for s in h.val]
    )
    train_set = image_sets(cfg, {"train": train}, train=True)["train"]
    stats = train_steps(model, train_set, cfg, steps, run.seed, desc=run.tag if progress else None)
    log.info(
        "%s: %d steps on %d images, mean loss %.4f", run.tag, stats.steps, len(train), stats.loss
    )
    return finish_model(
        model,
        image_sets(cfg, tests, train=False),
        cfg.train.eval_batch_size,
        run,
        adapter_cfg=cfg,
        calibrations=calibrations_for(model, cfg, [pooled]),
        hospital_val=hospital_val,
        train_loss=stats.loss,
        **record_extra,
    )


def _finish_for(cfg: Config, out: Path, tag: str, method: str, seed: int) -> Finish:
    return Finish(out, tag, method, seed, cfg.data.shots, is_synthetic(data_root(cfg)))


def run_central(cfg: Config, out_dir: Path, progress: bool = True) -> list[dict]:
    """``savlt train``: the original protocol, pooled K-shot mixed set, every seed."""
    ensure_data(cfg)
    records: list[dict] = []
    for seed in cfg.seeds:
        center, tests = paper_protocol(cfg, seed)
        run = _finish_for(cfg, out_dir, f"central_seed{seed}", "central", seed)
        hospital = Hospital(center.name, center.train, center.val)
        _, new = train_and_finish(
            cfg,
            run,
            [hospital],
            tests,
            cfg.total_iterations,
            progress,
            **budget(cfg, "central", [len(center.train)]),
        )
        records += new
    return records


def _mean_metrics(records: list[dict]) -> dict:
    """Local-only: the average hospital (metrics averaged, confusion matrices summed)."""
    out: dict = {}
    for key in (*METRIC_KEYS, *CALIBRATION_KEYS):
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    out["confusion"] = np.sum([r["confusion"] for r in records], axis=0).tolist()
    out["n"] = records[0]["n"]
    return out


def _central(cfg: Config, partition: Partition, seed: int, out: Path) -> list[dict]:
    run = _finish_for(cfg, out, f"central_seed{seed}", "central", seed)
    _, records = train_and_finish(
        cfg,
        run,
        partition.hospitals,
        partition.tests,
        cfg.total_iterations,
        hospital_val=hospital_val_images(cfg, partition.hospitals),
        **partition_fields(cfg, partition),
        **budget(cfg, "central", [len(h.train) for h in partition.hospitals]),
    )
    return records


def _local(cfg: Config, partition: Partition, seed: int, out: Path) -> list[dict]:
    """Each hospital alone, with the same per-hospital compute as in the federation; the
    worst hospital is the one whose own model scores lowest on its own validation set."""
    steps = local_steps(cfg) * cfg.fl.rounds
    per_hospital: dict[tuple[str, str], list[dict]] = {}  # (method, centre) -> records
    for i, hospital in enumerate(partition.hospitals):
        run = _finish_for(cfg, out, f"local_seed{seed}_h{i}", "local", seed)
        own = hospital_val_images(cfg, [hospital])
        for r in train_and_finish(cfg, run, [hospital], partition.tests, steps, True, own)[1]:
            per_hospital.setdefault((r["method"], r["center"]), []).append(r)
    return [
        make_record(
            method,
            c,
            seed,
            cfg.data.shots,
            _mean_metrics(rs),
            **partition_fields(cfg, partition),
            **budget(cfg, "local", [len(h.train) for h in partition.hospitals]),
            hospitals=[h.name for h in partition.hospitals],
            per_hospital_acc_multiclass=[r["acc_multiclass"] for r in rs],
            **hospital_val_fields(
                {h: a for r in rs for h, a in r.get("hospital_val_acc_multiclass", {}).items()}
            ),
            **({"calibration": rs[0]["calibration"]} if "calibration" in rs[0] else {}),
        )
        for (method, c), rs in per_hospital.items()
    ]


# One runner per baseline of savlt_model.methods (a test checks they match).
BASELINES: dict[str, Callable[[Config, Partition, int, Path], list[dict]]] = {
    "central": _central,
    "local": _local,
}


def run_baseline(cfg: Config, method: str, seed: int, out: Path) -> dict:
    """One baseline job over the configured partition; the job summary with its records."""
    records = BASELINES[method](cfg, build_partition(cfg, seed), seed, out)
    return {"method": method, "seed": seed, "records": records, "curves": []}
