"""``savlt site-check DIR``: is an exported model safe on a new scanner's scans?

Why: a site must decide before use whether the model reads its scanner, and the only
honest answer from unlabelled scans is a guarded one. On DIR's unlabelled scans it reports
the shift score, the label-free guard's adaptation and why (:mod:`savlt_model.adaptation`),
the predicted-class distribution before and after, the expected referral rate and a
verdict: go, go with referral, or no-go (label N scans first). With a small labelled spot
check (``--labels``: a CSV ``file,class`` relative to DIR, or a folder of class folders)
it measures the accepted scans' sensitivity and specificity with Wilson score 95 %
intervals for every candidate the guard did not refuse, and chooses by them.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from savlt_model.adaptation import MAX_ADAPT_SHIFT, GuardChoice, candidate_probs
from savlt_model.atomic import write_json
from savlt_model.data.folders import SCAN_SUFFIXES, Listed, Sample, expand_files
from savlt_model.errors import SavltError
from savlt_model.evaluation import predict
from savlt_model.referral import accepted_counts
from savlt_model.tent import applied, tent_state
from tools.inference import (
    BATCH,
    SKIP_HINT,
    calibration_of,
    image_set,
    load_model,
    site_guard,
    unlabelled_scans,
)

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
# The targets for the accepted scans (issue #24), in %.
TARGET_SENSITIVITY = 85.0
TARGET_SPECIFICITY = 75.0
# A spot check's intervals are wide; to decide, label enough scans that a Wilson interval
# at p = 0.5 is at most +-15 points for each of the two binary classes.
DECISION_HALF_WIDTH = 0.15
EXTRA_REFERRAL = 0.10  # referral above the in-distribution share by this much: "with referral"


def _pct(value: float | None) -> str:
    """A spot-check percentage, or n/a where no accepted scan had that truth."""
    return "n/a" if value is None else f"{value:.0f} %"


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (0 <= k <= n, n > 0)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def scans_to_label() -> int:
    """Labelled scans needed for a decision: both binary classes at the decision width."""
    return 2 * math.ceil(Z95 * Z95 * 0.25 / DECISION_HALF_WIDTH**2)


def measured(
    probs: np.ndarray, labels: np.ndarray, positive: list[int], refer_below: float
) -> dict:
    """The accepted spot-check scans' sensitivity and specificity (%), each with its count
    and Wilson 95 % interval (None where a binary class has no accepted scan)."""
    keep, counts = accepted_counts(probs, labels, positive, refer_below)
    out: dict = {"accepted": int(keep.sum()), "labelled": len(labels)}
    for name, (k, n) in counts.items():
        lo_hi = [100 * v for v in wilson(k, n)] if n else None
        out[name] = {"k": k, "n": n, "value": 100 * k / n if n else None, "wilson95": lo_hi}
    return out


def spot_check_samples(folder: Path, labels: Path, classes: list[str]) -> list[Sample]:
    """The labelled scans: a CSV ``file,class`` (files relative to ``folder``) or a folder
    of class folders ``labels/<class>/...``."""
    labels = Path(labels)
    index = {c: i for i, c in enumerate(classes)}
    listed: list[Listed] = []
    if labels.is_dir():
        for cls in classes:
            for p in sorted((labels / cls).rglob("*")) if (labels / cls).is_dir() else []:
                if p.is_file() and p.suffix.lower() in SCAN_SUFFIXES:
                    listed.append(Listed(p, index[cls], f"{cls}/{p.relative_to(labels / cls)}"))
    elif labels.is_file():
        with labels.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if set(row) < {"file", "class"}:
                    raise SavltError(f"--labels {labels}: needs the columns file,class")
                if row["class"] not in index:
                    raise SavltError(
                        f"--labels {labels}: class {row['class']!r} is not one of the model's "
                        f"({', '.join(classes)})"
                    )
                path = Path(row["file"])
                listed.append(Listed(path if path.is_absolute() else Path(folder) / path,
                                     index[row["class"]], row["file"]))  # fmt: skip
    else:
        raise SavltError(f"--labels {labels} is neither a CSV file nor a folder of class folders")
    if not listed:
        raise SavltError(f"--labels {labels} lists no scans of the classes {', '.join(classes)}")
    return expand_files(listed, str(labels), "stop", skip_hint=SKIP_HINT)


def _verdict(
    picked: GuardChoice, coverage: float, shift_threshold: float, spot: dict | None
) -> tuple[str, str]:
    """(verdict, why) from the guard's pick and, when given, the spot check."""
    chosen = picked.candidates[picked.choice]
    referral_ok = picked.referral_rate <= (1 - coverage) + EXTRA_REFERRAL
    need = scans_to_label()
    if spot is None:
        beyond = picked.shift > MAX_ADAPT_SHIFT * shift_threshold
        if chosen.collapsed or beyond:
            return f"no-go: label {need} scans first", picked.reason
        if not referral_ok or (picked.choice == "none" and picked.shift > shift_threshold):
            return "go with referral", f"{picked.referral_rate:.0%} of scans referred"
        return "go", picked.reason
    sens, spec = spot["sensitivity"]["value"], spot["specificity"]["value"]
    if sens is None or spec is None or sens < TARGET_SENSITIVITY or spec < TARGET_SPECIFICITY:
        have = spot["labelled"]
        return (
            f"no-go: label {max(need - have, 0)} more scans first",
            f"spot check below target (sensitivity {_pct(sens)}, specificity {_pct(spec)}; "
            f"targets {TARGET_SENSITIVITY:.0f} / {TARGET_SPECIFICITY:.0f})",
        )
    if not referral_ok:
        return (
            "go with referral",
            f"targets met on the spot check, {picked.referral_rate:.0%} referred",
        )
    return "go", "targets met on the spot check"


