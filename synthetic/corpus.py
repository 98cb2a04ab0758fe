"""A "many scanners" image corpus for offline pretraining (``savlt pretrain``).

Class-balanced B-scans, each under its own randomised scanner profile drawn from ranges
wider than every site of :mod:`synthetic.centres`, from a seed stream that
:func:`synthetic.write.generate` never uses: no image of an evaluation centre, and none of
their fixed profiles, is ever in it.
"""

from __future__ import annotations

import dataclasses
import io
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from savlt_model.config import CERVICAL_CLASSES
from synthetic.centres import ScannerProfile, draw_axes
from synthetic.render import render

CORPUS_KEY = zlib.crc32(b"savlt-pretrain-corpus")  # a seed stream generate() never draws
JPEG_FRACTION = 0.3  # share of images re-encoded as JPEG, as some viewers export them

# Per-field ranges of the randomised scanner profiles. Each contains, and extends beyond,
# the values of all five fixed profiles in synthetic.centres.PROFILES, so no centre is singled out.
PROFILE_RANGES: dict[str, tuple[float, float]] = {
    "width": (256, 448),
    "height": (160, 288),
    "speckle_looks": (0.9, 4.0),
    "range_db": (26.0, 50.0),
    "gain_db": (-20.0, -6.0),
    "noise_db": (-30.0, -16.0),
    "gamma": (0.7, 1.5),
    "attenuation": (2.5, 7.5),
    "blur_x": (0.5, 3.0),
    "blur_y": (0.4, 1.8),
    "tilt": (0.0, 0.14),
    "sag": (-0.1, 0.14),
    "surface": (0.1, 0.26),
}


def random_profile(rng: np.random.Generator) -> ScannerProfile:
    """One scanner drawn uniformly from :data:`PROFILE_RANGES` (integer image size)."""
    return ScannerProfile(**draw_axes(PROFILE_RANGES, rng))


@dataclass
class Corpus:
    images: torch.Tensor  # (N, 1, size, size) uint8: grey, squashed like data.load_image
    labels: torch.Tensor  # (N,) class index into CERVICAL_CLASSES
    profiles: list[ScannerProfile]
    # how it was drawn, for the pretrained model's provenance file
    info: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"profile_ranges": PROFILE_RANGES, "jpeg_fraction": JPEG_FRACTION}
    )


def make_corpus(
    n: int, size: int, seed: int = 0, progress: bool = False, desc: str = "corpus"
) -> Corpus:
    """Render ``n`` class-balanced B-scans, each with its own random scanner, deterministically.

    Every image is exported as 8-bit (sometimes through JPEG) and squashed to ``size``
    with bicubic resampling, the path a real image takes through :func:`data.load_image`.
    """
    classes = list(CERVICAL_CLASSES)
    images = torch.empty(n, 1, size, size, dtype=torch.uint8)
    labels = torch.tensor([i % len(classes) for i in range(n)])
    profiles = []
    for i in tqdm(range(n), desc=desc, unit="img", disable=not progress):
        rng = np.random.default_rng([CORPUS_KEY, seed, i])
        prof = random_profile(rng)
        img, _ = render(classes[int(labels[i])], prof, rng)
        grey = Image.fromarray(np.round(img * 255).astype(np.uint8))
        if rng.random() < JPEG_FRACTION:
            buf = io.BytesIO()
            grey.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
            grey = Image.open(buf).convert("L")
        grey = grey.resize((size, size), Image.Resampling.BICUBIC)
        images[i, 0] = torch.from_numpy(np.array(grey, dtype=np.uint8))
        profiles.append(prof)
    return Corpus(images, labels, profiles)
