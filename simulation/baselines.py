"""The non-federated baselines of the same run: ``central`` (pooled data, the original
protocol) and ``local`` (each hospital alone). Both use the one training loop and the one
finishing path, so they are scored exactly like the federated methods."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
from savlt_model.cores import usable_cores
from savlt_model.data.folders import Sample
from savlt_model.data.images import ImageSet
from savlt_model.data.partition import Hospital, Partition, build_partition
from savlt_model.data.protocol import data_root, is_synthetic, paper_protocol
from savlt_model.evaluation import CenterScore
from savlt_model.metrics import METRIC_KEYS
from savlt_model.model.build import build_model, image_sets, pick_device
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


@dataclass(frozen=True)
class Training:
    """One model a baseline trains and finishes: on the pooled train images of
    ``hospitals``, scored on the test centres and on the own validation sets of those
    hospitals, its records carrying ``record_extra``."""

    run: Finish
    hospitals: list[Hospital]
    steps: int
    record_extra: dict


def _central(cfg: Config, partition: Partition, seed: int, out: Path) -> list[Training]:
    fields = {
        **partition_fields(cfg, partition),
        **budget(cfg, "central", partition.train_sizes),
    }
    run = _finish_for(cfg, out, f"central_seed{seed}", "central", seed)
    return [Training(run, partition.hospitals, cfg.total_iterations, fields)]


def _local(cfg: Config, partition: Partition, seed: int, out: Path) -> list[Training]:
    """Each hospital alone, with the same per-hospital compute as in the federation."""
    steps = local_steps(cfg) * cfg.fl.rounds
    return [
        Training(_finish_for(cfg, out, f"local_seed{seed}_h{i}", "local", seed), [h], steps, {})
        for i, h in enumerate(partition.hospitals)
    ]


def _local_records(
    cfg: Config, partition: Partition, seed: int, per_model: list[list[dict]]
) -> list[dict]:
    """The average hospital's records; the worst hospital is the one whose own model
    scores lowest on its own validation set."""
    per_hospital: dict[tuple[str, str], list[dict]] = {}  # (method, centre) -> records
    for r in (r for records in per_model for r in records):
        per_hospital.setdefault((r["method"], r["center"]), []).append(r)
    return [
        make_record(
            method,
            c,
            seed,
            cfg.data.shots,
            _mean_metrics(rs),
            **partition_fields(cfg, partition),
            **budget(cfg, "local", partition.train_sizes),
            hospitals=[h.name for h in partition.hospitals],
            per_hospital_acc_multiclass=[r["acc_multiclass"] for r in rs],
            **hospital_val_fields(
                {h: a for r in rs for h, a in r.get("hospital_val_acc_multiclass", {}).items()}
            ),
            **({"calibration": rs[0]["calibration"]} if "calibration" in rs[0] else {}),
        )
        for (method, c), rs in per_hospital.items()
    ]


@dataclass(frozen=True)
class Baseline:
    """The models a baseline trains, and how their records become the baseline's."""

    trainings: Callable[[Config, Partition, int, Path], list[Training]]
    records: Callable[[Config, Partition, int, list[list[dict]]], list[dict]]


# One runner per baseline of savlt_model.methods (a test checks they match).
BASELINES: dict[str, Baseline] = {
    "central": Baseline(_central, lambda cfg, partition, seed, per_model: per_model[0]),
    "local": Baseline(_local, _local_records),
}


def _train(cfg: Config, tests: dict[str, list[Sample]], t: Training) -> list[dict]:
    """Train and finish one model; its records."""
    own = hospital_val_images(cfg, t.hospitals)
    return train_and_finish(
        cfg, t.run, t.hospitals, tests, t.steps, hospital_val=own, **t.record_extra
    )[1]


def _cpu_processes(cfg: Config) -> tuple[int, int] | None:
    """(processes, torch threads each) for the baselines' models on the CPU: a hospital
    actor's ``simulation.client_cpus`` threads, as many processes as the cores fit, at most
    ``max_actors``. Unlike a round's hospitals, which all finish before the round does, the
    models are independent: a process beyond the cores only time-slices them, and left the
    last one training alone with a core idle (the default's 4 models on 2 cores: 5:38 with
    3 processes, 4:55 with 2; docs/simulation.md). None on a GPU: one model at a time, here."""
    if pick_device(cfg.train.device).type != "cpu":
        return None
    sim = cfg.simulation
    threads = max(1, int(sim.client_cpus))
    fit = max(1, usable_cores() // threads)
    return min(fit, sim.max_actors or fit), threads


Work = list[tuple[dict[str, list[Sample]], Training]]  # (the test centres, a model)

# What the processes forked by _train_all inherit (a Config does not pickle): set only
# while they run.
_WORK: tuple[Config, Work] | None = None


def _train_nth(i: int) -> list[dict]:
    assert _WORK is not None, "only called in a process forked by _train_all"
    cfg, work = _WORK
    return _train(cfg, *work[i])


def _train_all(cfg: Config, partitions: list[Partition], work: Work) -> list[list[dict]]:
    """Each ``(tests, training)``'s records, in order.

    On the CPU the models train side by side in forked processes with the hospitals' actor
    resources (one thread each by default), so a baseline's numbers do not depend on the
    machine's core count, as a hospital's do not. Two one-thread processes did 10-20 % more
    steps per second on two cores than one two-thread process, and one model's decoding,
    scoring and figures (one core) overlap another's training. The images are decoded here
    first, so every process inherits them. On a GPU they train here, one after another.
    """
    global _WORK
    resources = _cpu_processes(cfg)
    if resources is None or not work:
        return [_train(cfg, *w) for w in work]
    processes, threads = resources
    for p in partitions:
        every = [s for h in p.hospitals for s in (*h.train, *h.val)]
        image_sets(cfg, {"hospitals": every, **p.tests}, train=False)
    _WORK = (cfg, work)
    try:
        with ProcessPoolExecutor(
            min(processes, len(work)),
            mp_context=multiprocessing.get_context("fork"),
            initializer=torch.set_num_threads,
            initargs=(threads,),
        ) as pool:
            return list(pool.map(_train_nth, range(len(work))))
    finally:
        _WORK = None


def train_baselines(cfg: Config, jobs: list[tuple[str, int]], out: Path) -> dict[tuple, dict]:
    """The baseline jobs ``(method, seed)``, all their models trained together
    (:func:`_train_all`); each job's summary with its records."""
    partitions = {seed: build_partition(cfg, seed) for seed in dict.fromkeys(s for _, s in jobs)}
    planned = {
        (m, seed): BASELINES[m].trainings(cfg, partitions[seed], seed, out) for m, seed in jobs
    }
    work = [(partitions[seed].tests, t) for (_, seed), ts in planned.items() for t in ts]
    per_model = iter(_train_all(cfg, list(partitions.values()), work))
    by_job: dict[tuple, dict] = {}
    for (method, seed), trainings in planned.items():
        records = BASELINES[method].records(
            cfg, partitions[seed], seed, [next(per_model) for _ in trainings]
        )
        by_job[method, seed] = dict(method=method, seed=seed, records=records, curves=[])
    return by_job
