"""Train/val/test splits of a centre (saved, reused) and seeded K-shot draws (cached)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from savlt_model.atomic import write_json
from savlt_model.data.folders import REGENERATE, Sample, read_json_file, short_list
from savlt_model.errors import SavltError

log = logging.getLogger(__name__)

SPLIT_PARTS = ("train", "val", "test")


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
    order = {s.key: i for i, s in enumerate(samples)}
    return {
        part: sorted((by_key[k] for k in raw[part]), key=lambda s: order[s.key])
        for part in SPLIT_PARTS
    }


def split_center(
    root: Path,
    center: str,
    samples: list[Sample],
    fractions: tuple[float, float, float] = (0.45, 0.15, 0.40),
    split_file: Path | None = None,
    seed: int = 1,
) -> dict[str, list[Sample]]:
    """Split a centre per class into train/val/test, or reuse the saved split.

    The split is saved (default ``ROOT/<centre>/split.json``) the first time, so every
    later run, seed and method sees the same test images; an existing file always wins
    over ``fractions`` and ``seed``. Each part keeps the order of ``samples``.
    """
    path = Path(split_file) if split_file is not None else Path(root) / center / "split.json"
    if path.is_file():
        return _load_split(path, samples)
    fractions = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    chosen: dict[str, set[str]] = {part: set() for part in SPLIT_PARTS}
    for label in sorted({s.label for s in samples}):
        keys = sorted(s.key for s in samples if s.label == label)
        shuffled = [keys[i] for i in rng.permutation(len(keys))]
        start = 0
        for part, size in zip(SPLIT_PARTS, _part_sizes(len(keys), fractions), strict=True):
            chosen[part].update(shuffled[start : start + size])
            start += size
    split = {part: [s for s in samples if s.key in chosen[part]] for part in SPLIT_PARTS}
    _save_or_warn(path, {part: [s.key for s in split[part]] for part in SPLIT_PARTS}, "split")
    return split


def few_shot(
    samples: list[Sample],
    shots: int,
    seed: int,
    num_classes: int,
    cache: Path | None = None,
) -> list[Sample]:
    """Draw ``shots`` images per class, deterministically from ``seed``.

    The draw sorts by key first, so it does not depend on the order of ``samples``. A class
    with fewer than ``shots`` images contributes all of them (with a warning). With
    ``cache`` the chosen keys are saved there and reused on the next call, as the original
    study caches its few-shot sets per seed. The protocol reduces the validation split the
    same way: callers use ``few_shot(val, min(shots, 16), seed, num_classes)``. The result
    is sorted by key.
    """
    if shots < 1:
        raise SavltError(f"data.shots is {shots} — use at least 1 image per class")
    by_key = {s.key: s for s in samples}
    if cache is not None and Path(cache).is_file():
        return _load_few_shot(Path(cache), by_key, shots, seed)
    rng = np.random.default_rng(seed)
    ordered = sorted(samples, key=lambda s: s.key)
    chosen: list[Sample] = []
    for label in range(num_classes):
        pool = [s for s in ordered if s.label == label]
        if len(pool) <= shots:
            if len(pool) < shots:
                log.warning(
                    "class %d has %d image(s), fewer than %d shots; using all of them",
                    label,
                    len(pool),
                    shots,
                )
            chosen.extend(pool)
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
