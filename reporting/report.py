"""``RUN_DIR/report.md``: one Markdown page that says what a run found.

Built only from what the run wrote (results.json, summary.json, config.yaml, curves.json,
jobs/*.json, figures/*.png), so it can be regenerated at any time with ``savlt report``.
Image links are relative to the run directory, so the folder can be moved or zipped whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from reporting.plots import plot_round_curves
from reporting.results import (
    CALIBRATION_KEYS,
    REFERRAL_KEYS,
    SYNTHETIC_LABEL,
    read_results,
    summarize,
)
from savlt_model.atomic import write_text
from savlt_model.config import resolve_path
from savlt_model.data.protocol import is_synthetic
from savlt_model.errors import SavltError
from savlt_model.metrics import METRIC_KEYS, upgrade_keys
from server.accounting import epsilon_text


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SavltError(f"cannot read {path}: {exc}") from exc


def _meta(run_dir: Path) -> dict:
    """Title and synthetic flag: from summary.json, else from the run's config."""
    summary = run_dir / "summary.json"
    meta = _read_json(summary).get("meta", {}) if summary.is_file() else {}
    if "synthetic" not in meta:
        config = run_dir / "config.yaml"
        root = (
            (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data", {}).get("root")
            if config.is_file()
            else None
        )
        meta["synthetic"] = bool(root) and is_synthetic(resolve_path(root))
    return meta


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _mean_std(row: dict, key: str) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    return "n/a" if mean is None else f"{mean:.2f} ± {std:.2f}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _jobs(run_dir: Path) -> list[dict]:
    return [_read_json(p) for p in sorted((run_dir / "jobs").glob("*.json"))]


def _figure(path: Path, run_dir: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(run_dir).as_posix()})"


def _round_section(run_dir: Path, jobs: list[dict], synthetic: bool) -> list[str]:
    """Accuracy and loss per round (redrawn from the jobs), bytes per round and events."""
    federated = [j for j in jobs if j.get("history")]
    if not federated:
        return ["## Rounds", "", "No federated rounds in this run.", ""]
    figures = run_dir / "figures"
    out = ["## Rounds", ""]
    curves_file = run_dir / "curves.json"
    curves = [
        upgrade_keys(c)
        for c in (
            _read_json(curves_file)
            if curves_file.is_file()
            else [c for j in jobs for c in j.get("curves", [])]
        )
    ]
    if any(c.get("acc_multiclass") is not None for c in curves):
        acc = plot_round_curves(
            curves,
            figures / "accuracy_per_round.png",
            "Global model accuracy per round",
            synthetic=synthetic,
        )
        out += [_figure(acc, run_dir, "multi-class accuracy per round"), ""]
    losses = [
        {"method": j["method"], "center": "hospitals", "round": r["round"], "train_loss": loss}
        for j in federated
        for r in j["history"]
        if (loss := r.get("train-loss")) is not None
    ]
    if losses:
        loss_png = plot_round_curves(
            losses,
            figures / "loss_per_round.png",
            "Mean hospital training loss per round",
            metric="train_loss",
            synthetic=synthetic,
        )
        out += [_figure(loss_png, run_dir, "training loss per round"), ""]
    out += ["### Traffic per round (largest single hospital message)", ""]
    out += [
        "A hospital that keeps state downloads only the round's change (a delta); the others",
        "download the whole state.",
        "",
    ]
    out += _table(
        ["method", "seed", "round", "hospitals", "train loss", "upload", "download", "deltas"],
        [
            [
                j["method"],
                j["seed"],
                r["round"],
                r.get("hospitals", "-"),
                "-" if r.get("train-loss") is None else f"{r['train-loss']:.4f}",
                _bytes(r.get("upload-bytes", 0)),
                _bytes(r.get("download-bytes", 0)),
                r.get("downlink-deltas", "-"),
            ]
            for j in federated
            for r in j["history"]
        ],
    )
    events = [(j, e) for j in federated for e in j.get("events", [])]
    out += ["", "### Events (failed or rejected hospitals, skipped rounds)", ""]
    if events:
        out += _table(
            ["method", "seed", "round", "hospital", "event", "reason"],
            [
                [j["method"], j["seed"], e["round"], e["node"], e["event"], e["reason"]]
                for j, e in events
            ],
        )
    else:
        out.append("None: every hospital answered every round.")
    return [*out, ""]


