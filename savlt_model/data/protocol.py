"""The original study's data protocol (the only "protocol" here), shared by every run.

Train on a K-shot subset of the mixed centre's train split (val reduced to min(K, 16) per
class); test on the mixed test split and on every external centre in full. Hospital
partitions (:mod:`savlt_model.data.partition`) split these same sets further, so every method
is scored on the same test data.

Nothing is ever written into the DATA folder: a centre's split and few-shot draws are saved
under the work directory (:func:`center_work_dir`), and a split file is read from
``data.split_file`` when one is named.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from savlt_model.config import Config, resolve_path
from savlt_model.data.folders import Sample, load_sites, scan_center
from savlt_model.data.manifest import CENTRE_FIELD, manifest_file, read_manifest
from savlt_model.data.splits import (
    SPLIT_PARTS,
    few_shot,
    has_patients,
    patient_of,
    split_center,
)
from savlt_model.errors import SavltError

VAL_SHOTS_MAX = 16
DEFAULT_WORK_DIR = "runs/work"  # when data.work_dir is not set (relative to the project)
log = logging.getLogger(__name__)


@dataclass
class CenterData:
    """One centre's samples after the split: K-shot train, reduced val and full test."""

    name: str
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    sites: dict[str, str] | None = None  # sample key -> sub-site, when the centre has sites.json


def data_root(cfg: Config) -> Path:
    """The DATA folder, which must exist (``synthetic.write.ensure_data`` generates one)."""
    root = resolve_path(cfg.data.root)
    if not root.is_dir():
        raise SavltError(
            f"data.root: {root} does not exist; point it at a DATA folder, or generate one "
            "with `savlt synth --out DIR` (savlt train/simulate do it when "
            "data.synthetic.enabled is true)"
        )
    return root


def center_work_dir(cfg: Config, root: Path, center: str) -> Path:
    """Where one centre's split and few-shot draws are saved: ``<work dir>/<DATA folder
    name>-<8 hex digits of its absolute path>/<centre>``, outside the DATA folder.

    The hash keeps two DATA folders with the same centre names apart in one work directory.
    """
    work = resolve_path(cfg.data.work_dir or DEFAULT_WORK_DIR).resolve()
    root = Path(root).resolve()
    if work == root or root in work.parents:
        raise SavltError(
            f"data.work_dir: {work} is inside the DATA folder {root}; the data folder is "
            "never written to, so choose a folder outside it"
        )
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return work / f"{root.name}-{tag}" / center


def is_synthetic(root: Path) -> bool:
    return (root / "synth.json").is_file()


def center_samples(cfg: Config, root: Path, center: str) -> list[Sample]:
    """Every labelled sample of one centre, from its class folders or from ``data.manifest``,
    with its patient when the data can tell."""
    d = cfg.data
    if d.manifest is None:
        return scan_center(root, center, cfg.task.classes, d.on_bad_file, d.patient_pattern)
    return read_manifest(
        manifest_file(root, d.manifest, center),
        center,
        cfg.task.classes,
        d.on_bad_file,
        d.patient_pattern,
        per_centre=CENTRE_FIELD in d.manifest,
    )


def split_parts(cfg: Config, root: Path, center: str) -> dict[str, list[Sample]]:
    """One centre's train/val/test split (saved and reused), grouped by patient when the
    samples have patient ids; the log says which, so a per-image split is never silent."""
    samples = center_samples(cfg, root, center)
    if cfg.data.split_file:
        split_file = resolve_path(cfg.data.split_file)
    else:
        split_file = center_work_dir(cfg, root, center) / "split.json"
    parts = split_center(samples, split_file, tuple(cfg.data.split))
    if has_patients(samples):
        log.info(
            "centre %s: split by patient (%d patients): %s",
            center,
            len({patient_of(s) for s in samples}),
            ", ".join(f"{p} {len({patient_of(s) for s in parts[p]})}" for p in SPLIT_PARTS),
        )
    else:
        log.info(
            "centre %s: no patient ids, so the split is per image: one patient's B-scans "
            "may be in train and test (set data.patient_pattern, a manifest patient column "
            "or use DICOM files with PatientID)",
            center,
        )
    for label, name in enumerate(cfg.task.classes):
        empty = [p for p in SPLIT_PARTS if not any(s.label == label for s in parts[p])]
        if empty and any(s.label == label for s in samples):
            log.warning(
                "centre %s, class '%s' has no image in %s (too few patients or images)",
                center,
                name,
                "/".join(empty),
            )
    return parts


def prepare_center(
    cfg: Config, root: Path, center: str, seed: int, with_sites: bool = False
) -> CenterData:
    """Split one centre (split saved and reused) and draw the seeded K-shot train and val sets
    (saved and reused, in the centre's work directory)."""
    parts = split_parts(cfg, root, center)
    k, classes = cfg.data.shots, cfg.task.classes
    cache = center_work_dir(cfg, root, center) / "few_shot"
    train = few_shot(
        parts["train"],
        k,
        seed,
        classes,
        cache / f"train_k{k}_seed{seed}.json",
        where=f"centre {center} train split",
    )
    val_k = min(k, VAL_SHOTS_MAX)
    val = few_shot(
        parts["val"],
        val_k,
        seed,
        classes,
        cache / f"val_k{val_k}_seed{seed}.json",
        where=f"centre {center} val split",
    )
    sites = (
        load_sites(root, center, [s for p in SPLIT_PARTS for s in parts[p]]) if with_sites else None
    )
    return CenterData(center, train, val, parts["test"], sites)


def external_test(cfg: Config, root: Path, center: str) -> list[Sample]:
    """External centres are test-only: every image counts."""
    return center_samples(cfg, root, center)


def paper_protocol(
    cfg: Config, seed: int, with_sites: bool = False
) -> tuple[CenterData, dict[str, list[Sample]]]:
    """(training centre data, {centre: test samples}) for the original protocol."""
    root = data_root(cfg)
    train_center = prepare_center(cfg, root, cfg.data.train_center, seed, with_sites)
    tests = {cfg.data.train_center: train_center.test}
    for center in [*cfg.data.external_centers, *cfg.data.held_out_centers]:
        tests[center] = external_test(cfg, root, center)
    return train_center, tests
