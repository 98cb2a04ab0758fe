"""Data protocol: scan centres, split, draw few-shot sets, decode images, batch them.

Layout: ``ROOT/<centre>/images/<class>/<file>``; the label of an image is the position of
its class in ``task.classes``. Every sample carries a ``key`` (``"<class>/<filename>"``),
the stable id that split files, few-shot caches and ``sites.json`` refer to, so that a run
can be repeated on another machine where ROOT lives elsewhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from savlt_model.atomic import write_json
from savlt_model.errors import SavltError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
SPLIT_PARTS = ("train", "val", "test")
_SHOWN = 5  # how many offending names a message lists before "..."


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    key: str  # "<class>/<filename>": stable id relative to the centre


def _names(items: Sequence[str]) -> str:
    """A short list for one-line messages: the first few names, then how many more."""
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_readable_image(path: Path) -> bool:
    """Cheap integrity check: header and (for PNG) chunk CRCs, without decoding pixels."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return False
    return True


def scan_center(
    root: Path, center: str, classes: list[str], on_bad_file: str = "stop"
) -> list[Sample]:
    """List the images of one centre, ordered by label (``classes`` order) then filename.

    Hidden files, non-image files (``.json``, ``.txt``, ...) and sub-folders inside a class
    folder are ignored. Unreadable images stop the scan (``on_bad_file="stop"``) or are
    skipped with one warning per centre (``"skip"``), so one broken file never crashes a
    long run half-way through.
    """
    if on_bad_file not in ("stop", "skip"):
        raise SavltError(f"data.on_bad_file is {on_bad_file!r}; use 'stop' or 'skip'")
    root = Path(root)
    layout = f"{root}/{center}/images/<class>/<image files>"
    center_dir = root / center
    if not center_dir.is_dir():
        found = (
            sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
            if root.is_dir()
            else []
        )
        raise SavltError(
            f"centre folder {center_dir} not found (centres in {root}: {found or 'none'}) — "
            f"fix data.root or the centre name; expected layout {layout}"
        )
    images = center_dir / "images"
    if not images.is_dir():
        raise SavltError(f"{images} not found — expected layout {layout}")
    folders = {p.name for p in images.iterdir() if p.is_dir() and _visible(p)}
    extra = sorted(folders - set(classes))
    if extra:
        raise SavltError(
            f"centre {center} has classes not in task.classes: {extra} — "
            "add them to task.classes or remove the folders"
        )
    samples: list[Sample] = []
    bad: list[str] = []
    for label, cls in enumerate(classes):
        folder = images / cls
        if not folder.is_dir():
            raise SavltError(
                f"centre {center} has no folder for class '{cls}' ({folder}) — "
                "add its images or remove the class from task.classes"
            )
        files = sorted(
            p
            for p in folder.iterdir()
            if _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        kept = 0
        for path in files:
            key = f"{cls}/{path.name}"
            if not _is_readable_image(path):
                if on_bad_file == "stop":
                    raise SavltError(
                        f"unreadable image {path} — replace or delete it, "
                        "or set data.on_bad_file: skip"
                    )
                bad.append(key)
                continue
            samples.append(Sample(path=path, label=label, key=key))
            kept += 1
        if kept == 0:
            raise SavltError(
                f"class '{cls}' of centre {center} has no readable images in {folder} "
                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}) — "
                "add images or remove the class from task.classes"
            )
    if bad:
        log.warning("centre %s: skipped %d unreadable image(s): %s", center, len(bad), _names(bad))
    return samples


_REGENERATE = "delete the file to regenerate it"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SavltError(f"cannot read {what} {path} ({err}) — {_REGENERATE}") from err


def _save_or_warn(path: Path, obj: Any, what: str) -> None:
    """Save atomically; on a read-only data folder keep going (the draw is seeded anyway)."""
    try:
        write_json(path, obj)
    except OSError as err:
        log.warning("could not save %s to %s (%s); using it unsaved", what, path, err)


