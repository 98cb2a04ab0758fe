"""The Flower ServerApp that ``flwr run .`` starts (``[tool.flwr.app.components]``).

Run-config keys (``[tool.flwr.app.config]`` in pyproject.toml, override with
``--run-config``): ``config`` (YAML), ``overrides`` (``key=value`` pairs separated by ``;``),
``method``, ``seed`` (-1: the config's first seed), ``out`` and ``resume``. Use absolute
paths for ``out`` and ``data.root``: Flower runs the app from its own copy of the project.
"""

from __future__ import annotations

import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported)
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from savlt_model.config import load_config, resolve_path
from savlt_model.results import format_table
from savlt_model.wire import METHODS_FEDERATED
from server.federation import FederatedJob, run_federated

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    overrides = [s.strip() for s in str(rc.get("overrides", "")).split(";") if s.strip()]
    cfg = load_config(resolve_path(str(rc["config"])), overrides)
    method = str(rc["method"])
    if method not in METHODS_FEDERATED:
        raise ValueError(f"run config 'method' must be one of {METHODS_FEDERATED}, got {method!r}")
    seed = int(rc.get("seed", -1))
    job = FederatedJob(
        cfg,
        method,
        cfg.seeds[0] if seed < 0 else seed,
        resolve_path(str(rc["out"])),
        resume=bool(rc.get("resume", False)),
    )
    summary = run_federated(grid, job)
    if summary["records"]:
        print(format_table(summary["records"], title=f"{method}, seed {job.seed}"))
