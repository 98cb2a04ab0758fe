"""Decode any supported image (raster files, DICOM frames) once, and batch decoded images
(with training augmentation)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from savlt_model.data.augment import ScannerAugment
from savlt_model.data.dicom import dicom_frame, is_dicom
from savlt_model.data.folders import Sample
from savlt_model.data.intensity import standardise_rgb
from savlt_model.errors import SavltError

_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _wide_to_uint8(values: np.ndarray, unit_float: bool = False) -> np.ndarray:
    """Map 16-bit, 32-bit or float grey values to uint8.

    The scale is the smallest common detector range that holds the image's maximum:
    8-bit (≤ 255, 8-bit data saved in a 16-bit file), 12-bit (≤ 4095) or 16-bit (≤ 65535);
    a float image (``unit_float``) with values ≤ 1 is taken as [0, 1]; a 32-bit image
    beyond 65535 uses its own maximum. Scaling by the range rather than by each image's own
    maximum keeps the brightness of images comparable within a data set. Negative values
    clip to 0.
    """
    a = np.asarray(values, dtype=np.float64)
    peak = float(a.max(initial=0.0))
    if unit_float and peak <= 1.0:
        full = 1.0
    else:
        full = next((r for r in (255.0, 4095.0, 65535.0) if peak <= r), peak)
    return np.round(np.clip(a / full, 0.0, 1.0) * 255.0).astype(np.uint8)


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode to an HxWx3 uint8 array; transparency is composited on black."""
    if img.mode in _WIDE_MODES:
        return _grey_rgb(_wide_to_uint8(np.asarray(img), unit_float=img.mode == "F"))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        return np.round(rgb).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def dicom_rgb(pixels: np.ndarray, photometric: str) -> np.ndarray:
    """A DICOM frame to HxWx3 uint8: 8-bit as is, wider data by :func:`_wide_to_uint8`
    (the same ranges as a 16-bit PNG), MONOCHROME1 (white is zero) inverted."""
    if photometric == "RGB":
        return np.asarray(pixels, dtype=np.uint8)
    grey = pixels if pixels.dtype == np.uint8 else _wide_to_uint8(pixels)
    return _grey_rgb(255 - grey if photometric == "MONOCHROME1" else grey)


def _read_rgb(path: Path, frame: int | None) -> np.ndarray:
    if is_dicom(path):
        return dicom_rgb(*dicom_frame(path, frame))
    with Image.open(path) as img:
        return to_rgb(img)


def load_image(
    path: Path, size: int, intensity: str = "none", frame: int | None = None
) -> torch.Tensor:
    """Decode any supported image (or one frame of a DICOM file) to a uint8 (3, size, size)
    tensor.

    ``intensity`` standardises the B-scan at its own resolution first
    (:func:`savlt_model.data.intensity.standardise_rgb`). The image is then squashed to a
    square with antialiased bicubic resampling rather than cropped: OCT B-scans are wide
    and their whole width is tissue.
    """
    where = path if frame is None else f"{path} frame {frame}"
    try:
        rgb = standardise_rgb(_read_rgb(path, frame), intensity)
    except SavltError:
        raise
    except Exception as err:  # PIL and pydicom raise many types for broken files
        raise SavltError(
            f"cannot decode image {where} ({err}) — replace or delete the file"
        ) from err
    resized = Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()


_DECODED: dict[tuple[Path, int | None, int, str], torch.Tensor] = {}


def _decoded(samples: list[Sample], size: int, intensity: str) -> list[torch.Tensor]:
    """The samples' images through a process-wide cache (seeds and methods reuse them
    without decoding again). Those not cached yet are decoded on torch's share of the cores:
    PIL, NumPy and torch release the GIL, so threads decode side by side, each image exactly
    as alone."""
    keys = [(Path(s.path), s.frame, size, intensity) for s in samples]
    missing = list(dict.fromkeys(k for k in keys if k not in _DECODED))
    if missing:  # every later set of the same images: no pool, no threads
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            decoded = pool.map(lambda k: load_image(k[0], size, intensity, k[1]), missing)
            _DECODED.update(zip(missing, decoded, strict=True))
    return [_DECODED[k] for k in keys]


class ImageSet(Dataset):
    """Samples decoded once (in the constructor) and kept in memory as uint8.

    Eager decoding means data-loader workers inherit the decoded images instead of each
    decoding them again, and a broken file fails before training starts. Augmentation
    draws from torch's global RNG (seeded per worker by :func:`make_loader`'s generator
    when ``num_workers > 0``; seed torch yourself for ``num_workers == 0``).

    ``train`` adds the random crop and flip; ``scanner_augment`` > 0 re-images each scan
    through a random scanner (:class:`ScannerAugment`, also without ``train``: randomised
    views of a site's scans); ``views`` > 1 returns, per scan, a (views, 3, H, W) stack of
    the clean scan and ``views - 1`` independently randomised ones (the consistency term).
    """

    def __init__(
        self,
        samples: list[Sample],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        intensity: str = "none",
        scanner_augment: float = 0.0,
        views: int = 1,
    ) -> None:
        assert views == 1 or scanner_augment > 0, "randomised views need scanner_augment > 0"
        self.samples = list(samples)
        self.labels = [s.label for s in self.samples]
        self.images = _decoded(self.samples, size, intensity)
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
        self.scanner = ScannerAugment(scanner_augment, intensity) if scanner_augment > 0 else None
        self.views = views

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        pixels = image.float() / 255.0
        if self.scanner is not None and self.views > 1:
            stack = [pixels, *(self.scanner(pixels) for _ in range(self.views - 1))]
            return (torch.stack(stack) - self.mean) / self.std, self.labels[index]
        if self.scanner is not None:
            pixels = self.scanner(pixels)
        return (pixels - self.mean) / self.std, self.labels[index]


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
