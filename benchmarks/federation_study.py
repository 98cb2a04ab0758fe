"""Federation measured at a stated budget: rounds x local steps, seeds, data seeds.

Issue #28's study on the synthetic data (SYNTHETIC, not clinical performance). Each cell is
one ``savlt simulate`` of the default config with its overrides, per seed, written under
``runs/federation-study/<cell>-s<seed>``; a cell finished there or recorded in
results/federation_study.json is skipped, so the study resumes across sessions.

    python benchmarks/federation_study.py run --cell central --cell rounds2 --seed 5 --seed 42
    python benchmarks/federation_study.py run --group sweep --seed 42   # every rounds cell
    python benchmarks/federation_study.py table       # markdown + results/federation_study.json

Cells: ``rounds{R}`` (FedAvg at the per-hospital budget, R rounds of 160 / R local steps:
what the round count costs in accuracy and bytes; R = ``fl.rounds`` of the default config
is the default), ``central`` (the baseline; it does not depend on the rounds), and
``central-data1`` / ``rounds{R}-data1`` (the same on another synthetic data seed, in its
own data folder). Those cells pin the default before ``equalise``
(``common.BEFORE_EQUALISE``) so that their recorded numbers stay comparable; the same cells
with ``-now`` (``central-now``, ``rounds{R}-now``) run today's default. ``table`` prints,
per cell and method, the calibrated and raw accuracy on mixed / Xiangya / Huaxi (mean +-
std over the seeds found), the rounds sweep with the bytes each hospital sent and received
over the run, and each FedAvg cell minus central on the same data and default, paired by
seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from common import BEFORE_EQUALISE

from savlt_model.atomic import write_text
from savlt_model.config import load_config

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "federation-study"
RESULTS = ROOT / "benchmarks" / "results" / "federation_study.json"
CONFIG = "configs/default.yaml"
CENTRES = ("mixed", "xiangya", "huaxi")
COMMON = ("fl.eval_every=0",)  # scored after the last round only

ROUNDS = (1, 2, 5, 10, 20)
DATA1 = ("data.synthetic.seed=1", "data.root=runs/data/synthetic-seed1")
NOW: dict[str, tuple[str, ...]] = {
    f"rounds{r}": ("fl.methods=[fedavg]", f"fl.rounds={r}") for r in ROUNDS
}
NOW["central"] = ("fl.methods=[central]",)
CELLS = {cell: (*sets, *BEFORE_EQUALISE) for cell, sets in NOW.items()}
CELLS |= {f"{c}-data1": (*CELLS[c], *DATA1) for c in ("central", "rounds2", "rounds5")}
CELLS |= {f"{c}-now": NOW[c] for c in ("central", "rounds1", "rounds2", "rounds5")}
GROUPS = {"sweep": [f"rounds{r}" for r in ROUNDS]}


def run(cells: list[str], seeds: list[int]) -> None:
    recorded = {(key[0], seed) for key, per in _recorded()[0].items() for seed in per}
    for cell in cells:
        for seed in seeds:
            out = OUT / f"{cell}-s{seed}"
            if (out / "results.json").exists() or (cell, seed) in recorded:
                print(f"{out.name}: done (run folder or results file), skipped", flush=True)
                continue
            sets = [*COMMON, *CELLS[cell], f"seeds=[{seed}]"]
            cmd = [sys.executable, "-m", "tools.cli", "simulate", "--config", CONFIG]
            cmd += [a for s in sets for a in ("--set", s)] + ["--out", str(out)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)


def _recorded() -> tuple[dict, dict]:
    """What results/federation_study.json already holds: runs/ is not committed, so a cell
    measured in an earlier session is kept from there unless its run folder is here."""
    if not RESULTS.exists():
        return {}, {}
    saved = json.loads(RESULTS.read_text())
    scores = {
        tuple(k.split("/")): {int(s): v for s, v in per.items()}
        for k, per in saved["scores"].items()
    }
    traffic = {
        tuple(k.split("/")): {int(s): tuple(v) for s, v in per.items()}
        for k, per in saved["traffic_mib"].items()
    }
    return scores, traffic


def collect() -> tuple[dict, dict]:
    """{(cell, method, centre): {seed: acc}} and {(cell, method): {seed: (up, down) MiB of
    one hospital over the run: the sum of each round's largest message}}: every finished
    run under runs/, over what the results file recorded before."""
    scores, traffic = _recorded()
    for run_dir in sorted(OUT.glob("*-s*")):
        if not (run_dir / "results.json").exists():
            continue
        cell, seed = run_dir.name.rsplit("-s", 1)
        for rec in json.loads((run_dir / "results.json").read_text()):
            if rec["center"] in CENTRES:
                scores.setdefault((cell, rec["method"], rec["center"]), {})[int(seed)] = rec[
                    "acc_multiclass"
                ]
        for job in sorted((run_dir / "jobs").glob("*.json")):
            summary = json.loads(job.read_text())
            history = summary.get("history") or []
            if not history:
                continue
            # each round logs its largest upload and download (one hospital's message)
            up = sum(row.get("upload-bytes", 0) for row in history) / 2**20
            down = sum(row.get("download-bytes", 0) for row in history) / 2**20
            traffic.setdefault((cell, summary["method"]), {})[int(seed)] = (up, down)
    return scores, traffic


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def table() -> str:
    scores, traffic = collect()
    lines = [
        "Accuracy % (5 classes), SYNTHETIC data; mean ± std over the seeds listed.",
        "",
        "| cell | method | seeds | " + " | ".join(CENTRES) + " | MiB up / down per hospital |",
        "|---|---|---|" + "---|" * len(CENTRES) + "---|",
    ]
    rows = sorted({(c, m) for c, m, _ in scores})
    for cell, method in rows:
        per = [scores.get((cell, method, centre), {}) for centre in CENTRES]
        seeds = sorted(set().union(*per))
        bytes_ = traffic.get((cell, method.split("+")[0]), {})
        mib = (
            f"{np.mean([u for u, _ in bytes_.values()]):.2f} / "
            f"{np.mean([d for _, d in bytes_.values()]):.2f}"
            if bytes_
            else "-"
        )
        vals = [_cell(list(p.values())) if p else "-" for p in per]
        lines.append(f"| {cell} | {method} | {seeds} | " + " | ".join(vals) + f" | {mib} |")
    lines += ["", "Rounds x local steps at the per-hospital budget (FedAvg, seed 42):", ""]
    lines += ["| rounds x steps | variant | " + " | ".join(CENTRES) + " | MiB up / down |"]
    lines += ["|---|---|" + "---|" * len(CENTRES) + "---|"]
    default_rounds = load_config(ROOT / CONFIG).fl.rounds
    for r in ROUNDS:
        cell = f"rounds{r}"
        up_down = traffic.get((cell, "fedavg"), {}).get(42)
        for variant in ("+cal", ""):
            accs = [scores.get((cell, "fedavg" + variant, c), {}).get(42) for c in CENTRES]
            if all(a is None for a in accs):
                continue
            mib = f"{up_down[0]:.2f} / {up_down[1]:.2f}" if up_down else "-"
            lines.append(
                f"| {r} x {160 // r}{' (default)' if r == default_rounds else ''} "
                f"| {variant or 'raw'} | "
                + " | ".join("-" if a is None else f"{a:.1f}" for a in accs)
                + f" | {mib} |"
            )
    lines += ["", "FedAvg minus central, paired by seed (accuracy points):", ""]
    lines += ["| FedAvg cell | variant | seeds | " + " | ".join(CENTRES) + " |"]
    lines += ["|---|---|---|" + "---|" * len(CENTRES)]
    for cell in sorted({c for c, m, _ in scores if m == "fedavg"}):
        central = "central" + cell[len(cell.split("-")[0]) :]  # on the same data and default
        for variant in ("", "+cal"):
            diffs = []
            for centre in CENTRES:
                fed = scores.get((cell, "fedavg" + variant, centre), {})
                cen = scores.get((central, "central" + variant, centre), {})
                diffs.append([fed[s] - cen[s] for s in sorted(set(fed) & set(cen))])
            if diffs[0]:
                lines.append(
                    f"| {cell} | {variant or 'raw'} | {len(diffs[0])} | "
                    + " | ".join(_cell(d) for d in diffs)
                    + " |"
                )
    write_text(  # atomic: the file is the record of cells whose runs are gone
        RESULTS,
        json.dumps(
            {
                "scores": {"/".join(k): v for k, v in scores.items()},
                "traffic_mib": {"/".join(k): v for k, v in traffic.items()},
            },
            indent=1,
        ),
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--cell", action="append", choices=sorted(CELLS))
    r.add_argument("--group", choices=sorted(GROUPS))
    r.add_argument("--seed", type=int, action="append", required=True)
    sub.add_parser("table")
    args = p.parse_args()
    if args.cmd == "run":
        cells = (args.cell or []) + (GROUPS[args.group] if args.group else [])
        if not cells:
            p.error("give --cell or --group")
        run(cells, args.seed)
    else:
        print(table())


if __name__ == "__main__":
    main()
