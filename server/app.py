"""The Flower ServerApp that ``flwr run .`` starts (``[tool.flwr.app.components]``).

Run-config keys (``[tool.flwr.app.config]`` in pyproject.toml, override with
``--run-config``): ``config`` (YAML), ``overrides`` (``key=value`` pairs separated by ``;``),
``method`` (a federated method of :mod:`savlt_model.methods`), ``seed`` (-1: the
config's first seed), ``out`` and ``resume``. It writes the final adapter and the job
summary (``jobs/<method>_seed<seed>.json``) under ``out``. Use absolute
paths for ``out`` and ``data.root``: Flower runs the app from its own copy of the project.
"""

from __future__ import annotations

import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported)
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from savlt_model.atomic import write_json
from savlt_model.config import load_config, resolve_path
from savlt_model.methods import get_method
from savlt_model.model.build import cached_model
from savlt_model.model.store import save_trained
from server.federation import FederatedJob, job_summary, run_federated

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    overrides = [s.strip() for s in str(rc.get("overrides", "")).split(";") if s.strip()]
    cfg = load_config(resolve_path(str(rc["config"])), overrides)
    method = str(rc["method"])
    if not get_method(method).federated:
        raise ValueError(f"run config 'method' {method!r} is a baseline, not a federated method")
    seed = int(rc.get("seed", -1))
    job = FederatedJob(
        cfg,
        method,
        cfg.seeds[0] if seed < 0 else seed,
        resolve_path(str(rc["out"])),
        resume=bool(rc.get("resume", False)),
    )
    run_federated(grid, job)
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
    last = [c for c in summary["curves"] if c["round"] == summary["rounds"]]
    for c in last:  # the server's score of the final global model, when it holds test data
        auc = "n/a" if c["auc_binary"] is None else f"{c['auc_binary']:.2f} %"
        print(
            f"{method}, seed {job.seed}, {c['center']}: acc {c['acc_multiclass']:.2f} %, "
            f"binary acc {c['acc_binary']:.2f} %, AUC {auc}"
        )