BUDGET_COLUMNS = ("budget", "local_steps", "rounds", "steps_per_hospital", "total_steps")


def _budget_section(records: list[dict]) -> list[str]:
    """What each method trained (savlt_model/budget.py), so a gap is read against its budget.

    Records written before budgets were recorded have none: the section is left out."""
    rows: dict[str, list] = {}
    for r in records:
        if "budget" in r and not r["method"].endswith("+cal"):
            rows.setdefault(r["method"], [r.get(k) for k in (*BUDGET_COLUMNS, "examples_seen")])
    if not rows:
        return []
    header = ["method", *BUDGET_COLUMNS, "examples seen"]
    table = [[m, *("-" if v is None else v for v in values)] for m, values in rows.items()]
    return [
        "## Budget",
        "",
        "Steps per hospital: what one hospital (or central's one trainer) trains over the run; "
        "total: over all hospitals.",
        "",
        *_table(header, table),
        "",
    ]


def _privacy_section(jobs: list[dict]) -> list[str]:
    """The (epsilon, delta) each central-DP job spent (server.accounting); none without DP."""
    spent = [(j, p) for j in jobs if (p := j.get("privacy"))]
    if not spent:
        return []
    out = ["## Differential privacy", "", f"Accountant: {spent[0][1]['accountant']}.", ""]
    out += _table(
        ["method", "seed", "mode", "noise multiplier", "rounds", "epsilon", "delta"],
        [
            [
                j["method"],
                j["seed"],
                p["mode"],
                f"{p['noise_multiplier']:g}",
                p["rounds"],
                epsilon_text(p),
                f"{p['delta']:g}",
            ]
            for j, p in spent
        ],
    )
    return [*out, ""]


def _referral_section(records: list[dict]) -> list[str]:
    """Per method and centre: the share referred and the accepted scans' sensitivity and
    specificity (records of a model with a referral threshold only)."""
    rows = [r for r in summarize(records) if r["referral_rate_n"]]
    if not rows:
        return []
    keys = REFERRAL_KEYS
    return [
        "## Referral (selective prediction)",
        "",
        "Scans whose top calibrated probability is below the threshold set for "
        "`calibration.referral_coverage` of the training hospitals' validation scans are "
        "referred to a human reader; sensitivity and specificity count the accepted scans only.",
        "",
        *_table(
            ["method", "center", "seeds", *keys],
            [
                [r["method"], r["center"], r["n_seeds"], *(_mean_std(r, k) for k in keys)]
                for r in rows
            ],
        ),
        "",
    ]


