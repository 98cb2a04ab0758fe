"""Run tracking: TensorBoard event files in the run folder, so ``tensorboard --logdir runs/``
compares every run on one machine (no server, no account, no network).

Written from what a run already keeps (the job summaries, the results table and the
config), after the fact: tracking adds nothing to a training round, and a run resumed from
its checkpoint writes the same events. ``tracking.tensorboard: false`` switches it off.

Layout: ``<run>/tensorboard/<method>_seed<seed>/`` per job (per round: ``loss/train``,
``acc/<centre>``, ``auc/<centre>``, ``bytes/up``, ``bytes/down``, ``weight/hospital_<k>``)
and ``<run>/tensorboard/run/`` per run (text: ``results`` and ``config``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

EVENTS_DIR = "tensorboard"


def _writer(run_dir: Path, name: str) -> SummaryWriter:
    """A fresh event folder: a rewritten run replaces its events instead of appending to them."""
    folder = Path(run_dir) / EVENTS_DIR / name
    shutil.rmtree(folder, ignore_errors=True)
    return SummaryWriter(log_dir=str(folder))


def write_job_events(run_dir: Path, tag: str, summary: dict) -> Path:
    """One job's per-round scalars from its summary (``history`` rows and server ``curves``).

    A round's hospitals are numbered in the order the server aggregated their replies
    (sorted by content, so a rerun numbers them the same): the ids of the nodes never leave
    the server's log.
    """
    writer = _writer(run_dir, tag)
    try:
        for row in summary.get("history", []):
            step = int(row["round"])
            writer.add_scalar("loss/train", float(row["train-loss"]), step)
            writer.add_scalar("bytes/up", float(row["upload-bytes"]), step)
            writer.add_scalar("bytes/down", float(row["download-bytes"]), step)
            for k, weight in enumerate(row.get("weights", [])):
                writer.add_scalar(f"weight/hospital_{k}", float(weight), step)
            for key, value in row.items():  # the hospitals' own val scores (fl.client_eval)
                if key.startswith("hospitals-") and isinstance(value, (int, float)):
                    writer.add_scalar(f"hospitals/{key.removeprefix('hospitals-')}", value, step)
        for point in summary.get("curves", []):
            step, centre = int(point["round"]), point["center"]
            writer.add_scalar(f"acc/{centre}", float(point["acc_multiclass"]), step)
            if point.get("auc_binary") is not None:
                writer.add_scalar(f"auc/{centre}", float(point["auc_binary"]), step)
    finally:
        writer.close()
    return Path(writer.log_dir)


def write_run_events(run_dir: Path, table: str, config_yaml: str) -> Path:
    """The run's final results table and its config, as text."""
    writer = _writer(run_dir, "run")
    try:
        # TensorBoard renders text as Markdown: indent by four spaces to keep the columns
        writer.add_text("results", _preformatted(table), 0)
        writer.add_text("config", _preformatted(config_yaml), 0)
    finally:
        writer.close()
    return Path(writer.log_dir)


def _preformatted(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
