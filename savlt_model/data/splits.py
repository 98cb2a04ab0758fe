"""Train/val/test splits of a centre (saved, reused) and seeded K-shot draws (cached).

With patient ids (:attr:`Sample.patient`) the split is grouped by patient, so no patient's
B-scans sit in two splits, and the K-shot draw takes different patients first. Without
them the split is per image, exactly as in the original study.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from savlt_model.atomic import write_json
from savlt_model.data.folders import REGENERATE, Sample, read_json_file, short_list
from savlt_model.errors import SavltError

log = logging.getLogger(__name__)

SPLIT_PARTS = ("train", "val", "test")


def has_patients(samples: Sequence[Sample]) -> bool:
    return any(s.patient is not None for s in samples)


def patient_of(sample: Sample) -> str:
    """The sample's patient; an image without one is its own patient (NUL never occurs in
    an id read from a file name, a CSV cell or a DICOM tag)."""
    return sample.patient if sample.patient is not None else f"\0{sample.key}"


def _save_or_warn(path: Path, obj: Any, what: str) -> None:
    """Save atomically; on a read-only data folder keep going (the draw is seeded anyway)."""
    try:
        write_json(path, obj)
    except OSError as err:
        log.warning("could not save %s to %s (%s); using it unsaved", what, path, err)


def _part_sizes(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Largest-remainder rounding, then lend one image to every empty (wanted) part.

    With ≥ 3 images each part with a positive fraction gets at least one, so no class
    vanishes from val or test on a small data set.
    """
    exact = [f * n for f in fractions]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    wanted = [i for i in range(3) if fractions[i] > 0]
    if n >= len(wanted):
        for i in wanted:
            if sizes[i] == 0:
                donor = max(range(3), key=lambda j: (sizes[j], -j))
                sizes[donor] -= 1
                sizes[i] += 1
    return sizes


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SavltError(
            f"data.split is {list(fractions)} — give three non-negative fractions "
            "(train, val, test) that sum to 1"
        )
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def _load_split(path: Path, samples: list[Sample]) -> dict[str, list[Sample]]:
    raw = read_json_file(path, "split file")
    if (
        not isinstance(raw, dict)
        or set(raw) != set(SPLIT_PARTS)
        or not all(isinstance(v, list) and all(isinstance(k, str) for k in v) for v in raw.values())
    ):
        raise SavltError(
            f'{path} must be {{"train": [keys], "val": [keys], "test": [keys]}} — {REGENERATE}'
        )
    by_key = {s.key: s for s in samples}
    listed = [k for part in SPLIT_PARTS for k in raw[part]]
    unknown = sorted({k for k in listed if k not in by_key})
    if unknown:
        raise SavltError(
            f"split file {path} names {len(unknown)} image(s) not in the data: "
            f"{short_list(unknown)} — {REGENERATE}"
        )
    if len(set(listed)) != len(listed):
        raise SavltError(f"split file {path} lists some images more than once — {REGENERATE}")
    missing = sorted(set(by_key) - set(listed))
    if missing:
        raise SavltError(
            f"split file {path} misses {len(missing)} image(s): {short_list(missing)} — "
            f"{REGENERATE}"
        )
    part_of: dict[str, str] = {}
    for part in SPLIT_PARTS:
        for k in raw[part]:
            sample = by_key[k]
            if sample.patient is None:
                continue
            first = part_of.setdefault(sample.patient, part)
            if first != part:
                raise SavltError(
                    f"split file {path} puts patient {sample.patient} in {first} and {part} "
                    f"(e.g. {k}) — {REGENERATE} grouped by patient, or move the patient's "
                    "images into one part"
                )
    order = {s.key: i for i, s in enumerate(samples)}
    return {
        part: sorted((by_key[k] for k in raw[part]), key=lambda s: order[s.key])
        for part in SPLIT_PARTS
    }


def _deal(
    samples: list[Sample],
    fractions: tuple[float, float, float],
    seed: int,
    unit: Callable[[Sample], str],
) -> dict[str, set[str]]:
    """Shuffle each class's units (images, or patients) and cut them by ``fractions``.

    A unit's class is the most frequent label among its images (ties: the first class), so
    a patient counts once, in one class. Per image this is the original study's split, and
    per patient the same draw one level up: stratified, and every part gets a unit of each
    class that has at least three. (scikit-learn's StratifiedGroupKFold needs 20 folds for
    45/15/40 and, with ~2 patients per fold, left a class without any val patient on a
    36-patient centre; GroupShuffleSplit does not stratify.)
    """
    rng = np.random.default_rng(seed)
    members: dict[str, list[Sample]] = {}
    for s in samples:
        members.setdefault(unit(s), []).append(s)
    label_of = {
        u: min(Counter(s.label for s in ms).items(), key=lambda kv: (-kv[1], kv[0]))[0]
        for u, ms in members.items()
    }
    chosen: dict[str, set[str]] = {part: set() for part in SPLIT_PARTS}
    for label in sorted(set(label_of.values())):
        units = sorted(u for u, lab in label_of.items() if lab == label)
        shuffled = [units[i] for i in rng.permutation(len(units))]
        start = 0
        for part, size in zip(SPLIT_PARTS, _part_sizes(len(units), fractions), strict=True):
            chosen[part].update(s.key for u in shuffled[start : start + size] for s in members[u])
            start += size
    return chosen


