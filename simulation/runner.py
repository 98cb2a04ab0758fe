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
from savlt_model.plots import plot_method_bars, plot_round_curves
from savlt_model.protocol import data_root, is_synthetic
from savlt_model.results import make_record, summarize
from server.federation import FederatedJob, local_steps, run_federated
from simulation.protocols import build_protocol

log = logging.getLogger(__name__)


def server_app_for(job: FederatedJob) -> ServerApp:
    """A ServerApp bound to one job (``flwr run`` builds the same from its run config)."""
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        run_federated(grid, job)

    return app


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


def run_job(cfg: Config, method: str, seed: int, out: Path, resume: bool) -> dict:
    job = FederatedJob(cfg, method, seed, out, resume)
    if resume and job.result_file.is_file():
        log.info("%s: finished in an earlier run, reusing %s", job.tag, job.result_file)
        return json.loads(job.result_file.read_text())
    if method in ("central", "local"):
        summary = run_baseline(cfg, method, seed, out)
        write_json(job.result_file, summary)
        return summary
    from flwr.simulation import run_simulation

    from client.app import app as client_app

    run_simulation(
        server_app=server_app_for(job),
        client_app=client_app,
        num_supernodes=cfg.fl.hospitals,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if not job.result_file.is_file():
        raise RuntimeError(f"{job.tag}: the simulation ended without a result; see {out}/savlt.log")
    return json.loads(job.result_file.read_text())


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
    """Run every configured method and seed; write results.json, curves and bar plots.

    Leave-one-centre-out jobs (``fl.leave_one_out``) write under ``out/heldout-<centre>`` and
    their records are reported with the centre named ``<centre> (held out)``.
    """
    synthetic = is_synthetic(data_root(cfg))
    variants = [(cfg, out, "")] + [
        (c, out / f"heldout-{c.fl.held_out}", " (held out)") for c in leave_one_out_configs(cfg)
    ]
    jobs = [
        (variant, seed, method)
        for variant in variants
        for seed in cfg.seeds
        for method in cfg.fl.methods
    ]
    records: list[dict] = []
    curves: list[dict] = []
    for (job_cfg, job_out, suffix), seed, method in tqdm(jobs, desc="simulate", unit="job"):
        summary = run_job(job_cfg, method, seed, job_out, resume)
        records += [dict(r, center=r["center"] + suffix) for r in summary["records"]]
        if not suffix:
            curves += summary["curves"]
    if curves:
        plot_round_curves(
            curves,
            out / "figures" / "accuracy_per_round.png",
            "Global model accuracy per round",
            synthetic=synthetic,
        )
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
