"""Where does the centre shift enter? Per-centre statistics at every stage of the pipeline.

Why: a model trained on the mixed centre can rank an external centre's scans well and still
call almost all of them one class. This trains one central model (the original protocol,
as ``savlt train`` does) and measures each centre at every stage, so one sees where the
centre's data leave the training distribution: raw pixels (whole image and inside the
weight-free tissue mask, at the file's resolution, as the loader decodes them), the ROI box
(``roi_top`` on the model's input), the patch tokens inside the ROI after the last norm,
the pooled features, the fused logits and the predicted-class histogram.

Shift of a centre at a stage = ||mean_centre - mean_ref|| / sqrt(trace cov_ref), with ref the
training centre's whole train split (1.0 = one training "radius"). Test labels only score.
docs/scanner-shift.md reads the table; numbers from synthetic data are not clinical ones.

    .venv/bin/python benchmarks/shift_probe.py --threads 1 --centres scanner_hr scanner_lc
    .venv/bin/python benchmarks/shift_probe.py --set data.root=/tmp/shiftdata \\
        --set data.synthetic.enabled=false --set data.shots=2 \\
        --set train.iterations_per_shot=2 --out /tmp/shift_smoke     # smoke check

Held-out scanner names among ``--centres`` (``scanner_hr``, ``scanner_lc``) are added to a
synthetic DATA folder first when missing (``synthetic.write.add_held_out_centres``, with the
folder's own synth.json seed and scale); other centres must already be in data.root.
Writes ``OUT/shift_probe.json`` and ``OUT/shift_probe.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import machine
from PIL import Image

from savlt_model.atomic import write_json, write_text
from savlt_model.calibration import softmax
from savlt_model.config import Config, load_config, resolve_path
from savlt_model.data.folders import Sample
from savlt_model.data.images import ImageSet, make_loader, to_rgb
from savlt_model.data.intensity import GRAY, tissue_mask
from savlt_model.data.protocol import external_test, is_synthetic, paper_protocol, split_parts
from savlt_model.metrics import compute_metrics
from savlt_model.model.build import build_model, image_sets, pick_device
from savlt_model.model.roi import roi_top
from savlt_model.model.savlt import SavltModel
from savlt_model.train import train_steps
from synthetic.centres import HELD_OUT_PROFILES
from synthetic.write import add_held_out_centres, ensure_data

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
RAW_KEYS = ("img_mean", "roi_p1", "roi_p50", "roi_p99", "roi_std", "above_frac", "surf", "aspect")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable (as savlt --set)",
    )
    p.add_argument("--seed", type=int, default=None, help="training seed (default: seeds[0])")
    p.add_argument(
        "--centres",
        nargs="*",
        default=[],
        metavar="NAME",
        help="extra test centres beyond data.external_centers (e.g. scanner_hr scanner_lc)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/shift_probe"), help="output folder")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- raw pixels


def raw_stats(samples: list[Sample]) -> dict[str, float]:
    """Mean over a centre's files of grey-level statistics in [0, 1].

    ``roi_*`` are inside the tissue mask, ``above_frac`` is the non-tissue share, ``surf``
    the first tissue row / height, ``aspect`` width / height.
    """
    rows = []
    for s in samples:
        with Image.open(s.path) as im:
            g = (to_rgb(im).astype(np.float64) @ GRAY) / 255.0
        m = tissue_mask(g)
        t = g[m] if m.sum() > 64 else g.ravel()  # a failed mask is not fatal
        top = np.argmax(m.any(1)) / g.shape[0]
        p1, p50, p99 = np.percentile(t, [1, 50, 99])
        rows.append([g.mean(), p1, p50, p99, t.std(), 1 - m.mean(), top, g.shape[1] / g.shape[0]])
    return {k: float(v) for k, v in zip(RAW_KEYS, np.mean(rows, axis=0), strict=True)}


# ---------------------------------------------------------------- model stages


@torch.no_grad()
def model_stats(model: SavltModel, ds: ImageSet, batch_size: int) -> dict[str, np.ndarray]:
    """ROI top, mean ROI patch token, pooled feature and fused logits per image."""
    model.eval()
    device = next(model.parameters()).device
    tops, tokens, feats, logits = [], [], [], []
    for images, _ in make_loader(ds, batch_size, shuffle=False, seed=0):
        images = images.to(device)
        x, keep = model.patch_tokens(images)
        if model.masker is not None:
            tops.append(roi_top(model.masker(images.float()), model.search_from).cpu())
        k = keep[:, :, None].float()
        tokens.append(((x * k).sum(1) / k.sum(1).clamp_min(1)).float().cpu())
        out = model(images)
        feats.append(out.features.float().cpu())
        logits.append(out.logits.float().cpu())
    return {
        "roi_top": torch.cat(tops).numpy() if tops else np.zeros(0),
        "tokens": torch.cat(tokens).numpy(),
        "features": torch.cat(feats).numpy(),
        "logits": torch.cat(logits).numpy(),
    }


def shift(x: np.ndarray, ref: np.ndarray) -> float:
    """Distance of the mean from the reference mean, in units of the reference's spread."""
    spread = np.sqrt(np.trace(np.atleast_2d(np.cov(ref.T))))
    return float(np.linalg.norm(x.mean(0) - ref.mean(0)) / max(spread, 1e-12))