def split_center(
    samples: list[Sample],
    split_file: Path,
    fractions: tuple[float, float, float] = (0.45, 0.15, 0.40),
    seed: int = 1,
) -> dict[str, list[Sample]]:
    """Split a centre stratified by class into train/val/test, or reuse the saved split.

    With patient ids the split is grouped by patient, else per image (:func:`_deal`). The
    split is saved to ``split_file`` the first time (the protocol puts it in the work
    directory, never in the data folder), so every later run, seed and method sees the
    same test images; an existing file always wins over ``fractions`` and ``seed``, but one
    that puts a patient in two parts is refused. Each part keeps the order of ``samples``.
    """
    path = Path(split_file)
    if path.is_file():
        return _load_split(path, samples)
    fractions = _check_fractions(fractions)
    unit = patient_of if has_patients(samples) else (lambda s: s.key)
    chosen = _deal(samples, fractions, seed, unit)
    split = {part: [s for s in samples if s.key in chosen[part]] for part in SPLIT_PARTS}
    _save_or_warn(path, {part: [s.key for s in split[part]] for part in SPLIT_PARTS}, "split")
    return split


def few_shot(
    samples: list[Sample],
    shots: int,
    seed: int,
    classes: Sequence[str],
    cache: Path | None = None,
    where: str = "",
) -> list[Sample]:
    """Draw ``shots`` images per class, deterministically from ``seed``.

    The draw sorts by key first, so it does not depend on the order of ``samples``. With
    patient ids it takes one image from each of as many different patients as it can
    before a second image of any patient (:func:`_patients_first`), so K shots span K
    patients when the class has them. A class with fewer than ``shots`` images contributes
    all of them (with a warning naming ``where`` and the class). With ``cache`` the chosen
    keys are saved there and reused on the next call, as the original study caches its
    few-shot sets per seed. The protocol reduces the validation split the same way:
    callers use ``few_shot(val, min(shots, 16), seed, classes)``. The result is sorted by
    key.
    """
    if shots < 1:
        raise SavltError(f"data.shots is {shots} — use at least 1 image per class")
    by_key = {s.key: s for s in samples}
    if cache is not None and Path(cache).is_file():
        return _load_few_shot(Path(cache), by_key, shots, seed)
    rng = np.random.default_rng(seed)
    ordered = sorted(samples, key=lambda s: s.key)
    grouped = has_patients(ordered)
    chosen: list[Sample] = []
    for label, name in enumerate(classes):
        pool = [s for s in ordered if s.label == label]
        if len(pool) <= shots:
            if len(pool) < shots:
                log.warning(
                    "%sclass '%s' has %d image(s), fewer than %d shots; using all of them",
                    f"{where}, " if where else "",
                    name,
                    len(pool),
                    shots,
                )
            chosen.extend(pool)
        elif grouped:
            chosen.extend(_patients_first(pool, shots, rng))
        else:
            chosen.extend(pool[i] for i in sorted(rng.choice(len(pool), shots, replace=False)))
    chosen.sort(key=lambda s: s.key)
    if cache is not None:
        _save_or_warn(
            Path(cache),
            {"seed": seed, "shots": shots, "keys": [s.key for s in chosen]},
            "few-shot set",
        )
    return chosen


def _patients_first(pool: list[Sample], shots: int, rng: np.random.Generator) -> list[Sample]:
    """``shots`` of ``pool`` in a random order that ranks every patient's first image before
    any patient's second one, so the draw covers as many patients as possible."""
    seen: Counter[str] = Counter()
    ranked = []
    for position, i in enumerate(rng.permutation(len(pool))):
        patient = patient_of(pool[i])
        ranked.append((seen[patient], position, int(i)))
        seen[patient] += 1
    return [pool[i] for i in sorted(i for _, _, i in sorted(ranked)[:shots])]


def _load_few_shot(path: Path, by_key: dict[str, Sample], shots: int, seed: int) -> list[Sample]:
    raw = read_json_file(path, "few-shot cache")
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
        raise SavltError(f'few-shot cache {path} must hold {{"keys": [...]}} — {REGENERATE}')
    if raw.get("seed") != seed or raw.get("shots") != shots:
        raise SavltError(
            f"few-shot cache {path} was drawn for seed {raw.get('seed')} and "
            f"{raw.get('shots')} shots, not seed {seed} and {shots} shots — {REGENERATE}"
        )
    unknown = [k for k in raw["keys"] if k not in by_key]
    if unknown:
        raise SavltError(
            f"few-shot cache {path} names {len(unknown)} image(s) not in the split: "
            f"{short_list(unknown)} — {REGENERATE}"
        )
    return sorted((by_key[k] for k in set(raw["keys"])), key=lambda s: s.key)