def load_sites(root: Path, center: str, samples: list[Sample]) -> dict[str, str]:
    """Map each sample key to its sub-site, from ``ROOT/<centre>/sites.json``.

    A mixed centre pools several hospitals; the sites let the federated protocol split it
    into hospitals along real acquisition boundaries. Entries for keys that are not among
    ``samples`` (e.g. skipped files) are ignored.
    """
    path = Path(root) / center / "sites.json"
    if not path.is_file():
        raise SavltError(
            f"{path} not found — create it as a JSON object mapping "
            '"<class>/<filename>" to a site name for every image of the centre'
        )
    raw = _read_json(path, "sites file")
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v for v in raw.values()):
        raise SavltError(
            f'{path} must be a JSON object mapping "<class>/<filename>" to a non-empty '
            "site name — fix its content"
        )
    missing = [s.key for s in samples if s.key not in raw]
    if missing:
        raise SavltError(
            f"{path} has no site for {len(missing)} image(s): {_names(missing)} — "
            "add them to the file"
        )
    return {s.key: raw[s.key] for s in samples}


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
    raw = _read_json(path, "split file")
    if (
        not isinstance(raw, dict)
        or set(raw) != set(SPLIT_PARTS)
        or not all(isinstance(v, list) and all(isinstance(k, str) for k in v) for v in raw.values())
    ):
        raise SavltError(
            f'{path} must be {{"train": [keys], "val": [keys], "test": [keys]}} — {_REGENERATE}'
        )
    by_key = {s.key: s for s in samples}
    listed = [k for part in SPLIT_PARTS for k in raw[part]]
    unknown = sorted({k for k in listed if k not in by_key})
    if unknown:
        raise SavltError(
            f"split file {path} names {len(unknown)} image(s) not in the data: "
            f"{_names(unknown)} — {_REGENERATE}"
        )
    if len(set(listed)) != len(listed):
        raise SavltError(f"split file {path} lists some images more than once — {_REGENERATE}")
    missing = sorted(set(by_key) - set(listed))
    if missing:
        raise SavltError(
            f"split file {path} misses {len(missing)} image(s): {_names(missing)} — {_REGENERATE}"
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
    raw = _read_json(path, "few-shot cache")
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
        raise SavltError(f'few-shot cache {path} must hold {{"keys": [...]}} — {_REGENERATE}')
    if raw.get("seed") != seed or raw.get("shots") != shots:
        raise SavltError(
            f"few-shot cache {path} was drawn for seed {raw.get('seed')} and "
            f"{raw.get('shots')} shots, not seed {seed} and {shots} shots — {_REGENERATE}"
        )
    unknown = [k for k in raw["keys"] if k not in by_key]
    if unknown:
        raise SavltError(
            f"few-shot cache {path} names {len(unknown)} image(s) not in the split: "
            f"{_names(unknown)} — {_REGENERATE}"
        )
    return sorted((by_key[k] for k in set(raw["keys"])), key=lambda s: s.key)


_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _wide_to_uint8(img: Image.Image) -> np.ndarray:
    """Map a 16-bit, 32-bit or float grey image to uint8.

    The scale is the smallest common detector range that holds the image's maximum:
    8-bit (≤ 255, 8-bit data saved in a 16-bit file), 12-bit (≤ 4095) or 16-bit (≤ 65535);
    a float image with values ≤ 1 is taken as [0, 1]; a 32-bit image beyond 65535 uses its
    own maximum. Scaling by the range rather than by each image's own maximum keeps the
    brightness of images comparable within a data set. Negative values clip to 0.
    """
    a = np.asarray(img, dtype=np.float64)
    peak = float(a.max(initial=0.0))
    if img.mode == "F" and peak <= 1.0:
        full = 1.0
    else:
        full = next((r for r in (255.0, 4095.0, 65535.0) if peak <= r), peak)
    return np.round(np.clip(a / full, 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode to an HxWx3 uint8 array; transparency is composited on black."""
    if img.mode in _WIDE_MODES:
        return np.repeat(_wide_to_uint8(img)[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        return np.round(rgb).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_image(path: Path, size: int) -> torch.Tensor:
    """Decode any supported image to a uint8 (3, size, size) tensor.

    The image is squashed to a square with antialiased bicubic resampling rather than
    cropped: OCT B-scans are wide and their whole width is tissue.
    """
    try:
        with Image.open(path) as img:
            rgb = _to_rgb(img)
    except Exception as err:  # PIL raises many types for broken files
        raise SavltError(
            f"cannot decode image {path} ({err}) — replace or delete the file"
        ) from err
    resized = Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()


_DECODED: dict[tuple[Path, int], torch.Tensor] = {}


def _decoded(path: Path, size: int) -> torch.Tensor:
    """Process-wide cache: seeds and methods reuse the same images without decoding again."""
    key = (Path(path), size)
    if key not in _DECODED:
        _DECODED[key] = load_image(path, size)
    return _DECODED[key]


class ImageSet(Dataset):
    """Samples decoded once (in the constructor) and kept in memory as uint8.

    Eager decoding means data-loader workers inherit the decoded images instead of each
    decoding them again, and a broken file fails before training starts. Training
    augmentation draws from torch's global RNG (seeded per worker by :func:`make_loader`'s
    generator when ``num_workers > 0``; seed torch yourself for ``num_workers == 0``).
    """

    def __init__(
        self,
        samples: list[Sample],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
    ) -> None:
        self.samples = list(samples)
        self.labels = [s.label for s in self.samples]
        self.images = [_decoded(s.path, size) for s in self.samples]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = (
            v2.Compose(
                [
                    v2.RandomResizedCrop(
                        size,
                        scale=(0.75, 1.0),
                        interpolation=InterpolationMode.BICUBIC,
                        antialias=True,
                    ),
                    v2.RandomHorizontalFlip(),
                ]
            )
            if train
            else None
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return (image.float() / 255.0 - self.mean) / self.std, self.labels[index]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffle order (and worker seeds) follow ``seed`` exactly."""
    if drop_last and len(dataset) < batch_size:
        raise SavltError(
            f"train.batch_size ({batch_size}) exceeds the {len(dataset)} training images, "
            "so no batch would be formed — lower train.batch_size"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
