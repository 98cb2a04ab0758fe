"""Hard partitions measured: FedAvg vs text-anchored weighting where a hospital labels differently.

Issue #28's study on the synthetic data (SYNTHETIC, not clinical performance). Each cell is
one ``savlt simulate`` of a config of configs/ per seed (FedAvg and text-anchored with
per-class evidence in one process), written under ``runs/hard-study/<cell>-s<seed>``; a
finished cell is skipped, so the study resumes. Every cell starts the prototypes from the
text anchors (``model.prototype_init: anchors``) except ``clean-orthogonal``, so FedAvg and
text-anchored differ only in the aggregation.

    python benchmarks/hard_study.py run                  # every cell, every seed
    python benchmarks/hard_study.py run --cell swap --seed 42 --quick
    python benchmarks/hard_study.py table                # markdown tables

``--quick`` trains at the same-total budget (11 local steps per round instead of 32), for a
check of the mechanism on 2 cores; the comparisons of docs/federation.md are at the configs'
own budget. ``table`` reads every finished run: accuracy per centre and the worst
hospital's own validation accuracy; and, per round, what the aggregation gave the hospital
that labels differently (its shared weight and its prototype-row weights per class, each
next to what its data size alone gives) and how its class evidence compared with the other
hospitals' (cos of its class mean to T_c minus the other hospitals' mean); and the share of
FedAvg's loss against ``clean`` that each method closes on ``swap`` / ``noise`` cells. The
full-budget accuracies go to benchmarks/results/hard_study.json.

``swap-drift`` and ``noise-drift`` add SCAFFOLD and FedAdam to FedAvg and text-anchored;
``centers-every`` and ``dirichlet-0.1-every`` run every method of configs/full.yaml (central
and local included), and ``table`` adds their held-out centres: the scanner styles no
hospital has and, for ``centers-every``, each centre left out (``centers-every-in`` skips
those refits).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from common import BEFORE_EQUALISE

from savlt_model.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "hard-study"
RESULTS = ROOT / "benchmarks" / "results" / "hard_study.json"
SEEDS = (5, 42, 123)
HSIL_MILD = "[high-grade_squamous_intraepithelial_lesion, mild_inflammation]"
COMMON = (
    *BEFORE_EQUALISE,
    "fl.eval_every=0",  # scored after the last round only: the study needs no curves
    "fl.rounds=5",  # its tables were measured at 5 x 32 (the default then; now 2 x 80)
    "tracking.tensorboard=false",
    "fl.methods=[fedavg, text-anchored]",
    "methods.text_anchored.evidence=class-means",
    "model.prototype_init=anchors",
)
# cell -> (config file, overrides on top of COMMON)
DRIFT = "fl.methods=[fedavg, scaffold, fedadam, text-anchored]"  # issue #28's swap target
FULL_METHODS = yaml.safe_load((ROOT / "configs/full.yaml").read_text())["fl"]["methods"]
EVERY = f"fl.methods=[{', '.join(FULL_METHODS)}]"  # every registered method
CELLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "clean": ("configs/default.yaml", ()),
    "clean-orthogonal": ("configs/default.yaml", ("model.prototype_init=orthogonal",)),
    "swap": ("configs/swap.yaml", ()),
    "swap-drift": ("configs/swap.yaml", (DRIFT,)),
    "swap-prototypes": ("configs/swap.yaml", ("methods.text_anchored.evidence=prototypes",)),
    "swap-hsil-mild-h2": (
        "configs/swap.yaml",
        (f"fl.bad_hospital.pair={HSIL_MILD}", "fl.bad_hospital.hospital=2"),
    ),
    "noise": ("configs/noise.yaml", ()),
    "noise-drift": ("configs/noise.yaml", (DRIFT,)),
    "dirichlet-0.1": ("configs/dirichlet-0.1.yaml", ()),
    "dirichlet-0.5": ("configs/dirichlet-0.5.yaml", ()),
    "centers-every": ("configs/centers.yaml", (EVERY,)),
    # the same federation without the three leave-one-out refits (a quarter of the time);
    # its held-out rows are the scanner styles no hospital has
    "centers-every-in": ("configs/centers.yaml", (EVERY, "fl.leave_one_out=false")),
    "dirichlet-0.1-every": ("configs/dirichlet-0.1.yaml", (EVERY,)),
}
QUICK = ("fl.budget=same-total",)
CENTRES = ("mixed", "xiangya", "huaxi", "scanner_hr", "scanner_lc")
HELD_OUT = tuple(f"{c} (held out)" for c in CENTRES[:3])  # centers' leave-one-out records


def run(cells: list[str], seeds: list[int], quick: bool) -> None:
    for cell in cells:
        config, extra = CELLS[cell]
        for seed in seeds:
            out = OUT / f"{cell}{'-quick' if quick else ''}-s{seed}"
            if (out / "results.json").exists():
                print(f"{out.name}: done, skipped", flush=True)
                continue
            sets = [*COMMON, *extra, *(QUICK if quick else ()), f"seeds=[{seed}]"]
            cmd = [sys.executable, "-m", "tools.cli", "simulate", "--config", config]
            cmd += [a for s in sets for a in ("--set", s)] + ["--out", str(out)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)


def _classes(run_dir: Path) -> list[str]:
    from savlt_model.config import load_config

    return load_config(run_dir / "config.yaml").task.classes


def _accuracy_rows(run_dir: Path, centres: tuple[str, ...] = CENTRES) -> list[str]:
    records = json.loads((run_dir / "results.json").read_text())
    rows = []
    for method in sorted({r["method"] for r in records if r["method"].endswith("+cal")}):
        mine = {r["center"]: r for r in records if r["method"] == method}
        cells = [f"{mine[c]['acc_multiclass']:.1f}" if c in mine else "–" for c in centres]
        first = next(iter(mine.values()))
        worst = first.get("worst_hospital_val_acc_multiclass")
        worst_cell = "–" if worst is None else f"{worst:.1f} ({first['worst_hospital']})"
        rows.append(f"| {run_dir.name} | {method} | " + " | ".join(cells) + f" | {worst_cell} |")
    return rows


def _evidence_gap(row: dict, j: int) -> list[float | None]:
    """Per class: the bad hospital's cos(class mean, T_c) minus the others' mean."""
    agreement = np.array(
        [[np.nan if a is None else a for a in h] for h in row["class-agreement"]], dtype=float
    )
    others = np.nanmean(np.delete(agreement, j, axis=0), axis=0)
    gap = agreement[j] - others
    return [None if np.isnan(g) else float(g) for g in gap]


def _weight_rows(run_dir: Path) -> list[str]:
    rows = []
    classes = _classes(run_dir)
    for path in sorted((run_dir / "jobs").glob("text-anchored_seed*.json")):
        job = json.loads(path.read_text())
        for row, entry in zip(job["history"], job.get("bad_hospital_rounds") or [], strict=False):
            if entry["index"] is None:
                rows.append(f"| {run_dir.name} | {entry['round']} | not identified | | |")
                continue
            gap = _evidence_gap(row, entry["index"])
            per_class = ", ".join(
                f"{c[:6]} {w:.2f}/{s:.2f}"
                for c, w, s in zip(
                    classes, entry["prototype_weights"], entry["class_share"], strict=True
                )
            )
            gaps = ", ".join("–" if g is None else f"{g:+.3f}" for g in gap)
            rows.append(
                f"| {run_dir.name} | {entry['round']} | {entry['weight']:.3f}/"
                f"{entry['fedavg_weight']:.3f} | {per_class} | {gaps} |"
            )
    return rows


def _spread_rows(run_dir: Path) -> list[str]:
    """Without a bad hospital: how far the per-class weights move from the class shares."""
    rows = []
    for path in sorted((run_dir / "jobs").glob("text-anchored_seed*.json")):
        job = json.loads(path.read_text())
        for row in job["history"]:
            counts = np.array(row["class-counts"], dtype=float)
            total = counts.sum(axis=0)
            share = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
            proto = np.array(row["prototype-weights"])
            held = counts > 0
            ratio = proto[held] / share[held]
            shift = 0.5 * np.abs(np.array(row["weights"]) - np.array(row["fedavg-weights"])).sum()
            rows.append(
                f"| {run_dir.name} | {row['round']} | {shift:.4f} | {ratio.min():.3f} | "
                f"{np.median(ratio):.3f} | {ratio.max():.3f} |"
            )
    return rows


def _recorded() -> dict:
    """What results/hard_study.json already holds (runs/ is not committed): kept unless the
    same cell and seed ran here again."""
    if not RESULTS.exists():
        return {}
    saved = json.loads(RESULTS.read_text())
    return {
        cell: {
            method: {c: {int(k): v for k, v in seeds.items()} for c, seeds in per.items()}
            for method, per in methods.items()
        }
        for cell, methods in saved.items()
    }


def _scores(runs: list[Path]) -> dict[str, dict[str, dict[str, dict[int, float]]]]:
    """{cell: {method: {centre: {seed: calibrated 5-class accuracy}}}} of the full-budget
    runs over those recorded before, plus each method's worst hospital (its own val
    accuracy) as centre "worst"."""
    out: dict = _recorded()
    for run_dir in runs:
        cell, seed = run_dir.name.rsplit("-s", 1)
        for r in json.loads((run_dir / "results.json").read_text()):
            if not r["method"].endswith("+cal"):
                continue
            per = out.setdefault(cell, {}).setdefault(r["method"], {})
            per.setdefault(r["center"], {})[int(seed)] = r["acc_multiclass"]
            if r.get("worst_hospital_val_acc_multiclass") is not None:
                per.setdefault("worst", {})[int(seed)] = r["worst_hospital_val_acc_multiclass"]
    return out


def _closed_rows(scores: dict, bad: str) -> list[str]:
    """Issue #28's target: the share of FedAvg's loss (clean minus ``bad``) each method
    closes, (method - FedAvg) / (FedAvg clean - FedAvg bad), on the seeds all three share."""
    rows = []
    clean = scores.get("clean", {}).get("fedavg+cal", {})
    cells = [c for c in scores if c == bad or c.startswith(f"{bad}-drift")]
    for cell in cells:
        fed = scores[cell].get("fedavg+cal", {})
        for method in sorted(scores[cell]):
            cells_out = []
            for centre in ("xiangya", "huaxi"):
                seeds = sorted(
                    set(clean.get(centre, {}))
                    & set(fed.get(centre, {}))
                    & set(scores[cell][method].get(centre, {}))
                )
                if not seeds:
                    cells_out.append("–")
                    continue
                loss = np.mean([clean[centre][s] - fed[centre][s] for s in seeds])
                gain = np.mean([scores[cell][method][centre][s] - fed[centre][s] for s in seeds])
                share = f"{gain / loss:+.2f}" if loss > 0 else "FedAvg lost nothing"
                cells_out.append(f"loss {loss:.1f}, gain {gain:+.1f} ({share}) n={len(seeds)}")
            rows.append(f"| {cell} | {method} | " + " | ".join(cells_out) + " |")
    return rows


def table() -> str:
    runs = sorted(p for p in OUT.glob("*-s*") if (p / "results.json").exists())
    full = [p for p in runs if "-quick-" not in p.name]
    scores = _scores(full)
    write_text(RESULTS, json.dumps(scores, indent=1, sort_keys=True))  # atomic: the record
    lines = [
        "SYNTHETIC DATA — not clinical performance.",
        "",
        "5-class accuracy (%, default calibration) per centre; worst hospital: its own val set",
        "",
        "| run | method | " + " | ".join(CENTRES) + " | worst hospital |",
        "|---" * (len(CENTRES) + 3) + "|",
    ]
    for run_dir in runs:
        lines += _accuracy_rows(run_dir)
    every = [p for p in runs if "-every-" in p.name]
    if every:
        lines += [
            "",
            "Every method, with the held-out centres (centers: trained without that centre)",
            "",
            "| run | method | " + " | ".join(CENTRES + HELD_OUT) + " | worst hospital |",
            "|---" * (len(CENTRES + HELD_OUT) + 3) + "|",
        ]
        for run_dir in every:
            lines += _accuracy_rows(run_dir, CENTRES + HELD_OUT)
    lines += [
        "",
        "The bad hospital under text-anchored weighting, per round: shared weight / FedAvg's "
        "share; prototype rows per class: weight / class share; class evidence: its cos(class "
        "mean, T_c) minus the other hospitals' mean (– no evidence)",
        "",
        "| run | round | shared | prototype rows | class evidence gap |",
        "|---|---|---|---|---|",
    ]
    for run_dir in runs:
        lines += _weight_rows(run_dir)
    lines += [
        "",
        "Every hospital, text-anchored: weight-shift of the shared weights from FedAvg's, and "
        "prototype-row weight / class share over the (hospital, class) pairs held",
        "",
        "| run | round | weight-shift | min | median | max |",
        "|---|---|---|---|---|---|",
    ]
    for run_dir in runs:
        lines += _spread_rows(run_dir)
    for bad in ("swap", "noise"):
        lines += [
            "",
            f"What FedAvg loses on `{bad}` against `clean` (Xiangya, Huaxi; mean over the "
            "paired seeds) and the share each method closes (target: >= 0.5)",
            "",
            "| cell | method | xiangya | huaxi |",
            "|---|---|---|---|",
        ]
        lines += _closed_rows(scores, bad)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the grid's missing cells")
    run_p.add_argument("--cell", choices=sorted(CELLS), action="append")
    run_p.add_argument("--seed", type=int, action="append")
    run_p.add_argument("--quick", action="store_true", help="same-total budget: a quick check")
    sub.add_parser("table", help="print the tables from the finished runs")
    args = parser.parse_args()
    if args.command == "run":
        run(args.cell or list(CELLS), args.seed or list(SEEDS), args.quick)
    else:
        print(table())


if __name__ == "__main__":
    main()
