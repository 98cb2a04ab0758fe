"""A held-out *family* of scanner styles, for testing only (``savlt synth --held-out-family``).

Why (issue #24): two fixed held-out styles let a fix be tuned to them. A family drawn from
fixed, wide ranges over every axis the generator has, plus three axes no training site
varies, gives as many unseen scanners as a test needs; seed 0 is for tuning, the others
for reporting. Ranges were fixed before any measurement and are not to be tuned.

The new axes, applied only to a :class:`FamilyProfile` (the standard and held-out
profiles render exactly as before and draw no extra random numbers):

- ``speckle_grain``: speckle correlation length (Gaussian sigma, px; 0 = independent
  pixels, as every training site); coarse grain, as from a wider coherence gate;
- ``shadow_count`` / ``shadow_strength``: vessel-like vertical shadows below the surface
  (mean number per B-scan, Poisson; fraction of signal lost under one);
- ``specular``: specular / saturation artefacts: probability per B-scan of a saturated
  vertical flash at the surface, and the share of the top of the display range that
  saturates to white (a detector or display that clips).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from synthetic.centres import PROFILES, HeldOutProfile, draw_axes

FAMILY_KEY = zlib.crc32(b"savlt-held-out-family")  # a seed stream nothing else draws


@dataclass(frozen=True)
class FamilyProfile(HeldOutProfile):
    """A held-out profile with the three axes no training site varies."""

    speckle_grain: float = 0.0
    shadow_count: float = 0.0
    shadow_strength: float = 0.0
    specular: float = 0.0


# The family's ranges, fixed in the first commit of issue #24 (uniform draws; integers for
# the image size). Training sites a/b/c span, for comparison: looks 1.2-3.0, range 34-44 dB,
# gain -16..-9 dB, noise -26..-22 dB, gamma 0.85-1.15, attenuation 3.2-5.5, blur x 0.8-1.9 /
# y 0.6-1.0 px, tilt 0.02-0.08, sag -0.05..0.1, surface 0.13-0.2, 320x192-400x256 px, png8,
# layer contrast 1, and the new axes at 0.
FAMILY_RANGES: dict[str, tuple[float, float]] = {
    "width": (192, 704),
    "height": (160, 352),
    "speckle_looks": (0.7, 6.0),
    "range_db": (22.0, 58.0),
    "gain_db": (-24.0, -4.0),
    "noise_db": (-34.0, -12.0),
    "gamma": (0.55, 1.9),
    "attenuation": (1.5, 9.0),
    "blur_x": (0.3, 3.6),
    "blur_y": (0.3, 2.6),
    "tilt": (0.0, 0.16),
    "sag": (-0.14, 0.18),
    "surface": (0.08, 0.3),
    "layer_contrast": (0.55, 1.6),
    "speckle_grain": (0.0, 2.5),
    "shadow_count": (0.0, 6.0),
    "shadow_strength": (0.2, 0.9),
    "specular": (0.0, 0.8),
}
# File formats, drawn with equal probability: 8-bit PNG, 12- or 16-bit PNG, JPEG at a
# quality drawn from JPEG_QUALITY_RANGE.
FAMILY_FORMATS = ("png8", "png16-12", "png16-16", "jpeg")
JPEG_QUALITY_RANGE = (60, 95)


def training_ranges() -> dict[str, tuple[float, float]]:
    """Per axis, the span of the training sites a/b/c (the mixed centre's profiles)."""
    sites = [PROFILES[s] for s in ("site_a", "site_b", "site_c")]
    out = {}
    for name in FAMILY_RANGES:
        values = [float(getattr(p, name, 1.0 if name == "layer_contrast" else 0.0)) for p in sites]
        out[name] = (min(values), max(values))
    return out


def outside_axes(prof: FamilyProfile) -> list[str]:
    """The axes on which ``prof`` lies outside every training site's range."""
    spans = training_ranges()
    return [k for k, (lo, hi) in spans.items() if not lo <= float(getattr(prof, k)) <= hi]


def family_style(family_seed: int, index: int) -> tuple[FamilyProfile, str]:
    """Style ``index`` of family ``family_seed``: its profile and file format (``png8``,
    ``png16`` with its bit depth on the profile, or ``jpeg<q>``). Deterministic."""
    rng = np.random.default_rng([FAMILY_KEY, family_seed, index])
    values = draw_axes(FAMILY_RANGES, rng)
    fmt = FAMILY_FORMATS[int(rng.integers(len(FAMILY_FORMATS)))]
    bits = 8
    if fmt.startswith("png16"):
        bits, fmt = int(fmt.split("-")[1]), "png16"
    elif fmt == "jpeg":
        fmt = f"jpeg{int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))}"
    return FamilyProfile(bit_depth=bits, **values), fmt


def family_name(family_seed: int, index: int) -> str:
    return f"family{family_seed}_{index:02d}"
