"""The ServerApp component that ``flwr run .`` starts (``[tool.flwr.app.components]``).

It composes the server's aggregator (:func:`server.app.server_app`) with the centralised
evaluation on the partition's test centres, which the operator's machine holds; the server
package itself never reads an image.

Run-config keys (``[tool.flwr.app.config]`` in pyproject.toml, override with
``--run-config``): ``config`` (YAML), ``overrides`` (``key=value`` pairs separated by ``;``),
``method`` (a federated method of :mod:`savlt_model.methods`), ``seed`` (-1: the
config's first seed), ``out`` and ``resume``. It writes the final adapter and the job
summary (``jobs/<method>_seed<seed>.json``) under ``out``. Use absolute paths for ``out``
and ``data.root``: Flower runs the app from its own copy of the project.
"""

from __future__ import annotations

from reporting.tensorboard import write_job_events, write_run_events
from savlt_model.config import dump_config
from savlt_model.evaluation import centre_evaluator
from server.app import final_scores, server_app
from server.federation import FederatedJob


def track(job: FederatedJob, summary: dict) -> None:
    """TensorBoard events of the finished job in its run folder (``tracking.tensorboard``)."""
    if job.cfg.tracking.tensorboard:
        write_job_events(job.out_dir, job.tag, summary)
        scores = final_scores(job, summary) or ["(no server-side scores: fl.server_eval off)"]
        write_run_events(job.out_dir, "\n".join(scores), dump_config(job.cfg))


app = server_app(evaluator_for=centre_evaluator, on_done=track)
