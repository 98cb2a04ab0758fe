"""``savlt simulate``: every method of a protocol over every seed, in one run.

Centralised (pooled data) and local-only baselines train first, for every variant
(:mod:`simulation.baselines`); then every federated method of the registry runs the real
Flower ServerApp and ClientApp through ``flwr.simulation.run_simulation``, and its final
global model is finished like the baselines' (:mod:`reporting.finish`). Every (method,
seed) job writes ``jobs/<tag>.json`` when it finishes, so ``--resume`` skips finished jobs
and continues an interrupted federated job from its last checkpointed round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
from flwr.serverapp import ServerApp
from tqdm.auto import tqdm

from reporting.finish import Finish, finish_model, hospital_val_images, partition_fields
from reporting.plots import plot_method_bars
from reporting.results import summarize
from reporting.tensorboard import write_job_events
from savlt_model.atomic import write_json
from savlt_model.budget import budget
from savlt_model.config import Config
from savlt_model.data.partition import Partition, build_partition
from savlt_model.data.protocol import data_root, is_synthetic
from savlt_model.evaluation import centre_evaluator
from savlt_model.methods import get_method
from savlt_model.model.build import cached_model, image_sets
from server.federation import FederatedJob, job_calibrations, job_summary, run_federated
from simulation.baselines import train_baselines
from simulation.resources import actor_resources
from synthetic.write import ensure_data

log = logging.getLogger(__name__)


def server_app_for(
    *jobs: FederatedJob, failures: list[BaseException] | None = None, progress: tqdm | None = None
) -> ServerApp:
    """A ServerApp that runs and finishes ``jobs`` one after another over the same SuperNodes.

    A failing job stops the app; its exception is appended to ``failures`` (re-raised by the
    caller outside Flower's thread) or, without that list, logged.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        for job in jobs:
            try:
                run_federated(grid, job, centre_evaluator(job.cfg, job.seed))
                finish_federated(job)
            except Exception as exc:
                log.error("%s failed: %s", job.tag, exc)
                if failures is not None:
                    failures.append(exc)
                return
            if progress is not None:
                progress.update()

    return server_app


def simulate_federated(cfg: Config, jobs: list[FederatedJob], progress: tqdm | None = None) -> None:
    """Run federated jobs of one configuration in ONE Flower simulation.

    Ray and the ClientApp workers (imports, backbone, decoded images) start once, not per job.
    Each actor gets the resources of the config's ``simulation`` section
    (:mod:`simulation.resources`), stated in the log.
    """
    if not jobs:
        return
    from flwr.simulation import run_simulation

    from client.app import SimulatedHospitals, simulation_node_config
    from client.app import app as client_app

    resources = actor_resources(cfg, jobs[0].seed)
    log.info("%s", resources.describe(cfg.fl.hospitals))
    failures: list[BaseException] = []
    run_simulation(
        server_app=server_app_for(*jobs, failures=failures, progress=progress),
        # the server sends no local path: the simulated hospitals get this run's data
        # folder, work directory and files as their node config, as a SuperNode would
        client_app=SimulatedHospitals(client_app, simulation_node_config(cfg)),
        num_supernodes=cfg.fl.hospitals,
        backend_config=resources.backend_config(),
    )
    if failures:
        raise failures[0]


def _result(job: FederatedJob) -> dict:
    if not job.result_file.is_file():
        raise RuntimeError(f"{job.tag}: the simulation ended without a result; see the log")
    return json.loads(job.result_file.read_text())


def bad_hospital_rounds(partition: Partition, history: list[dict]) -> list[dict] | None:
    """Per round, what the aggregation gave the hospital that labels differently: its shared
    weight and its prototype-row weights per class, next to FedAvg's share and its class
    share n_kc / sum n_kc, and the agreement the weighting saw. None without one.

    The server never learns which node that is; its row is found by the class counts the
    hospital reported (its own labels'). A round where another hospital reported the same
    counts says ``index: None`` rather than guess.
    """
    if partition.bad_hospital is None:
        return None
    labels = [s.label for s in partition.hospitals[partition.bad_hospital["hospital"]].train]
    out = []
    for row in history:
        counts = np.bincount(labels, minlength=len(row["class-counts"][0])).tolist()
        rows = [j for j, c in enumerate(row["class-counts"]) if c == counts]
        entry: dict = {"round": row["round"], "index": rows[0] if len(rows) == 1 else None}
        if entry["index"] is not None:
            j, n_kc = entry["index"], np.asarray(row["class-counts"], dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                share = np.where(n_kc.sum(axis=0) > 0, n_kc[j] / n_kc.sum(axis=0), 0.0)
            entry |= {
                "weight": row["weights"][j],
                "fedavg_weight": row["fedavg-weights"][j],
                "prototype_weights": row["prototype-weights"][j],
                "class_share": share.tolist(),
                "agreement": row["agreement"][j],
            }
            if "class-agreement" in row:
                entry["class_agreement"] = row["class-agreement"][j]
        out.append(entry)
    return out


def finish_federated(job: FederatedJob) -> dict:
    """Finish the job's final global model (scores on the partition's test sets when
    ``fl.server_eval``, figures, adapter with its FedEx residuals and the calibrations the
    hospitals' sums gave) and write its result."""
    cfg = job.cfg
    state, summary = job_summary(job)
    model = cached_model(cfg, job.seed)
    model.load_global_state(state)
    partition = build_partition(cfg, job.seed)
    tests = partition.tests if cfg.fl.server_eval else {}
    run = Finish(
        job.out_dir, job.tag, job.method, job.seed, cfg.data.shots, is_synthetic(data_root(cfg))
    )
    _, summary["records"] = finish_model(
        model,
        image_sets(cfg, tests, train=False),
        cfg.train.eval_batch_size,
        run,
        adapter_cfg=cfg,
        calibrations=job_calibrations(summary),
        adapter_state=state,
        adapter_extra={"rounds": summary["rounds"]},
        hospital_val=hospital_val_images(cfg, partition.hospitals) if tests else None,
        **partition_fields(cfg, partition),
        **{  # the rounds done
            **budget(cfg, job.method, partition.train_sizes),
            "rounds": summary["rounds"],
        },
        upload_bytes=summary["upload_bytes"],
        **(
            {}
            if summary["privacy"] is None
            else {k: summary["privacy"][k] for k in ("epsilon", "delta")}
        ),
    )
    summary["bad_hospital"] = partition.bad_hospital
    summary["bad_hospital_rounds"] = bad_hospital_rounds(partition, summary["history"])
    write_json(job.result_file, summary)
    return summary


def _reused(job: FederatedJob, resume: bool) -> bool:
    """Whether an earlier run finished ``job`` and this one resumes: then it is reused."""
    if resume and job.result_file.is_file():
        log.info("%s: finished in an earlier run, reusing %s", job.tag, job.result_file)
        return True
    return False


def run_job(cfg: Config, method: str, seed: int, out: Path, resume: bool) -> dict:
    """One (method, seed) job; a finished one is reused when resuming."""
    job = FederatedJob(cfg, method, seed, out, resume)
    if not _reused(job, resume):
        if get_method(method).federated:
            simulate_federated(cfg, [job])
        else:
            write_json(job.result_file, train_baselines(cfg, [(method, seed)], out)[method, seed])
    return _result(job)


def leave_one_out_configs(cfg: Config) -> list[Config]:
    """One config per held-out centre: the other centres federate, the held-out one tests."""
    if not cfg.fl.leave_one_out:
        return []
    centers = [cfg.data.train_center, *cfg.data.external_centers]
    per_centre = cfg.fl.hospitals // len(centers)  # fl.split deals a centre into these
    return [
        dataclasses.replace(
            cfg,
            fl=dataclasses.replace(
                cfg.fl,
                held_out=c,
                hospitals=per_centre * (len(centers) - 1),
                leave_one_out=False,
            ),
        )
        for c in centers
    ]


def run_simulate(cfg: Config, out: Path, resume: bool = False) -> list[dict]:
    """Run every configured method and seed; write curves.json and the method bar plots
    (the per-round curves are drawn by the report, from curves.json).

    Leave-one-centre-out jobs (``fl.leave_one_out``) write under ``out/heldout-<centre>`` and
    their records (their held-out centre's only, :func:`build_partition`) are reported with
    the centre named ``<centre> (held out)``.
    """
    synthetic = is_synthetic(ensure_data(cfg))
    variants = [(cfg, out, "")] + [
        (c, out / f"heldout-{c.fl.held_out}", " (held out)") for c in leave_one_out_configs(cfg)
    ]
    records: list[dict] = []
    curves: list[dict] = []
    bar = tqdm(
        total=len(variants) * len(cfg.seeds) * len(cfg.fl.methods), desc="simulate", unit="job"
    )
    planned = [
        [
            FederatedJob(job_cfg, m, seed, job_out, resume)
            for seed in cfg.seeds
            for m in cfg.fl.methods
        ]
        for job_cfg, job_out, _ in variants
    ]
    # Every variant's baselines before any federation: the baselines fork their processes,
    # and a process forked after Ray ran in its parent can crash in Ray's native code (a
    # leave-one-out run's second variant did: a segfault in _raylet.so, docs/simulation.md).
    for (job_cfg, job_out, _), jobs in zip(variants, planned, strict=True):
        baselines = [j for j in jobs if not get_method(j.method).federated]
        to_train = [j for j in baselines if not _reused(j, resume)]
        summaries = train_baselines(job_cfg, [(j.method, j.seed) for j in to_train], job_out)
        for job in to_train:
            write_json(job.result_file, summaries[job.method, job.seed])
        bar.update(len(baselines))
    for (job_cfg, job_out, suffix), jobs in zip(variants, planned, strict=True):
        federated = [j for j in jobs if get_method(j.method).federated]
        pending = [j for j in federated if not _reused(j, resume)]
        bar.update(len(federated) - len(pending))
        simulate_federated(job_cfg, pending, bar)
        for job in jobs:
            summary = _result(job)
            if cfg.tracking.tensorboard and get_method(job.method).federated:
                write_job_events(job_out, job.tag, summary)
            records += [dict(r, center=r["center"] + suffix) for r in summary["records"]]
            if not suffix:
                curves += summary["curves"]
    bar.close()
    plot_method_bars(
        summarize(records),
        out / "figures" / "methods_acc_multiclass.png",
        f"{len(cfg.task.classes)}-class accuracy by method and centre",
        synthetic=synthetic,
    )
    plot_method_bars(
        summarize(records),
        out / "figures" / "methods_auc_binary.png",
        "High-risk AUC by method and centre",
        metric="auc_binary",
        synthetic=synthetic,
    )
    write_json(out / "curves.json", curves)
    return records
