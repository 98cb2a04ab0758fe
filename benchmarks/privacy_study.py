"""What DP costs: FedEx vs FFA-LoRA, and FFA-LoRA under server- and client-side clipping.

Issue #14's study on the synthetic data (SYNTHETIC, not clinical performance; one seed).
Each cell is one ``savlt simulate`` of the default config (FedAvg, seed 42, scored after
the last round only), written under ``runs/privacy-study/<cell>``; a finished cell is
skipped, so the study resumes. The synthetic data is generated under the study's own
folder.

    python benchmarks/privacy_study.py run                 # every missing cell
    python benchmarks/privacy_study.py run --cell ffa-client-z1
    python benchmarks/privacy_study.py table               # the markdown table

``table`` reads results.json, the job summary and the run log (round times:
:func:`round_seconds`) of every finished cell.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "privacy-study"
SEED = 42
# the same in every cell: FedAvg (the DP modes refuse data-dependent weights), seed 42,
# scored after the last round only, data generated inside the study folder; K = 8 shots and
# batch 16 (default 16 and 32) so that the grid fits about 40 min of a shared 2-core machine
COMMON = (
    "fl.budget=same-total",  # the budget and rounds its tables were measured under
    "fl.rounds=5",
    "fl.eval_every=0",
    "fl.methods=[fedavg]",
    f"seeds=[{SEED}]",
    f"data.root={OUT / 'data'}",
    "data.shots=8",
    "train.batch_size=16",
)
# Each hospital's whole FFA update without DP (`privacy_study.py norms`, training alone on
# the federation's schedule) measured 0.98-1.08 / 0.71-0.77 / 0.49-0.55 / 0.24-0.27 /
# 0.06 in rounds 1-5 (the cosine schedule): clipping at their median, 0.5, halves the first
# rounds' updates and leaves the last two whole (the default 1.0 would clip almost nothing)
CLIP = 0.5
CELLS: dict[str, tuple[str, ...]] = {
    "fedex": ("fl.lora_aggregation=fedex",),
    "ffa": ("fl.lora_aggregation=ffa",),
}
CELLS |= {
    f"ffa-server-z{z:g}": (
        "fl.lora_aggregation=ffa",
        "privacy.mode=server-fixed",
        f"privacy.noise_multiplier={z:g}",
        f"privacy.clipping_norm={CLIP:g}",
    )
    for z in (0.5, 1, 2)
}
CELLS["ffa-client-z1"] = (
    "fl.lora_aggregation=ffa",
    "privacy.mode=client-fixed",
    "privacy.noise_multiplier=1",
    f"privacy.clipping_norm={CLIP:g}",
)
HELD_OUT = ("xiangya", "huaxi", "scanner_hr", "scanner_lc")  # no training hospital's centre
ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")


def command(cell: str) -> list[str]:
    sets = [*COMMON, *CELLS[cell]]
    cmd = [sys.executable, "-m", "tools.cli", "simulate", "--config", "configs/default.yaml"]
    return cmd + [a for s in sets for a in ("--set", s)] + ["--out", str(OUT / cell)]


def run(cells: list[str]) -> None:
    for cell in cells:
        if (OUT / cell / "results.json").exists():
            print(f"{cell}: done, skipped", flush=True)
            continue
        cmd = command(cell)
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)


def round_seconds(log: Path) -> list[float]:
    """Wall time of each Flower round, from the run log's timestamps: one ``[ROUND k/R]``
    line to the next; the last round ends at "Strategy execution finished", so it includes
    the final server scoring, and round 1 includes the actors' start."""
    marks = []
    for line in log.read_text().splitlines():
        if ROUND.search(line) or "Strategy execution finished" in line:
            marks.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return np.diff(marks).tolist()


