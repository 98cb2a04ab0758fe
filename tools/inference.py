"""Use an exported model (``savlt export``) on images: per-image predictions, or a scored centre.

Everything is rebuilt from MODEL_DIR alone (:func:`tools.export.load_exported`), and
images are decoded with :func:`savlt_model.data.images.load_image`, so grayscale, 16-bit, RGBA and
JPEG scans work exactly as in training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from savlt_model.data.folders import Sample, scan_center
from savlt_model.data.images import ImageSet
from savlt_model.data.protocol import is_synthetic
from savlt_model.errors import SavltError
from savlt_model.evaluation import predict
from savlt_model.metrics import binary_scores
from savlt_model.model.build import pick_device
from savlt_model.model.savlt import SavltModel
from simulation.finish import Finish, finish_model
from simulation.report import write_report
from simulation.results import write_results, write_summary
from tools.export import HEAD_JSON, load_exported

BATCH = 32


def _load(model_dir: Path) -> tuple[SavltModel, dict]:
    model = load_exported(model_dir).to(pick_device())
    return model, json.loads((Path(model_dir) / HEAD_JSON).read_text(encoding="utf-8"))


def predict_images(model_dir: Path, paths: Sequence[Path]) -> list[dict]:
    """Per image: ``file``, ``class``, ``probability`` (of that class), ``high_risk`` (summed
    probability of the positive classes) and ``probs`` (class -> probability).

    Images go through the same decoding and normalisation as in training (an ImageSet of
    unlabelled samples) and the same evaluation loop (:func:`savlt_model.evaluation.predict`).
    """
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SavltError(f"image file(s) not found: {', '.join(missing)}")
    if not paths:
        raise SavltError("no images given")
    model, info = _load(model_dir)
    samples = [Sample(p, 0, p.name) for p in paths]  # the label is unused here
    dataset = ImageSet(samples, info["image_size"], info["mean"], info["std"], train=False)
    probs, _, _ = predict(model, dataset, BATCH)
    high = binary_scores(probs, model.positive)
    rows: list[dict] = []
    for path, p, h in zip(paths, probs, high, strict=True):
        best = int(np.argmax(p))
        rows.append(
            {
                "file": str(path),
                "class": model.classes[best],
                "probability": float(p[best]),
                "high_risk": float(h),
                "probs": dict(zip(model.classes, map(float, p), strict=True)),
            }
        )
    return rows


def evaluate_folder(model_dir: Path, center_dir: Path, out_dir: Path) -> dict:
    """Score the model on a labelled centre folder ``ROOT/<centre>`` (``images/<class>/...``).

    Writes ``results.json``, ``summary.json``, confusion + ROC PNGs under ``figures/`` and
    ``report.md`` into ``out_dir``; returns the metrics (seven keys, ``confusion``, ``n``).
    """
    center_dir, out_dir = Path(center_dir), Path(out_dir)
    model, info = _load(model_dir)
    root, center = center_dir.parent, center_dir.name
    samples = scan_center(root, center, model.classes)
    dataset = ImageSet(samples, info["image_size"], info["mean"], info["std"], train=False)
    synthetic = is_synthetic(root)
    method, seed = str(info["method"]), int(info["seed"])
    tag = f"{method}_seed{seed}"
    run = Finish(out_dir, tag, method, seed, None, synthetic)
    scores, records = finish_model(model, {center: dataset}, BATCH, run, adapter_cfg=None)
    write_results(out_dir / "results.json", records)
    title = f"Exported model {Path(model_dir).name} ({tag}) on {center_dir}"
    write_summary(out_dir / "summary.json", records, {"title": title, "synthetic": synthetic})
    write_report(out_dir)
    return scores[center].metrics
