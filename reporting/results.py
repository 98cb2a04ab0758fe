"""The results.json record format, its seed summary and the console table.

``results.json`` is a plain JSON list of records, one per (method, centre, seed, shots)
evaluation: ``method``, ``center``, ``seed``, ``shots``, the seven metric keys of
:data:`savlt_model.metrics.METRIC_KEYS` (percent, or ``None`` when undefined) and any
extra keys (``confusion``, ``upload_bytes``, ``protocol``, ...), which are kept as they are.
``summary.json`` holds the run's meta plus :func:`summarize` of the records.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from savlt_model.atomic import write_json
from savlt_model.errors import SavltError
from savlt_model.metrics import METRIC_KEYS, upgrade_keys

RECORD_KEYS = ("method", "center", "seed", "shots")
TRANSDUCTIVE = "label-free, transductive"  # scores that used the scored centre's own scans
SYNTHETIC_LABEL = "SYNTHETIC DATA — not clinical performance"
# Confidence and shift scores of a calibrated model (savlt_model.calibration); older
# results.json files lack them, so they are summarised where present.
CALIBRATION_KEYS = ("ece", "brier", "shift_score")
# Selective prediction of a model with a referral threshold (savlt_model.referral), in %.
REFERRAL_KEYS = ("referral_rate", "accepted_sensitivity", "accepted_specificity")
# The worst training hospital's accuracy on its own validation set (simulation records,
# reporting.finish.hospital_val_fields), in %: what pooled test centres can average away.
HOSPITAL_KEYS = ("worst_hospital_val_acc_multiclass",)
DEFAULT_TABLE_METRICS = (
    "acc_multiclass",
    "acc_binary",
    "auc_binary",
    "sensitivity",
    "specificity",
    "ece",
)


def _plain(obj: Any) -> Any:
    """numpy scalars/arrays -> Python values, so any record can go to JSON."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    return obj


def make_record(
    method: str, center: str, seed: int, shots: int | None, metrics: dict, **extra: Any
) -> dict:
    """One results.json row; ``metrics`` is typically :func:`compute_metrics` output.

    Every metric key must be present (``None`` allowed); other keys of ``metrics`` (e.g.
    ``confusion``, ``n``) and ``extra`` are kept.
    """
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise SavltError(f"metrics for {method}/{center} lack keys: {', '.join(missing)}")
    clash = sorted(set(RECORD_KEYS) & set(metrics))
    if clash:
        raise SavltError(f"metrics keys clash with record keys: {', '.join(clash)}")
    overlap = sorted(set(metrics) & set(extra))
    if overlap:
        raise SavltError(f"extra keys repeat metric keys: {', '.join(overlap)}")
    record = {"method": str(method), "center": str(center), "seed": int(seed)}
    record["shots"] = None if shots is None else int(shots)
    record.update(_plain(metrics))
    record.update(_plain(extra))
    # adapted on the scored centre's own scans: never to be read as an inductive result
    record["transductive"] = record.get("calibration") == TRANSDUCTIVE
    return record


def _check_record(rec: Any, where: str) -> None:
    if not isinstance(rec, dict):
        raise SavltError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    missing = [k for k in (*RECORD_KEYS, *METRIC_KEYS) if k not in rec]
    if missing:
        raise SavltError(f"{where}: record lacks keys: {', '.join(missing)}")
    for k in METRIC_KEYS:
        v = rec[k]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise SavltError(f"{where}: metric {k} must be a number or null, got {v!r}")


