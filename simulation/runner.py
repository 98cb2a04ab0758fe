"""``savlt simulate``: every method of a protocol over every seed, in one run.

Centralised (pooled data) and local-only baselines train in this process; FedAvg, FedProx and
text-anchored aggregation run the real Flower ServerApp and ClientApp through
``flwr.simulation.run_simulation``. Every (method, seed) job writes ``jobs/<tag>.json`` when
it finishes, so ``--resume`` skips finished jobs and continues an interrupted federated job
from its last checkpointed round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
from flwr.serverapp import ServerApp
from tqdm.auto import tqdm

from savlt_model.atomic import write_json
from savlt_model.central import fit_and_score
from savlt_model.config import Config
from savlt_model.evaluation import CenterScore
from savlt_model.metrics import METRIC_KEYS
from savlt_model.plots import plot_method_bars
from savlt_model.protocol import data_root, is_synthetic
from savlt_model.results import make_record, summarize
from savlt_model.wire import METHODS_FEDERATED
from server.federation import FederatedJob, local_steps, run_federated
from simulation.protocols import build_protocol

log = logging.getLogger(__name__)


def _mean_metrics(scores: list[CenterScore]) -> dict:
    """Local-only: the average hospital (metrics averaged, confusion matrices summed)."""
    out: dict = {}
    for key in METRIC_KEYS:
        values = [s.metrics[key] for s in scores if s.metrics[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    out["confusion"] = np.sum([s.metrics["confusion"] for s in scores], axis=0).tolist()
    out["n"] = scores[0].metrics["n"]
    return out


def run_baseline(cfg: Config, method: str, seed: int, out: Path) -> dict:
    protocol = build_protocol(cfg, seed)
    if method == "central":
        scores, loss = fit_and_score(
            cfg,
            f"central_seed{seed}",
            seed,
            protocol.pooled_train,
            protocol.tests,
            cfg.total_iterations,
            out,
        )
        records = [
            make_record(
                "central",
                c,
                seed,
                cfg.data.shots,
                s.metrics,
                protocol=cfg.fl.protocol,
                train_loss=loss,
            )
            for c, s in scores.items()
        ]
        return {"method": method, "seed": seed, "records": records, "curves": []}
    # Each hospital alone, with the same per-hospital compute as in the federation.
    steps = local_steps(cfg) * cfg.fl.rounds
    per_center: dict[str, list[CenterScore]] = {}
    for i, hospital in enumerate(protocol.hospitals):
        scores, _ = fit_and_score(
            cfg, f"local_seed{seed}_h{i}", seed, hospital.train, protocol.tests, steps, out
        )
        for c, s in scores.items():
            per_center.setdefault(c, []).append(s)
    records = [
        make_record(
            "local",
            c,
            seed,
            cfg.data.shots,
            _mean_metrics(s),
            protocol=cfg.fl.protocol,
            hospitals=[h.name for h in protocol.hospitals],
            per_hospital_acc_5class=[x.metrics["acc_5class"] for x in s],
        )
        for c, s in per_center.items()
    ]
    return {"method": method, "seed": seed, "records": records, "curves": []}


def server_app_for(
    *jobs: FederatedJob, failures: list[BaseException] | None = None, progress: tqdm | None = None
) -> ServerApp:
    """A ServerApp that runs ``jobs`` one after another over the same SuperNodes.

    A failing job stops the app; its exception is appended to ``failures`` (re-raised by the
    caller outside Flower's thread) or, without that list, logged.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        for job in jobs:
            try:
                run_federated(grid, job)
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
    """
    if not jobs:
        return
    from flwr.simulation import run_simulation

    from client.app import app as client_app

    failures: list[BaseException] = []
    run_simulation(
        server_app=server_app_for(*jobs, failures=failures, progress=progress),
        client_app=client_app,
        num_supernodes=cfg.fl.hospitals,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if failures:
        raise failures[0]


def _result(job: FederatedJob) -> dict:
    if not job.result_file.is_file():
        raise RuntimeError(f"{job.tag}: the simulation ended without a result; see the log")
    return json.loads(job.result_file.read_text())


def run_job(cfg: Config, method: str, seed: int, out: Path, resume: bool) -> dict:
    """One (method, seed) job; a finished one is reused when resuming."""
    job = FederatedJob(cfg, method, seed, out, resume)
    if resume and job.result_file.is_file():
        log.info("%s: finished in an earlier run, reusing %s", job.tag, job.result_file)
    elif method in ("central", "local"):
        write_json(job.result_file, run_baseline(cfg, method, seed, out))
    else:
        simulate_federated(cfg, [job])
    return _result(job)


def leave_one_out_configs(cfg: Config) -> list[Config]:
    """One config per held-out centre: the other centres federate, the held-out one tests."""
    if not cfg.fl.leave_one_out:
        return []
    centers = [cfg.data.train_center, *cfg.data.external_centers]
    return [
        dataclasses.replace(
            cfg,
            fl=dataclasses.replace(
                cfg.fl, held_out=c, hospitals=len(centers) - 1, leave_one_out=False
            ),
        )
        for c in centers
    ]


def run_simulate(cfg: Config, out: Path, resume: bool = False) -> list[dict]:
    """Run every configured method and seed; write curves.json and the method bar plots
    (the per-round curves are drawn by the report, from curves.json).

    Leave-one-centre-out jobs (``fl.leave_one_out``) write under ``out/heldout-<centre>`` and
    their records are reported with the centre named ``<centre> (held out)``.
    """
    synthetic = is_synthetic(data_root(cfg))
    variants = [(cfg, out, "")] + [
        (c, out / f"heldout-{c.fl.held_out}", " (held out)") for c in leave_one_out_configs(cfg)
    ]
    records: list[dict] = []
    curves: list[dict] = []
    bar = tqdm(
        total=len(variants) * len(cfg.seeds) * len(cfg.fl.methods), desc="simulate", unit="job"
    )
    for job_cfg, job_out, suffix in variants:
        jobs = [
            FederatedJob(job_cfg, m, seed, job_out, resume)
            for seed in cfg.seeds
            for m in cfg.fl.methods
        ]
        for job in jobs:
            if job.method in ("central", "local"):
                run_job(job_cfg, job.method, job.seed, job_out, resume)
                bar.update()
        pending = [
            j
            for j in jobs
            if j.method in METHODS_FEDERATED and not (resume and j.result_file.is_file())
        ]
        bar.update(sum(j.method in METHODS_FEDERATED for j in jobs) - len(pending))
        simulate_federated(job_cfg, pending, bar)
        for job in jobs:
            summary = _result(job)
            records += [dict(r, center=r["center"] + suffix) for r in summary["records"]]
            if not suffix:
                curves += summary["curves"]
    bar.close()
    plot_method_bars(
        summarize(records),
        out / "figures" / "methods_acc_5class.png",
        "5-class accuracy by method and centre",
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
