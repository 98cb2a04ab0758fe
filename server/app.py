"""The Flower ServerApp of one federated job, as ``flwr run .`` starts it.

:func:`server_app` builds it; whoever starts it injects what the server must not do itself:
the centralised evaluation (``evaluator_for``, Flower's ``evaluate_fn`` convention) and what
to do with the finished job (``on_done``). ``tools/flwr_server.py`` is the composition that
``[tool.flwr.app.components]`` names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported)
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from savlt_model.atomic import write_json
from savlt_model.config import Config, load_config, resolve_path
from savlt_model.evaluation import Evaluate
from savlt_model.methods import get_method
from savlt_model.model.build import cached_model
from savlt_model.model.store import save_trained
from server.federation import FederatedJob, job_summary, run_federated

EvaluatorFor = Callable[[Config, int], Evaluate | None]
OnDone = Callable[[FederatedJob, dict], None]


def server_app(
    evaluator_for: EvaluatorFor | None = None, on_done: OnDone | None = None
) -> ServerApp:
    """The ``flwr run`` ServerApp: one job of the run config, its adapter and summary."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        job = job_from_run_config(context)
        evaluate = evaluator_for(job.cfg, job.seed) if evaluator_for else None
        summary = finish_job(grid, job, evaluate)
        if on_done is not None:
            on_done(job, summary)

    return app


def job_from_run_config(context: Context) -> FederatedJob:
    """The job the run config asks for; a baseline method is refused."""
    rc = context.run_config
    overrides = [s.strip() for s in str(rc.get("overrides", "")).split(";") if s.strip()]
    cfg = load_config(resolve_path(str(rc["config"])), overrides)
    method = str(rc["method"])
    if not get_method(method).federated:
        raise ValueError(f"run config 'method' {method!r} is a baseline, not a federated method")
    seed = int(rc.get("seed", -1))
    return FederatedJob(
        cfg,
        method,
        cfg.seeds[0] if seed < 0 else seed,
        resolve_path(str(rc["out"])),
        resume=bool(rc.get("resume", False)),
        registered=registered_examples(str(rc.get("registered-examples", ""))),
    )


def registered_examples(text: str) -> dict[str, int]:
    """The run config's ``registered-examples`` ("NODE_ID=N;NODE_ID=N", from
    ``flwr supernode list``): each hospital's dataset size as its operator registered it."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        node, _, n = item.partition("=")
        if not node.strip().isdigit() or not n.strip().isdigit() or int(n) < 1:
            raise ValueError(
                f"run config 'registered-examples': {item!r} must be NODE_ID=N with N >= 1 "
                '(e.g. registered-examples="123=40;456=35")'
            )
        out[node.strip()] = int(n)
    return out


def finish_job(grid: Grid, job: FederatedJob, evaluate: Evaluate | None) -> dict:
    """Run the job, write its adapter and summary, print the server's final scores."""
    cfg, method = job.cfg, job.method
    run_federated(grid, job, evaluate)
    state, summary = job_summary(job)
    model = cached_model(cfg, job.seed)
    model.load_global_state(state)
    calibration = summary["calibration"] or {}
    save_trained(
        model,
        cfg,
        job.adapter_file,
        state,
        method=method,
        seed=job.seed,
        rounds=summary["rounds"],
        calibration=calibration.get("inductive"),
        centre_calibration=calibration.get("recentred"),
    )
    write_json(job.result_file, summary)
    for line in final_scores(job, summary):
        print(line)
    return summary


def final_scores(job: FederatedJob, summary: dict) -> list[str]:
    """The server's score of the final global model per centre, when it holds test data."""
    lines = []
    for c in summary["curves"]:
        if c["round"] != summary["rounds"]:
            continue
        auc = "n/a" if c["auc_binary"] is None else f"{c['auc_binary']:.2f} %"
        lines.append(
            f"{job.method}, seed {job.seed}, {c['center']}: acc {c['acc_multiclass']:.2f} %, "
            f"binary acc {c['acc_binary']:.2f} %, AUC {auc}"
        )
    return lines
