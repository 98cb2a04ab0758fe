"""Use an exported model (``savlt export``): predict, evaluate, calibrate to a new site.

Everything is rebuilt from MODEL_DIR alone (:func:`tools.export.load_exported`), and
images are decoded with :func:`savlt_model.data.images.load_image`, so grayscale, 16-bit, RGBA and
JPEG scans work exactly as in training.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from reporting.finish import Finish, finish_model
from reporting.report import write_report
from reporting.results import write_results, write_summary
from savlt_model.adaptation import (
    GUARD_VIEW_P,
    GUARD_VIEWS,
    MIN_SCANS,
    AdaptedFeatures,
    GuardChoice,
    guard,
    site_calibration,
)
from savlt_model.atomic import write_json
from savlt_model.calibration import (
    Calibration,
    calibration_from_dict,
    calibration_to_dict,
    shift_score,
)
from savlt_model.data.folders import SCAN_SUFFIXES, Listed, Sample, expand_files, scan_center
from savlt_model.data.images import ImageSet
from savlt_model.data.protocol import is_synthetic
from savlt_model.errors import SavltError
from savlt_model.evaluation import predict
from savlt_model.metrics import binary_scores
from savlt_model.model.build import pick_device
from savlt_model.model.savlt import SavltModel
from savlt_model.referral import decide
from savlt_model.tent import applied, tent_state
from tools.export import HEAD_JSON, load_exported

BATCH = 32
# Missing or unreadable images: these commands' own option (training uses data.on_bad_file).
SKIP_HINT = "use --on-bad-file skip"
log = logging.getLogger(__name__)


def load_model(model_dir: Path) -> tuple[SavltModel, dict]:
    model = load_exported(model_dir).to(pick_device())
    return model, json.loads((Path(model_dir) / HEAD_JSON).read_text(encoding="utf-8"))


def image_set(info: dict, samples: list[Sample], scanner_augment: float = 0.0) -> ImageSet:
    """The scans decoded and standardised exactly as the model was trained (models exported
    before intensity standardisation existed record none); ``scanner_augment`` > 0:
    re-imaged by random scanners (:class:`savlt_model.data.augment.ScannerAugment`)."""
    size, mean, std = info["image_size"], info["mean"], info["std"]
    intensity = info.get("intensity", "none")
    return ImageSet(samples, size, mean, std, False, intensity, scanner_augment)


def calibration_of(info: dict, key: str = "calibration") -> Calibration | None:
    raw = info.get(key)
    return None if raw is None else calibration_from_dict(raw)


def randomised_views(model: SavltModel, info: dict, samples: list[Sample]) -> list[np.ndarray]:
    """Features of :data:`GUARD_VIEWS` randomised views of the scans (the training-time
    scanner randomisation at :data:`GUARD_VIEW_P`), each view seeded by its index so that
    every candidate, the model-changing ones too, sees the very same images."""
    out = []
    for k in range(GUARD_VIEWS):
        views = image_set(info, samples, scanner_augment=GUARD_VIEW_P)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(k)
            out.append(predict(model, views, BATCH)[2])
    return out


def tent_features(
    model: SavltModel, info: dict, samples: list[Sample], inductive: Calibration
) -> AdaptedFeatures:
    """The scans' features, and those of their randomised views, after TENT on them."""
    state = tent_state(model, image_set(info, samples), inductive)
    with applied(model, state):
        feats = predict(model, image_set(info, samples), BATCH)[2]
        return AdaptedFeatures(feats, tuple(randomised_views(model, info, samples)))


def site_guard(
    model: SavltModel, info: dict, samples: list[Sample] | None, features: np.ndarray
) -> GuardChoice | None:
    """The label-free guard's pick for these scans (their ``features`` as the model gives
    them; :mod:`savlt_model.adaptation`), or None for a model exported without a
    calibration. With the scans' ``samples``, TENT and the randomised views are computed
    here; without, only the feature maps are candidates."""
    inductive = calibration_of(info)
    return None if inductive is None else guard_at_site(model, info, samples, features, inductive)