def site_check(
    model_dir: Path, folder: Path, labels: Path | None = None, on_bad_file: str = "stop"
) -> dict:
    """The site check of ``folder`` (see the module docstring), as a JSON-ready dict."""
    model, info = load_model(model_dir)
    samples = unlabelled_scans(folder, on_bad_file)
    feats = predict(model, image_set(info, samples), BATCH)[2]
    picked = site_guard(model, info, samples, feats)
    if picked is None:
        raise SavltError(
            f"{model_dir} was exported without a calibration; re-export it from its run"
        )
    coverage = float(info["config"]["calibration"].get("referral_coverage", 0.8))
    positive = list(model.positive)
    report: dict = {
        "model": str(model_dir),
        "folder": str(folder),
        "scans": len(samples),
        "shift_score": picked.shift,
        "shift_threshold": float(info["config"]["calibration"]["shift_threshold"]),
        "candidates": {
            name: {
                "class_shares": dict(zip(model.classes, c.shares.tolist(), strict=True)),
                "expected_auc_cost": c.auc_cost,
                "call_cost": c.call_cost,
                "instability": c.instability,
                "refused": c.refused,
            }
            for name, c in picked.candidates.items()
        },
        "before": dict(zip(model.classes, picked.candidates["none"].shares.tolist(), strict=True)),
    }
    spot = None
    if labels is not None:
        lab = spot_check_samples(folder, labels, model.classes)
        _, y, f = predict(model, image_set(info, lab), BATCH)
        w = model.classifier().cpu().numpy()
        inductive = calibration_of(info)
        assert inductive is not None  # site_guard needs it
        probs = candidate_probs(f, w, inductive, calibration_of(info, "centre_calibration"), feats)
        allowed = [n for n, c in picked.candidates.items() if n == "none" or not c.refused]
        if "tent" in allowed:  # adapted on the site's unlabelled scans, as the guard saw it
            with applied(model, tent_state(model, image_set(info, samples), inductive)):
                probs["tent"] = inductive.probs(predict(model, image_set(info, lab), BATCH)[2], w)
        checks = {n: measured(probs[n], y, positive, picked.refer_below) for n in allowed}

        def lower(n: str) -> float:
            return sum(
                (checks[n][k]["wilson95"] or [0.0])[0] for k in ("sensitivity", "specificity")
            )

        best = max(allowed, key=lower)  # highest summed lower bounds; ties keep the guard's
        if lower(picked.choice) >= lower(best):
            best = picked.choice
        if best != picked.choice:
            reason = f"spot check: higher Wilson lower bounds than {picked.choice!r}"
            picked = GuardChoice(best, reason, picked.shift, picked.refer_below, picked.candidates)
        spot = checks[picked.choice]
        report["spot_check"] = {"interval": "Wilson score, 95 %", "candidates": checks}
    verdict, why = _verdict(picked, coverage, report["shift_threshold"], spot)
    report.update(
        {
            "adaptation": picked.choice,
            "why": picked.reason,
            "after": dict(
                zip(model.classes, picked.candidates[picked.choice].shares.tolist(), strict=True)
            ),
            "refer_below": picked.refer_below,
            "expected_referral_rate": picked.referral_rate,
            "verdict": verdict,
            "verdict_why": why,
        }
    )
    return report


def write_site_check(report: dict, out: Path) -> Path:
    """Write the report as JSON; returns the path."""
    write_json(Path(out), report)
    return Path(out)


def format_site_check(report: dict) -> str:
    """The report as the console shows it."""

    def dist(d: dict) -> str:
        return ", ".join(f"{k} {v:.0%}" for k, v in d.items())

    lines = [
        f"site check of {report['folder']} ({report['scans']} scans)",
        f"shift score: {report['shift_score']:.2f} (warning above {report['shift_threshold']:.2f})",
        f"adaptation: {report['adaptation']} ({report['why']})",
    ]
    for name, c in report["candidates"].items():
        state = "; ".join(c["refused"]) or "acceptable"
        moved = c.get("instability")
        moved = "" if moved is None else f", {moved:.0%} change class under randomisation"
        cost = 100 * c["expected_auc_cost"]
        lines.append(f"  {name}: expected AUC cost {cost:.1f} points{moved}, {state}")
    lines += [
        f"predicted before: {dist(report['before'])}",
        f"predicted after:  {dist(report['after'])}",
        f"expected referral rate: {report['expected_referral_rate']:.0%} "
        f"(confidence below {report['refer_below']:.2f})",
    ]
    for name, m in report.get("spot_check", {}).get("candidates", {}).items():
        cells = []
        for key in ("sensitivity", "specificity"):
            v = m[key]
            cells.append(
                f"{key} n/a" if v["value"] is None
                else f"{key} {v['value']:.0f} % ({v['k']}/{v['n']}, Wilson 95 % "
                f"{v['wilson95'][0]:.0f}-{v['wilson95'][1]:.0f})"
            )  # fmt: skip
        lines.append(
            f"  spot check, {name}: {m['accepted']}/{m['labelled']} accepted; " + "; ".join(cells)
        )
    lines.append(f"verdict: {report['verdict']} ({report['verdict_why']})")
    return "\n".join(lines)