def _hospital_section(run_dir: Path, records: list[dict], jobs: list[dict]) -> list[str]:
    """The worst training hospital's accuracy on its own validation set, per method; with a
    hospital that labels differently (``fl.bad_hospital``), what it did and, per round, the
    weight the aggregation gave it (per class for the prototype rows)."""
    worst: dict[str, dict[int, tuple[str, float]]] = {}
    for r in records:
        if r.get("worst_hospital") is not None:
            worst.setdefault(r["method"], {})[r["seed"]] = (
                r["worst_hospital"],
                r["worst_hospital_val_acc_multiclass"],
            )
    if not worst:
        return []
    out = [
        "## Hospitals",
        "",
        "Each training hospital's own validation set, scored with its own labels (a hospital "
        "that labels differently is scored on its labels): the worst one, which the pooled "
        "test centres can average away. Local: each hospital's own model.",
        "",
    ]
    out += _table(
        ["method", "seeds", "worst hospital's val accuracy", "worst hospital"],
        [
            [
                method,
                len(by_seed),
                f"{np.mean([a for _, a in by_seed.values()]):.2f} ± "
                f"{np.std([a for _, a in by_seed.values()]):.2f}",
                ", ".join(sorted({h for h, _ in by_seed.values()})),
            ]
            for method, by_seed in worst.items()
        ],
    )
    bad = next((r["bad_hospital"] for r in records if r.get("bad_hospital")), None)
    if bad is None:
        return [*out, ""]
    what = f"pair {' / '.join(bad['pair'])}" if bad["kind"] == "swap" else f"share {bad['share']}"
    out += [
        "",
        f"Hospital {bad['hospital']} ({bad['name']}) labels differently: `{bad['kind']}`, "
        f"{what}; {bad['changed']['train']} of {bad['of']['train']} train and "
        f"{bad['changed']['val']} of {bad['of']['val']} val labels changed (seed {bad['seed']}).",
        "",
    ]
    config = run_dir / "config.yaml"
    classes = (
        (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("task", {}).get("classes")
        if config.is_file()
        else None
    )
    rows = []
    for j in jobs:
        for e in j.get("bad_hospital_rounds") or []:
            if e["index"] is None:
                rows.append([j["method"], j["seed"], e["round"], "not identified", "-"])
                continue
            names = classes or [str(c) for c in range(len(e["prototype_weights"]))]
            per_class = ", ".join(
                f"{n} {w:.3f} ({s:.3f})"
                for n, w, s in zip(names, e["prototype_weights"], e["class_share"], strict=True)
            )
            rows.append(
                [
                    j["method"],
                    j["seed"],
                    e["round"],
                    f"{e['weight']:.3f} ({e['fedavg_weight']:.3f})",
                    per_class,
                ]
            )
    if rows:
        out += [
            "Its aggregation weight per round, in brackets what its data size alone gives "
            "(FedAvg's n_k / n; per class n_kc / sum n_kc). Found by the class counts it "
            'reported; "not identified" where another hospital reported the same counts.',
            "",
        ]
        out += _table(["method", "seed", "round", "shared weight", "prototype rows by class"], rows)
    return [*out, ""]


def write_report(run_dir: Path) -> Path:
    """Write ``RUN_DIR/report.md`` for a ``train``, ``simulate`` or ``evaluate`` directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SavltError(f"run directory {run_dir} does not exist")
    records = read_results(run_dir / "results.json")
    meta = _meta(run_dir)
    synthetic = bool(meta.get("synthetic"))
    title = meta.get("title") or f"SAVLT run {run_dir.name}"
    lines = [f"# {title}" + (f" — {SYNTHETIC_LABEL}" if synthetic else ""), ""]
    if synthetic:
        lines += [
            f"> **{SYNTHETIC_LABEL}.** These numbers come from generated images and say "
            "nothing about clinical accuracy.",
            "",
        ]
    lines += [
        "## Results",
        "",
        "Mean ± std over seeds, in percent (ECE and Brier x 100; the shift score is the "
        "distance of a centre's mean feature from the training hospitals' reference, in "
        "units of the reference spread: 0 in distribution). Methods ending in `+cal` are "
        "**label-free, transductive**: each centre is re-centred on its own unlabelled "
        "scans, with the temperature and class bias fitted on validation data.",
        "",
    ]
    keys = (*METRIC_KEYS, *CALIBRATION_KEYS)
    lines += _table(
        ["method", "center", "K", "seeds", *keys],
        [
            [
                r["method"] + (" (transductive)" if r.get("transductive") else ""),
                r["center"],
                "-" if r["shots"] is None else r["shots"],
                r["n_seeds"],
                *(_mean_std(r, k) for k in keys),
            ]
            for r in summarize(records)
        ],
    )
    lines.append("")
    lines += _budget_section(records)
    lines += _referral_section(records)
    jobs = _jobs(run_dir)
    lines += _hospital_section(run_dir, records, jobs)
    lines += _round_section(run_dir, jobs, synthetic)
    lines += _privacy_section(jobs)
    figures = run_dir / "figures"
    for heading, pattern in (
        ("Confusion matrices", "confusion_*.png"),
        ("ROC curves (high-risk score)", "roc_*.png"),
        ("Reliability diagrams", "reliability_*.png"),
        ("Risk-coverage curves (referral)", "risk_coverage_*.png"),
        ("Methods compared", "methods_*.png"),
    ):
        pngs = sorted(figures.glob(pattern))
        if pngs:
            lines += [f"## {heading}", ""]
            lines += [f"{_figure(p, run_dir, p.stem)}\n" for p in pngs]
    return write_text(run_dir / "report.md", "\n".join(lines).rstrip() + "\n")