def summarize(records: Iterable[dict]) -> list[dict]:
    """Mean and std over seeds per (method, center, shots), in first-seen order.

    ``shots`` is part of the group so that K=16 and K=32 runs are never averaged together.
    The std is the population std (ddof=0, i.e. 0 for one seed), the spread of the seeds
    actually run rather than an estimate for unseen ones. ``None`` metric values are
    skipped; ``<key>_n`` counts the values used and mean/std are ``None`` when it is 0.
    A repeated (method, center, shots, seed) raises: it would count one seed twice.
    """
    groups: dict[tuple[str, str, Any], list[dict]] = {}
    for i, rec in enumerate(records):
        _check_record(rec, f"record {i}")
        groups.setdefault((rec["method"], rec["center"], rec["shots"]), []).append(rec)

    rows = []
    for (method, center, shots), recs in groups.items():
        seeds = [r["seed"] for r in recs]
        if len(set(seeds)) != len(seeds):
            raise SavltError(f"{method}/{center}/shots={shots}: a seed appears twice in {seeds}")
        row: dict[str, Any] = {
            "method": method,
            "center": center,
            "shots": shots,
            "n_seeds": len(recs),
            "seeds": seeds,
            "transductive": any(r.get("transductive", False) for r in recs),
        }
        for k in (*METRIC_KEYS, *CALIBRATION_KEYS, *REFERRAL_KEYS, *HOSPITAL_KEYS):
            vals = np.array([r[k] for r in recs if r.get(k) is not None], dtype=np.float64)
            row[f"{k}_mean"] = round(float(vals.mean()), 4) if vals.size else None
            row[f"{k}_std"] = round(float(vals.std(ddof=0)), 4) if vals.size else None
            row[f"{k}_n"] = int(vals.size)
        rows.append(row)
    return rows


def _cell(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None else f"{mean:.2f} ± {std:.2f}"


def format_table(
    records: Iterable[dict],
    metrics: Sequence[str] = DEFAULT_TABLE_METRICS,
    title: str | None = None,
    synthetic: bool = False,
) -> str:
    """Console table of mean ± std (percent) over seeds, one row per (method, center, K)."""
    known = (*METRIC_KEYS, *CALIBRATION_KEYS)
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise SavltError(f"unknown metric(s) {', '.join(unknown)}; choose from {known}")
    rows = summarize(records)
    header = ["method", "center", "K", "seeds", *metrics]
    body = [
        [
            str(r["method"]),
            str(r["center"]),
            "-" if r["shots"] is None else str(r["shots"]),
            str(r["n_seeds"]),
            *(_cell(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(left + right).rstrip()

    lines = []
    title_line = " — ".join(t for t in (title, SYNTHETIC_LABEL if synthetic else None) if t)
    if title_line:
        lines.append(title_line)
    lines.append(fmt(header))
    lines.append("-" * len(lines[-1]))
    lines.extend(fmt(b) for b in body)
    if not body:
        lines.append("(no records)")
    return "\n".join(lines)


def _dump_check(obj: Any, path: str | Path) -> Any:
    obj = _plain(obj)
    try:
        json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SavltError(f"cannot write {path}: {exc} (use None for undefined metrics)") from exc
    return obj


def write_results(path: str | Path, records: Sequence[dict]) -> None:
    """Write results.json (a JSON list of records) atomically; NaN/inf are refused."""
    records = list(records)
    for i, rec in enumerate(records):
        _check_record(rec, f"record {i}")
    write_json(path, _dump_check(records, path))


def write_summary(path: str | Path, records: Sequence[dict], meta: dict) -> None:
    """Write summary.json: ``{"meta": meta, "summary": summarize(records)}``, atomically."""
    write_json(path, _dump_check({"meta": meta, "summary": summarize(records)}, path))


def read_results(path: str | Path) -> list[dict]:
    """Load and check a results.json written by :func:`write_results` (by this version or
    an earlier one: legacy metric names are renamed, see ``LEGACY_METRIC_KEYS``)."""
    path = Path(path)
    if not path.is_file():
        raise SavltError(f"results file {path} not found; run an experiment first")
    try:
        data = json.loads(
            path.read_text(encoding="utf-8"),
            parse_constant=lambda c: _raise_constant(c, path),
        )
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SavltError(f"results file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise SavltError(f"results file {path} must hold a JSON list of records")
    data = [upgrade_keys(rec) if isinstance(rec, dict) else rec for rec in data]
    for i, rec in enumerate(data):
        _check_record(rec, f"{path} record {i}")
    return data


def _raise_constant(name: str, path: Path) -> NoReturn:
    """json calls this only for NaN/Infinity/-Infinity, which a record must never hold."""
    raise SavltError(f"results file {path} contains {name}; metrics must be numbers or null")