def norms() -> list[list[float]]:
    """Per hospital, the L2 norm of its whole FFA update in each of the rounds, each
    hospital training alone (no averaging in between) on the federation's schedule: the
    scale the clipping norm is chosen from (no DP, seed 42)."""
    import torch

    from savlt_model.budget import local_steps
    from savlt_model.config import load_config
    from savlt_model.data.partition import build_partition
    from savlt_model.methods import get_method
    from savlt_model.model.adapters import trainable_state
    from savlt_model.model.build import build_model, image_sets
    from savlt_model.train import train_steps

    cfg = load_config(ROOT / "configs/default.yaml", [*COMMON, *CELLS["ffa"]])
    steps, terms = local_steps(cfg), get_method("fedavg").losses(cfg.methods)
    out = []
    for index, hospital in enumerate(build_partition(cfg, SEED).hospitals):
        model, data = build_model(cfg, SEED), image_sets(cfg, {"t": hospital.train}, True)["t"]
        per_round = []
        for round_ in range(cfg.fl.rounds):
            before = trainable_state(model)
            seed = int(np.random.SeedSequence([SEED, round_ + 1, index]).generate_state(1)[0])
            train_steps(
                model,
                data,
                cfg,
                steps,
                seed,
                start_step=round_ * steps,
                total_steps=steps * cfg.fl.rounds,
                prox_mu=terms.prox_mu,
                anchor_weight=terms.anchor_weight,
            )
            after = trainable_state(model)
            sq = sum(
                float((after[k].double() - v.double()).square().sum()) for k, v in before.items()
            )
            per_round.append(float(torch.tensor(sq).sqrt()))
        print(f"{hospital.name}: " + " ".join(f"{v:.3f}" for v in per_round), flush=True)
        out.append(per_round)
    return out


def row(cell: str) -> str | None:
    out = OUT / cell
    if not (out / "results.json").exists():
        return None
    job = json.loads((out / "jobs" / f"fedavg_seed{SEED}.json").read_text())
    records = json.loads((out / "results.json").read_text())
    scores = {r["center"]: r for r in records if r["method"] == "fedavg+cal"}  # the default
    rounds = job["history"]
    timing = round_seconds(out / "savlt.log")
    spent = job["privacy"]
    eps = "–" if spent is None else ("∞" if spent["epsilon"] is None else f"{spent['epsilon']:.2f}")
    events = f" ({len(job['events'])} events)" if job["events"] else ""
    return (
        f"| {cell}{events} | {eps} | "
        + " | ".join(
            f"{scores[c]['acc_multiclass']:.1f} / {scores[c]['auc_binary']:.1f}" for c in HELD_OUT
        )
        + f" | {np.mean([scores[c]['acc_multiclass'] for c in HELD_OUT]):.1f}"
        + f" / {np.mean([scores[c]['auc_binary'] for c in HELD_OUT]):.1f}"
        + f" | {max(r['upload-bytes'] for r in rounds) / 1024:.0f}"
        + f" / {max(r['download-bytes'] for r in rounds) / 1024:.0f}"
        + f" | {np.median(timing):.0f} |"
    )


def table() -> str:
    lines = [
        f"SYNTHETIC DATA — not clinical performance. One seed ({SEED}); default config "
        "(savlt-tiny, paper partition, 3 hospitals, 5 rounds, FedAvg) with K = 8 shots and "
        "batch 16; δ = 1e-5.",
        "",
        "| cell | ε | "
        + " | ".join(HELD_OUT)
        + " | mean | KiB up / down per hospital per round | s per round (median) |",
        "|---" * (len(HELD_OUT) + 5) + "|",
    ]
    lines += [r for r in map(row, CELLS) if r is not None]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the grid's missing cells")
    run_p.add_argument("--cell", choices=sorted(CELLS), action="append")
    sub.add_parser("table", help="print the table from the finished cells")
    sub.add_parser("norms", help="the hospitals' update norms without DP (to pick the clip)")
    args = parser.parse_args()
    if args.command == "run":
        run(args.cell or list(CELLS))
    elif args.command == "norms":
        norms()
    else:
        print(table())


if __name__ == "__main__":
    main()