# ---------------------------------------------------------------- the probe


def _add_held_out(cfg: Config, root: Path, names: list[str]) -> list[str]:
    """Write the held-out scanner centres asked for into a synthetic DATA folder if missing.

    Idempotent (only missing centres are rendered), so every run may call it; on a real
    DATA folder nothing is written and :func:`external_test` says what is missing.
    """
    wanted = tuple(n for n in names if n in HELD_OUT_PROFILES)
    if not wanted or not is_synthetic(root):
        return []
    info = json.loads((root / "synth.json").read_text(encoding="utf-8"))
    written = add_held_out_centres(
        root, info["seed"], info["scale"], cfg.task.classes, wanted, progress=False
    )
    return sorted(written)


def centre_sets(
    cfg: Config, seed: int, extra: list[str]
) -> tuple[dict[str, list[Sample]], list[Sample]]:
    """({name: samples} to probe, the K-shot train set), the reference set first."""
    root = ensure_data(cfg)
    added = _add_held_out(cfg, root, [*cfg.data.held_out_centers, *extra])
    if added:
        print(f"added held-out centres {', '.join(added)} to {root}", file=sys.stderr)
    center, tests = paper_protocol(cfg, seed)
    name = cfg.data.train_center
    parts = split_parts(cfg, root, name)
    sets = {f"{name}_train": parts["train"], f"{name}_test": tests.pop(name), **tests}
    for c in extra:
        if c not in sets:
            sets[c] = external_test(cfg, root, c)
    return sets, center.train