def guard_at_site(
    model: SavltModel,
    info: dict,
    samples: list[Sample] | None,
    features: np.ndarray,
    inductive: Calibration,
) -> GuardChoice:
    """:func:`site_guard` for a model whose calibration ``inductive`` is known."""
    enough = samples is not None and len(samples) >= MIN_SCANS  # fewer: all refused anyway
    return guard(
        features,
        model.classifier().cpu().numpy(),
        list(model.positive),
        inductive,
        calibration_of(info, "centre_calibration"),
        float(info["config"]["calibration"]["shift_threshold"]),
        views=randomised_views(model, info, samples) if enough else (),
        adapted={"tent": tent_features(model, info, samples, inductive)} if enough else None,
    )


def warn_if_shifted(
    model: SavltModel, info: dict, samples: list[Sample] | None, features: np.ndarray, where: str
) -> float | None:
    """Warn when the scans' features sit far from the training hospitals' reference, with
    the guard's advice; the score (:func:`savlt_model.calibration.shift_score`) or None
    without a reference."""
    cal = calibration_of(info)
    if cal is None:
        return None
    score = shift_score(features, cal.reference)
    if score > float(info["config"]["calibration"]["shift_threshold"]):
        picked = site_guard(model, info, samples, features)
        assert picked is not None  # a calibration exists
        advice = (
            f"the label-free guard picks {picked.choice!r} ({picked.reason}; "
            f"{picked.referral_rate:.0%} of these scans would be referred); "
            "`savlt site-check` on this folder reports why"
        )
        warn_on_score(info, score, where, advice)
    return score


def warn_on_score(info: dict, score: float, where: str, advice: str) -> None:
    threshold = float(info["config"]["calibration"]["shift_threshold"])
    if score > threshold:
        log.warning(
            "%s: shift score %.2f exceeds %.2f: these scans are out of the training "
            "distribution (another scanner or protocol?); predictions may be unreliable: %s",
            where,
            score,
            threshold,
            advice,
        )


def predict_images(model_dir: Path, paths: Sequence[Path], on_bad_file: str = "stop") -> list[dict]:
    """Per image (per frame of a DICOM volume): ``file``, ``class``, ``probability`` (of that
    class: the confidence), ``decision`` (the class, or "refer" below the model's referral
    threshold, :mod:`savlt_model.referral`), ``high_risk`` (summed probability of the
    positive classes) and ``probs`` (class -> probability).

    Images go through the same checks, decoding and normalisation as in training (an
    ImageSet of unlabelled samples) and the same evaluation loop
    (:func:`savlt_model.evaluation.predict`); a missing or unreadable file stops or, with
    ``on_bad_file="skip"``, is left out with a warning. The probabilities are the model's
    calibrated ones (temperature, and the site's re-centring after ``savlt calibrate``). A
    shift warning is logged for the whole set.
    """
    if not paths:
        raise SavltError("no images given")
    listed = [Listed(Path(p), 0, str(p)) for p in paths]  # the label is unused here
    samples = expand_files(listed, "predict", on_bad_file, skip_hint=SKIP_HINT)
    if not samples:
        raise SavltError("none of the given images is readable")
    model, info = load_model(model_dir)
    probs, _, feats = predict(model, image_set(info, samples), BATCH)
    warn_if_shifted(model, info, samples, feats, f"{len(samples)} image(s)")
    cal = calibration_of(info)
    if cal is not None:
        probs = cal.probs(feats, model.classifier().cpu().numpy())
    high = binary_scores(probs, model.positive)
    threshold = 0.0 if cal is None or cal.refer_below is None else cal.refer_below
    decisions = decide(probs, model.classes, threshold)
    rows: list[dict] = []
    for sample, p, h, d in zip(samples, probs, high, decisions, strict=True):
        best = int(np.argmax(p))
        rows.append(
            {
                "file": sample.key,
                "class": model.classes[best],
                "probability": float(p[best]),
                "decision": d,
                "high_risk": float(h),
                "probs": dict(zip(model.classes, map(float, p), strict=True)),
            }
        )
    return rows


