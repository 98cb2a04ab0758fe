"""The synthetic world: which centres and sub-sites exist, each one's scanner profile, file
format and case mix, and the test-only held-out scanner styles (docs/scanner-shift.md).

What differs between hospitals lives here; what the tissue looks like lives in
:mod:`synthetic.render`. Changing a number here changes every generated image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from savlt_model.config import CERVICAL_CLASSES

SYNTH_VERSION = "1.0"
NOTE = "synthetic data, not clinical"


@dataclass(frozen=True)
class ScannerProfile:
    """What differs between hospitals' scanners and protocols (not what the tissue is)."""

    width: int
    height: int
    speckle_looks: float  # gamma shape of the speckle; lower = stronger speckle
    range_db: float  # displayed dynamic range: contrast
    gain_db: float  # display gain: overall brightness
    noise_db: float  # noise floor relative to the brightest tissue
    gamma: float  # display contrast curve
    attenuation: float  # signal loss over one image height, in e-folds
    blur_x: float  # lateral PSF sigma, px
    blur_y: float  # axial PSF sigma, px
    tilt: float  # max |surface slope|, px per px
    sag: float  # surface curvature: sag at the edges, fraction of height (< 0: concave)
    surface: float  # mean surface depth, fraction of height


PROFILES: dict[str, ScannerProfile] = {
    "site_a": ScannerProfile(
        width=384,
        height=224,
        speckle_looks=1.6,
        range_db=40.0,
        gain_db=-13.0,
        noise_db=-24.0,
        gamma=1.0,
        attenuation=4.0,
        blur_x=1.2,
        blur_y=0.8,
        tilt=0.04,
        sag=0.06,
        surface=0.16,
    ),
    "site_b": ScannerProfile(
        width=320,
        height=192,
        speckle_looks=3.0,
        range_db=34.0,
        gain_db=-9.0,
        noise_db=-22.0,
        gamma=0.85,
        attenuation=5.5,
        blur_x=1.9,
        blur_y=1.0,
        tilt=0.08,
        sag=-0.05,
        surface=0.2,
    ),
    "site_c": ScannerProfile(
        width=400,
        height=256,
        speckle_looks=1.2,
        range_db=44.0,
        gain_db=-16.0,
        noise_db=-26.0,
        gamma=1.15,
        attenuation=3.2,
        blur_x=0.8,
        blur_y=0.6,
        tilt=0.02,
        sag=0.1,
        surface=0.13,
    ),
    "xiangya": ScannerProfile(
        width=352,
        height=240,
        speckle_looks=2.2,
        range_db=38.0,
        gain_db=-12.0,
        noise_db=-23.0,
        gamma=1.3,
        attenuation=4.8,
        blur_x=1.5,
        blur_y=1.2,
        tilt=0.06,
        sag=0.08,
        surface=0.18,
    ),
    "huaxi": ScannerProfile(
        width=288,
        height=176,
        speckle_looks=1.8,
        range_db=31.0,
        gain_db=-10.0,
        noise_db=-19.0,
        gamma=0.9,
        attenuation=6.0,
        blur_x=2.3,
        blur_y=1.4,
        tilt=0.1,
        sag=0.02,
        surface=0.22,
    ),
}
CENTRE_SITES: dict[str, tuple[str, ...]] = {
    "mixed": ("site_a", "site_b", "site_c"),
    "huaxi": ("huaxi",),
    "xiangya": ("xiangya",),
}
FORMATS = {"mixed": "png8", "huaxi": "jpeg", "xiangya": "png16"}
JPEG_QUALITY = 92
MIN_PER_CELL = 4  # images per (site, class) at small scales, so every site sees every class

