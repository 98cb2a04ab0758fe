"""Issue #24's measurement: one trained model on centres of the held-out style family.

Why: fixes for a scanner the model never saw must be judged on scanners nobody tuned
them to. This trains one model, central (``savlt train``) or one federated method
(``--method fedavg``: ``savlt simulate`` of that method alone), exports it, and on every centre
of the requested style families (synthetic/family.py) reports, per label-free candidate
(none, recentre, restandardise, t3a, tent) and for the guard's pick: binary AUC, the
referral rate at the model's threshold, the accepted scans' sensitivity and specificity
and the guard's signals (instability under scanner randomisation, rank agreement, the
reasons it refused); then the
issue's targets (mean AUC, worst centre, adaptation harm, referral) and the Spearman
correlation of the referral rate with the AUC. Family seed 0 is for tuning, 1-3 report.
Labels only score. Synthetic data: not clinical numbers.

    nice -n 10 .venv/bin/python benchmarks/family_probe.py --family-seeds 0 1 --n 6 \\
        --set train.iterations_per_shot=4 --out runs/family_probe
    .venv/bin/python benchmarks/family_probe.py --family-seeds 1 2 3 --method fedavg \\
        --out runs/family_fedavg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from savlt_model.atomic import write_json, write_text
from savlt_model.config import CERVICAL_CLASSES
from savlt_model.data.folders import scan_center
from savlt_model.evaluation import predict
from savlt_model.metrics import compute_metrics
from savlt_model.referral import accepted_scores
from synthetic.family import family_name
from synthetic.write import add_family_centres, generate
from tools.cli import main as savlt
from tools.export import export_model
from tools.inference import BATCH, calibration_of, image_set, load_model, site_guard

CANDIDATES = ("recentre", "restandardise", "t3a", "tent")  # every candidate but "none"


def _centre(model, info: dict, root: Path, centre: str) -> dict[str, Any]:
    samples = scan_center(root, centre, model.classes)
    _, labels, feats = predict(model, image_set(info, samples), BATCH)
    picked = site_guard(model, info, samples, feats)
    out: dict[str, Any] = {
        "n": len(labels),
        "shift": picked.shift,
        "guard_choice": picked.choice,
        "guard_reason": picked.reason,
        "guard_refer_below": picked.refer_below,
    }
    threshold = calibration_of(info).refer_below or 0.0
    rows = {name: (c.probs, c) for name, c in picked.candidates.items()}
    for name, (p, c) in {**rows, "guard": (picked.probs, None)}.items():
        m = compute_metrics(p, labels, model.positive)
        refer = picked.refer_below if name == "guard" else threshold
        out[name] = {
            "auc": m["auc_binary"],
            "acc5": m["acc_multiclass"],
            **accepted_scores(p, labels, list(model.positive), refer),
        }
        if c is not None:
            out[name].update(instability=c.instability, auc_cost=c.auc_cost, refused=c.refused)
    return out


def _summary(rows: dict[str, dict]) -> dict[str, Any]:
    auc = {c: r["guard"]["auc"] for c, r in rows.items()}
    base = {c: r["none"]["auc"] for c, r in rows.items()}
    rates = [rows[c]["guard"]["referral_rate"] for c in rows]
    return {
        "mean_auc_none": float(np.mean(list(base.values()))),
        "mean_auc_guard": float(np.mean(list(auc.values()))),
        "min_auc_guard": float(min(auc.values())),
        "worst_guard_drop": float(max(base[c] - auc[c] for c in rows)),
        **{
            f"worst_{k}_drop": float(max(base[c] - rows[c][k]["auc"] for c in rows))
            for k in CANDIDATES
        },
        "spearman_referral_vs_auc": float(spearmanr(rates, list(auc.values())).statistic),
        "centres_meeting_sens85_spec75": sum(
            (r["guard"]["accepted_sensitivity"] or 0) >= 85
            and (r["guard"]["accepted_specificity"] or 0) >= 75
            for r in rows.values()
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--n", type=int, default=6, help="centres per family")
    ap.add_argument("--family-scale", type=float, default=0.5, help="30 x scale per class")
    ap.add_argument("--out", type=Path, default=Path("runs/family_probe"))
    ap.add_argument("--data", type=Path, default=None, help="DATA folder (default OUT/data)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="configs/default.yaml", help="the model's config")
    ap.add_argument("--set", action="append", default=[], help="config override for the model")
    ap.add_argument("--method", default="central", help="central, or a federated method")
    ap.add_argument("--name", default="family_probe", help="OUT/NAME.json and OUT/NAME.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = args.data or args.out / "data"
    if not root.exists():
        generate(root, seed=0, scale=1.0, progress=False)
    for s in args.family_seeds:
        add_family_centres(root, args.n, s, seed=0, scale=args.family_scale, progress=False)
    run, model_dir = args.out / "run", args.out / "model"
    if not (run / "results.json").exists():
        sets = [f"data.root={root}", "data.synthetic.enabled=false", "data.held_out_centers=[]"]
        sets += ["seeds=[42]", *args.set]
        command = "train" if args.method == "central" else "simulate"
        if command == "simulate":
            sets.append(f"fl.methods=[{args.method}]")
        argv = [command, "--config", args.config, "--out", str(run)]
        assert savlt([*argv, *(a for s in sets for a in ("--set", s))]) == 0
    if not model_dir.exists():
        export_model(run, model_dir, method=args.method)
    model, info = load_model(model_dir)
    result: dict[str, Any] = {
        "classes": list(CERVICAL_CLASSES),
        "config": args.config,
        "method": args.method,
        "overrides": args.set,
    }
    # in distribution: the run's own records on its test centres (results.json)
    keys = ("method", "center", "auc_binary", "acc_multiclass", "sensitivity", "specificity")
    result["in_distribution"] = [
        {k: r.get(k) for k in (*keys, "referral_rate")}
        for r in json.loads((run / "results.json").read_text())
        if r.get("method") in (args.method, f"{args.method}+cal")
    ]
    for s in args.family_seeds:
        rows = {
            family_name(s, k): _centre(model, info, root, family_name(s, k)) for k in range(args.n)
        }
        result[f"family{s}"] = {"centres": rows, "summary": _summary(rows)}
    write_json(args.out / f"{args.name}.json", result)
    lines = ["| centre | shift | guard | AUC none / recentre / restd / t3a / tent / guard "
             "| refer % | acc. sens / spec (guard) |", "|---|---|---|---|---|---|"]  # fmt: skip
    everything: dict[str, dict] = {}
    for s in args.family_seeds:
        everything.update(result[f"family{s}"]["centres"])
    for c, r in everything.items():
        aucs = " / ".join(
            f"{r[k]['auc']:.1f}" if r[k]["auc"] is not None else "-"
            for k in ("none", *CANDIDATES, "guard")
        )
        g = r["guard"]
        ss = "/".join(
            "-" if g[k] is None else f"{g[k]:.0f}"
            for k in ("accepted_sensitivity", "accepted_specificity")
        )
        rate = g["referral_rate"]
        lines.append(
            f"| {c} | {r['shift']:.2f} | {r['guard_choice']} | {aucs} | {rate:.0f} | {ss} |"
        )
    for s in args.family_seeds:
        lines.append(f"\nfamily {s}: {json.dumps(result[f'family{s}']['summary'])}")
    print(write_text(args.out / f"{args.name}.md", "\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