def evaluate_folder(
    model_dir: Path,
    center_dir: Path,
    out_dir: Path,
    recentre: bool = False,
    on_bad_file: str = "stop",
) -> dict:
    """Score the model on a labelled centre folder ``ROOT/<centre>`` (``images/<class>/...``;
    missing or unreadable images stop, or are skipped with ``on_bad_file="skip"``).

    Writes ``results.json``, ``summary.json``, confusion, ROC and reliability PNGs under
    ``figures/`` and ``report.md`` into ``out_dir``; returns the metrics (seven keys,
    ``confusion``, ``n``, and ECE, Brier and shift score with a calibrated model). With
    ``recentre`` the ``<method>+cal`` records re-centre on this folder's own scans.
    """
    center_dir, out_dir = Path(center_dir), Path(out_dir)
    model, info = load_model(model_dir)
    root, center = center_dir.parent, center_dir.name
    samples = scan_center(root, center, model.classes, on_bad_file, skip_hint=SKIP_HINT)
    dataset = image_set(info, samples)
    synthetic = is_synthetic(root)
    method, seed = str(info["method"]), int(info["seed"])
    tag = f"{method}_seed{seed}"
    run = Finish(out_dir, tag, method, seed, None, synthetic)
    centre = calibration_of(info, "centre_calibration") if recentre else None
    if recentre and centre is None:
        raise SavltError(f"{model_dir}: exported without a centre calibration; drop --recentre")
    calibrations = (calibration_of(info), centre) if "calibration" in info else None
    scores, records = finish_model(
        model, {center: dataset}, BATCH, run, adapter_cfg=None, calibrations=calibrations
    )
    if "shift_score" in scores[center].metrics:  # scored with the model's reference
        advice = f"`savlt site-check {center_dir}` says which adaptation is safe"
        warn_on_score(info, scores[center].metrics["shift_score"], str(center_dir), advice)
    write_results(out_dir / "results.json", records)
    title = f"Exported model {Path(model_dir).name} ({tag}) on {center_dir}"
    write_summary(out_dir / "summary.json", records, {"title": title, "synthetic": synthetic})
    write_report(out_dir)
    return scores[center].metrics


def unlabelled_scans(folder: Path, on_bad_file: str = "stop") -> list[Sample]:
    """Every readable image below ``folder`` (any layout, hidden files ignored, a DICOM
    volume frame by frame), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SavltError(f"--data {folder} is not a folder; give this site's folder of scans")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SCAN_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise SavltError(
            f"--data {folder} holds no images ({', '.join(sorted(SCAN_SUFFIXES))}); "
            "point it at the site's scans"
        )
    listed = [Listed(p, 0, str(p.relative_to(folder))) for p in files]
    return expand_files(listed, str(folder), on_bad_file, skip_hint=SKIP_HINT)


def calibrate_model(
    model_dir: Path, folder: Path, out: Path, min_scans: int = 10, on_bad_file: str = "stop"
) -> dict:
    """Write ``out``: a copy of MODEL_DIR adapted to one site's unlabelled scans as the
    label-free guard decides (:func:`savlt_model.adaptation.site_calibration`): re-centred
    or re-standardised onto the training hospitals' reference where that is safe, else as
    trained; with the guard's referral threshold for the site. Nothing but the site's mean
    feature (and spread) is kept, no image and no per-scan feature. Returns a summary.
    """
    model_dir, out = Path(model_dir), Path(out)
    model, info = load_model(model_dir)
    inductive, centre = calibration_of(info), calibration_of(info, "centre_calibration")
    if inductive is None or centre is None:
        raise SavltError(
            f"{model_dir} has no centre calibration (exported before it existed, or trained "
            "with calibration.recentre: false); re-export it from its run"
        )
    samples = unlabelled_scans(folder, on_bad_file)
    if len(samples) < min_scans:
        raise SavltError(
            f"--data {folder} has {len(samples)} scan(s); calibration needs at least "
            f"{min_scans} unlabelled scans of the site"
        )
    feats = predict(model, image_set(info, samples), BATCH)[2]
    picked = guard_at_site(model, info, samples, feats, inductive)
    stored = site_calibration(picked, inductive, centre, feats)
    if out.resolve() != model_dir.resolve():
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
    info = {
        **info,
        "calibration": calibration_to_dict(stored),
        "calibrated_on": {
            "folder": str(Path(folder).resolve()),
            "scans": len(samples),
            "guard_choice": picked.choice,
            "guard_reason": picked.reason,
        },
    }
    write_json(out / HEAD_JSON, info)
    return {
        "scans": len(samples),
        "shift_score": picked.shift,
        "choice": picked.choice,
        "reason": picked.reason,
        "referral_rate": picked.referral_rate,
        "out": str(out),
    }