def probe(cfg: Config, seed: int, extra: list[str]) -> dict[str, Any]:
    """Train the central model, then measure every centre at every stage."""
    sets, train = centre_sets(cfg, seed, extra)
    t0 = time.perf_counter()
    model = build_model(cfg, seed)
    train_set = image_sets(cfg, {"train": train}, train=True)["train"]
    stats = train_steps(model, train_set, cfg, cfg.total_iterations, seed)
    train_s = time.perf_counter() - t0
    bs = cfg.train.eval_batch_size
    per = {n: model_stats(model, ds, bs) for n, ds in image_sets(cfg, sets, train=False).items()}
    ref = per[next(iter(per))]
    n_classes = len(cfg.task.classes)
    centres: dict[str, Any] = {}
    for name, st in per.items():
        labels = np.array([s.label for s in sets[name]])
        probs = softmax(st["logits"])
        m = compute_metrics(probs, labels, model.positive)
        top = st["roi_top"]  # empty when model.roi.source is none
        band = [float(v) for v in np.percentile(top, [10, 90])] if top.size else None
        centres[name] = {
            "n": len(labels),
            "raw": raw_stats(sets[name]),
            "roi_top_mean": float(top.mean()) if top.size else None,
            "roi_top_p10_p90": band,
            "token_shift": shift(st["tokens"], ref["tokens"]),
            "feature_shift": shift(st["features"], ref["features"]),
            "logit_mean": [float(v) for v in st["logits"].mean(0)],
            "predicted": np.bincount(probs.argmax(1), minlength=n_classes).tolist(),
            "true": np.bincount(labels, minlength=n_classes).tolist(),
            "metrics": {
                k: m[k] for k in ("acc_multiclass", "auc_binary", "sensitivity", "specificity")
            },
        }
    return {
        "seed": seed,
        "classes": list(cfg.task.classes),
        "train_steps": stats.steps,
        "train_images": len(train),
        "train_loss": stats.loss,
        "train_seconds": round(train_s, 1),
        "reference": next(iter(per)),
        "centres": centres,
    }


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _abbrev(classes: list[str]) -> list[str]:
    """One distinct capital letter per class (cancer, cyst, ... -> C, Y, ...)."""
    taken: list[str] = []
    for cls in classes:
        letters = [ch.upper() for ch in cls if ch.isalpha()]
        taken.append(next((ch for ch in letters if ch not in taken), str(len(taken))))
    return taken


def markdown(result: dict[str, Any]) -> str:
    """The two tables of docs/scanner-shift.md: raw pixels, then the model's stages."""
    c = result["centres"]
    abbrev = " ".join(_abbrev(result["classes"]))
    lines = [
        f"Seed {result['seed']}, {result['train_steps']} steps on {result['train_images']} "
        f"images; shift reference: {result['reference']} (all its train split). "
        f"Class order ({abbrev}): {', '.join(result['classes'])}.",
        "",
        "| centre | " + " | ".join(RAW_KEYS) + " |",
        "|---|" + "---|" * len(RAW_KEYS),
    ]
    lines += [
        f"| {n} | " + " | ".join(f"{r['raw'][k]:.3f}" for k in RAW_KEYS) + " |"
        for n, r in c.items()
    ]
    lines += [
        "",
        "| centre | n | roi_top mean | roi_top p10-p90 | token shift | feature shift "
        f"| mean logit ({abbrev}) | predicted | true | acc5 / AUC / sens / spec |",
        "|" + "---|" * 10,
    ]
    for n, r in c.items():
        band = r["roi_top_p10_p90"]
        m = r["metrics"]
        lines.append(
            f"| {n} | {r['n']} | {_f(r['roi_top_mean'], '.3f')} | "
            f"{'-' if band is None else f'{band[0]:.2f}-{band[1]:.2f}'} | "
            f"{r['token_shift']:.2f} | {r['feature_shift']:.2f} | "
            f"{' '.join(f'{v:.1f}' for v in r['logit_mean'])} | {r['predicted']} | {r['true']} | "
            + " / ".join(_f(m[k], ".1f") for k in m)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    seed = cfg.seeds[0] if args.seed is None else args.seed
    start = machine(pick_device(cfg.train.device))
    result = probe(cfg, seed, list(dict.fromkeys(args.centres)))
    table = markdown(result)
    print(table)
    record = {
        "name": "shift_probe",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": str(args.config),
        "overrides": args.overrides,
        "synthetic": is_synthetic(resolve_path(cfg.data.root)),
        "machine": start,
        **result,
    }
    write_json(args.out / "shift_probe.json", record)
    write_text(args.out / "shift_probe.md", table)
    print(f"wrote {args.out / 'shift_probe.json'} and {args.out / 'shift_probe.md'}")


if __name__ == "__main__":
    main()