_C, _Y, _E, _H, _M = CERVICAL_CLASSES
# Images per (site, class) at scale 1. Mixed: 60 per class, spread non-IID over its sites.
BASE_COUNTS: dict[str, dict[str, int]] = {
    "site_a": {_C: 12, _Y: 30, _E: 18, _H: 12, _M: 30},
    "site_b": {_C: 30, _Y: 12, _E: 30, _H: 18, _M: 12},
    "site_c": {_C: 18, _Y: 18, _E: 12, _H: 30, _M: 18},
    "xiangya": {_C: 20, _Y: 35, _E: 25, _H: 40, _M: 30},
    "huaxi": {_C: 40, _Y: 25, _E: 35, _H: 20, _M: 30},
}


@dataclass(frozen=True)
class HeldOutProfile(ScannerProfile):
    """A scanner style outside every training site's range, for held-out-scanner tests.

    It adds two things the standard profiles keep fixed, so that a new scanner can differ in
    tissue contrast and in file depth as well as in display and optics.
    """

    layer_contrast: float = 1.0  # exponent on the tissue reflectivity (< 1 flattens layers)
    bit_depth: int = 8  # detector bits in the file: 8 (png8, JPEG), 12 or 16 (png16)


# Two styles beyond the training sites on every axis (training ranges in brackets):
# "scanner_hr": a high-resolution, long-range swept-source system with a wide field of view
#   (looks 0.9 [1.2-3.0], range 52 dB [31-44], attenuation 2.2 [3.2-6.0], blur 0.5 px
#   [0.6-2.3], gamma 0.7 [0.85-1.3], aspect 2.0 [1.5-1.7], 12-bit files);
# "scanner_lc": a low-cost, heavily averaged, noisy handheld probe with a narrow field
#   (looks 5 [1.2-3.0], range 26 dB, noise -15 dB [-26..-19], attenuation 7.5, blur 3.0 px,
#   gamma 1.6, tilt 0.14, concave surface, flattened layer contrast, JPEG quality 80).
HELD_OUT_PROFILES: dict[str, HeldOutProfile] = {
    "scanner_hr": HeldOutProfile(
        width=640,
        height=320,
        speckle_looks=0.9,
        range_db=52.0,
        gain_db=-20.0,
        noise_db=-30.0,
        gamma=0.7,
        attenuation=2.2,
        blur_x=0.5,
        blur_y=0.4,
        tilt=0.12,
        sag=0.14,
        surface=0.1,
        layer_contrast=1.3,
        bit_depth=12,
    ),
    "scanner_lc": HeldOutProfile(
        width=224,
        height=192,
        speckle_looks=5.0,
        range_db=26.0,
        gain_db=-7.0,
        noise_db=-15.0,
        gamma=1.6,
        attenuation=7.5,
        blur_x=3.0,
        blur_y=2.0,
        tilt=0.14,
        sag=-0.1,
        surface=0.26,
        layer_contrast=0.7,
    ),
}
# "jpeg<q>" is JPEG at quality q; plain "jpeg" (huaxi) uses JPEG_QUALITY.
HELD_OUT_FORMATS = {"scanner_hr": "png16", "scanner_lc": "jpeg80"}
# Balanced, so a held-out centre's scores are not driven by its case mix.
HELD_OUT_COUNTS: dict[str, dict[str, int]] = {
    "scanner_hr": {_C: 30, _Y: 30, _E: 30, _H: 30, _M: 30},
    "scanner_lc": {_C: 30, _Y: 30, _E: 30, _H: 30, _M: 30},
}
HELD_OUT_INFO = "held_out.json"  # provenance file inside each held-out centre folder


IMAGE_SIZE_AXES = ("width", "height")  # drawn as whole pixels; every other axis as a float


def draw_axes(ranges: dict[str, tuple[float, float]], rng: np.random.Generator) -> dict[str, Any]:
    """One value per axis, uniform in its range and drawn in the table's order (so a table
    and a seed fix the style): the randomised scanners of pretraining and the held-out family."""
    return {
        name: int(rng.integers(lo, hi + 1))
        if name in IMAGE_SIZE_AXES
        else float(rng.uniform(lo, hi))
        for name, (lo, hi) in ranges.items()
    }
