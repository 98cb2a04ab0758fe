"""Text anchoring measured: random vs language-bearing anchors, FedAvg vs text-anchored, lambda.

Issue #12's study on the synthetic data (SYNTHETIC, not clinical performance). Each cell of
the grid is one ``savlt simulate`` of the default config per seed, written under
``runs/anchor-study/<cell>-s<seed>``; a finished cell is skipped, so the study resumes.

    python benchmarks/anchor_study.py run                 # every cell, every seed
    python benchmarks/anchor_study.py run --cell paper-minilm --seed 42
    python benchmarks/anchor_study.py table               # markdown tables + anchor_study.json

``table`` reads every finished run: accuracy and AUC per centre (mean +- std over seeds),
text-anchored minus FedAvg paired by seed, and what the aggregation did (the round logs'
weight-shift: the total-variation distance of the method's weights from FedAvg's; the
server-computed agreement a_kc averaged over classes and hospitals, and its spread: the
largest minus the smallest hospital's mean, i.e. what exp(lambda * a) can tell apart; and
how far the final global prototypes moved from their seeded start).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "anchor-study"
SEEDS = (5, 42, 123)
CONFIG = "configs/default.yaml"
# scored after the last round only (the study needs no curves), at the budget and rounds its
# tables were measured under (before fl.budget existed)
COMMON = ("fl.eval_every=0", "fl.budget=same-total", "fl.rounds=5")

# cell -> overrides; "fedavg" and "text-anchored" (lambda 5) share a cell (one process)
CELLS: dict[str, tuple[str, ...]] = {
    f"{partition}-{tower}": (
        f"fl.partition={partition}",
        f"model.text_tower={tower}",
        "fl.methods=[fedavg,text-anchored]",
        "methods.text_anchored.anchor_lambda=5",
    )
    for partition in ("paper", "centers")
    for tower in ("backbone", "minilm")
}
CELLS |= {
    f"paper-minilm-lambda{lam:g}": (
        "fl.partition=paper",
        "model.text_tower=minilm",
        "fl.methods=[text-anchored]",
        f"methods.text_anchored.anchor_lambda={lam:g}",
    )
    for lam in (0, 1, 10)
}
# what would change the null: prototypes that learn (they barely leave their start at lr x 1)
CELLS["paper-minilm-protolr10"] = (*CELLS["paper-minilm"], "train.prototype_lr_scale=10")
METRICS = ("acc_multiclass", "auc_binary")


def run(cells: list[str], seeds: list[int]) -> None:
    for cell in cells:
        for seed in seeds:
            out = OUT / f"{cell}-s{seed}"
            if (out / "results.json").exists():
                print(f"{out.name}: done, skipped", flush=True)
                continue
            sets = [*COMMON, *CELLS[cell], f"seeds=[{seed}]"]
            cmd = [
                sys.executable,
                "-m",
                "tools.cli",
                "simulate",
                "--config",
                "configs/default.yaml",
            ]
            cmd += [a for s in sets for a in ("--set", s)] + ["--out", str(out)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)


def _label(cell: str, method: str) -> str:
    if "lambda" in cell:
        return f"text-anchored λ={cell.rsplit('lambda', 1)[1]}"
    label = "fedavg" if method == "fedavg" else "text-anchored λ=5"
    return label + (", prototype lr ×10" if cell.endswith("protolr10") else "")


def _prototype_drift(run_dir: Path, method: str, seed: int) -> float:
    """Mean over classes of cos(P_final, P_start): 1 = the prototypes never moved."""
    import torch.nn.functional as F

    from savlt_model.checkpoint import load_adapter
    from savlt_model.config import load_config
    from savlt_model.model.build import build_model

    start = build_model(load_config(run_dir / "config.yaml"), seed).prototypes.detach()
    final = load_adapter(run_dir / "adapters" / f"{method}_seed{seed}.safetensors")[0]
    cos = F.cosine_similarity(final["prototypes"].double(), start.double(), dim=-1)
    return float(cos.mean())


def collect() -> tuple[dict, dict]:
    """{(partition, tower, label, variant, centre): {seed: {metric: value}}} and the logs'
    {(partition, tower, label): [(weight-shift, agreement spread) per round and seed]}."""
    scores: dict = {}
    logs: dict = {}
    for run_dir in sorted(OUT.glob("*-s*")):
        if not (run_dir / "results.json").exists():
            continue
        cell, seed = run_dir.name.rsplit("-s", 1)
        partition, tower = cell.split("-")[:2]
        jobs = [json.loads(j.read_text()) for j in sorted((run_dir / "jobs").glob("*.json"))]
        broken = [j["method"] for j in jobs if len(j["history"]) != j["rounds"] or j["events"]]
        if broken:  # a skipped round or a refused hospital: not the protocol, not averaged in
            print(
                f"{run_dir.name}: {broken} had skipped rounds or events; left out", file=sys.stderr
            )
            continue
        for rec in json.loads((run_dir / "results.json").read_text()):
            method, _, variant = rec["method"].partition("+")
            key = (partition, tower, _label(cell, method), variant or "raw", rec["center"])
            scores.setdefault(key, {})[int(seed)] = {m: rec[m] for m in METRICS}
        for summary in jobs:
            label = _label(cell, summary["method"])
            drift = _prototype_drift(run_dir, summary["method"], int(seed))
            for row in summary["history"]:
                per_hospital = np.mean(row["agreement"], axis=1)
                spread = float(per_hospital.max() - per_hospital.min())
                logs.setdefault((partition, tower, label), []).append(
                    (row["weight-shift"], float(per_hospital.mean()), spread, drift)
                )
    return scores, logs


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else "–"


def table() -> str:
    scores, logs = collect()
    lines = ["SYNTHETIC DATA — not clinical performance. Mean ± std over seeds " + str(SEEDS)]
    groups = sorted({k[:2] for k in scores})
    for partition, tower in groups:
        centres = sorted({k[4] for k in scores if k[:2] == (partition, tower)}, key=_centre_order)
        for variant in ("raw", "cal"):
            labels = sorted(
                {k[2] for k in scores if k[:2] == (partition, tower) and k[3] == variant}
            )
            if not labels:
                continue
            lines += [
                "",
                f"**{partition} partition, {tower} anchors, "
                f"{'default calibration' if variant == 'cal' else 'uncalibrated'}** "
                "(5-class accuracy / binary AUC, %)",
                "",
                "| method | seeds | "
                + " | ".join(centres)
                + " | weight-shift | agreement | agreement spread | cos(P, P start) |",
                "|---" * (len(centres) + 6) + "|",
            ]
            for label in labels:
                cells, seeds = [], set()
                for c in centres:
                    runs = scores.get((partition, tower, label, variant, c), {})
                    seeds |= set(runs)
                    cells.append(" / ".join(_cell([r[m] for r in runs.values()]) for m in METRICS))
                log = np.array(logs.get((partition, tower, label), [(np.nan,) * 4]))
                shift, agreement, spread, drift = np.nanmean(log, axis=0)
                lines.append(
                    f"| {label} | {len(seeds)} | "
                    + " | ".join(cells)
                    + f" | {shift:.4f} | {agreement:.3f} | {spread:.4f} | {drift:.3f} |"
                )
            lines.append(_paired(scores, partition, tower, variant, centres))
    return "\n".join(lines)


def _paired(scores: dict, partition: str, tower: str, variant: str, centres: list[str]) -> str:
    """Text-anchored (lambda 5) minus FedAvg, paired by seed: mean ± std of the difference."""
    lines = []
    for suffix in ("", ", prototype lr ×10"):
        parts = []
        for c in centres:
            a = scores.get((partition, tower, "text-anchored λ=5" + suffix, variant, c), {})
            b = scores.get((partition, tower, "fedavg" + suffix, variant, c), {})
            seeds = sorted(set(a) & set(b))
            if seeds:
                diffs = [_cell([a[s][m] - b[s][m] for s in seeds]) for m in METRICS]
                parts.append(f"{c} {' / '.join(d.replace(' ± ', '±') for d in diffs)}")
        if parts:
            lines.append(f"\nText-anchored − FedAvg{suffix} (paired by seed): " + "; ".join(parts))
    return "\n".join(lines)


def _centre_order(centre: str) -> tuple[int, str]:
    known = ["mixed", "xiangya", "huaxi", "scanner_hr", "scanner_lc"]
    return (known.index(centre) if centre in known else len(known), centre)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the grid's missing cells")
    run_p.add_argument("--cell", choices=sorted(CELLS), action="append")
    run_p.add_argument("--seed", type=int, action="append")
    sub.add_parser("table", help="print the tables from the finished runs")
    args = parser.parse_args()
    if args.command == "run":
        run(args.cell or list(CELLS), args.seed or list(SEEDS))
    else:
        print(table())


if __name__ == "__main__":
    main()
