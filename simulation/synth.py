"""Synthetic multi-centre cervical OCT B-scans, written in the real data layout.

The clinical images cannot leave their hospitals, yet every stage of the pipeline (loader,
ROI, model, federation, benchmarks) needs data with the same layout, file formats, class
structures and, above all, the same kind of centre shift. This module renders B-scans from
a small physical model (surface, depth attenuation, multiplicative speckle, PSF blur, log
display) with one randomised structural signature per class (SAVLT_METHOD.md §1) and one
scanner profile per hospital, so that a model trained on ``mixed`` is tested across a real
domain gap on ``xiangya`` and ``huaxi``. :func:`add_held_out_centres` adds, on request, two
test-only scanner styles outside every training site's range (``scanner_hr``,
``scanner_lc``; docs/scanner-shift.md). It is synthetic data, not clinical data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from savlt_model.atomic import write_json
from savlt_model.config import CERVICAL_CLASSES, Config, resolve_path
from savlt_model.data.protocol import data_root
from savlt_model.errors import SavltError

log = logging.getLogger(__name__)

SYNTH_VERSION = "1.0"
NOTE = "synthetic data, not clinical"
F32 = np.float32
Array = np.ndarray


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


# ---------------------------------------------------------------- random fields


def _sig(z: Array) -> Array:
    """Logistic step, used for soft edges so structures survive resampling without aliasing."""
    return (1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))).astype(F32)


def _smooth1d(rng: np.random.Generator, n: int, cell: float) -> Array:
    """Zero-mean, unit-scale smooth 1-D noise with features about ``cell`` px wide."""
    knots = rng.standard_normal((1, int(n / cell) + 3)).astype(F32)
    return np.asarray(Image.fromarray(knots).resize((n, 1), Image.Resampling.BICUBIC))[0]


def _smooth2d(rng: np.random.Generator, h: int, w: int, cell: float) -> Array:
    """Unit-variance smooth 2-D noise (bicubic upsampling of a coarse Gaussian grid)."""
    coarse = rng.standard_normal((int(h / cell) + 3, int(w / cell) + 3)).astype(F32)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(F32)


def _blur(img: Array, sx: float, sy: float) -> Array:
    """Separable Gaussian PSF (lateral ``sx``, axial ``sy``) by shifted sums, no per-pixel loop."""
    for axis, s in ((1, sx), (0, sy)):
        r = max(1, math.ceil(3 * s))
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2).astype(F32)
        k /= k.sum()
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(img, pad, mode="reflect")
        n = img.shape[axis]
        out = np.zeros_like(img)
        for i, wgt in enumerate(k):
            out += wgt * (p[:, i : i + n] if axis == 1 else p[i : i + n])
        img = out
    return img


def _ellipses(
    rng: np.random.Generator,
    x: Array,
    y: Array,
    centres: list[tuple[float, float]],
    radii: list[tuple[float, float]],
) -> Array:
    """Normalised elliptic radius to the nearest of several rotated ellipses (1 = the edge)."""
    r = np.full(np.broadcast_shapes(x.shape, y.shape), np.inf, dtype=F32)
    for (cx, cy), (ax, ay) in zip(centres, radii, strict=True):
        t = rng.uniform(-0.4, 0.4)
        dx, dy = x - cx, y - cy
        u = (dx * math.cos(t) + dy * math.sin(t)) / ax
        v = (-dx * math.sin(t) + dy * math.cos(t)) / ay
        r = np.minimum(r, np.sqrt(u * u + v * v))
    return r


# ---------------------------------------------------------------- class signatures
# Each signature gets the flat-ish surface (px row per column) and returns the final
# surface (ectropion and cancer reshape it) and the tissue reflectivity (linear, ~0..1).

Geo = tuple[Array, Array, int, int]  # x (1, W), y (H, 1), H, W


def _layers(
    rng: np.random.Generator, d: Array, h: int, w: int, thick: tuple[float, float]
) -> Array:
    """Stratified squamous tissue: dim epithelium, a visible boundary, brighter stroma."""
    e = h * rng.uniform(*thick) * (1 + 0.25 * _smooth1d(rng, w, w / 3))[None, :]
    epi, stroma = rng.uniform(0.1, 0.25), rng.uniform(0.3, 0.65)
    refl = epi + (stroma - epi) * _sig((d - e) / rng.uniform(1.5, 3.5))
    refl += rng.uniform(0.05, 0.4) * np.exp(-(((d - e) / 2.0) ** 2))  # basement membrane
    return refl


def _mild(rng: np.random.Generator, surf: Array, geo: Geo) -> tuple[Array, Array]:
    _, y, h, w = geo
    refl = _layers(rng, y - surf[None, :], h, w, (0.08, 0.22))
    return surf, refl * np.exp(0.25 * _smooth2d(rng, h, w, 20))


def _cyst(rng: np.random.Generator, surf: Array, geo: Geo) -> tuple[Array, Array]:
    x, y, h, w = geo
    d = y - surf[None, :]
    refl = _layers(rng, d, h, w, (0.07, 0.18))
    for _ in range(rng.integers(0, 3)):  # extra smooth curved stromal layers
        depth = h * rng.uniform(0.25, 0.6) * (1 + 0.15 * _smooth1d(rng, w, w / 2))[None, :]
        refl *= 1 + rng.uniform(0.2, 0.6) * np.exp(-(((d - depth) / 3.0) ** 2))
    centres, radii = [], []
    for _ in range(rng.integers(1, 4)):
        cx = rng.uniform(0.12, 0.88) * w
        top = surf[int(cx)]
        cy = top + rng.uniform(0.25, 0.65) * (h - top)
        ax = rng.uniform(10, 38) * w / 350
        centres.append((cx, cy))
        radii.append((ax, ax * rng.uniform(0.45, 0.85)))
    r = _ellipses(rng, x, y, centres, radii)
    inside = _sig((1 - r) * 8)
    refl = refl * (1 - inside * (1 - rng.uniform(0.02, 0.12)))
    refl += rng.uniform(0.0, 0.3) * np.exp(-(((r - 1) * 6) ** 2))  # cavity wall
    return surf, refl * np.exp(0.2 * _smooth2d(rng, h, w, 20))


def _ectropion(rng: np.random.Generator, surf: Array, geo: Geo) -> tuple[Array, Array]:
    x, y, h, w = geo
    xs = x[0]
    p = rng.uniform(18, 32) * w / 350
    n = int(w / p) + 3
    xc = (np.arange(n) - 1) * p + rng.uniform(-0.2, 0.2, n) * p + rng.uniform(0, p)
    hw = p * rng.uniform(0.35, 0.62, n)
    ht = rng.uniform(6, 30, n) * h / 220
    prof = np.clip(1 - ((xs[None, :] - xc[:, None]) / hw[:, None]) ** 2, 0, None) ** 0.35
    bumps = ht[:, None] * prof  # (n, W): finger-like protrusions
    k = bumps.argmax(0)
    bump = bumps[k, np.arange(w)]
    top = np.maximum(surf - bump, 2.0)
    d0 = y - surf[None, :]  # depth below the base of the papillae
    refl = rng.uniform(0.3, 0.6) * np.exp(0.3 * _smooth2d(rng, h, w, 16))
    # each papilla: bright columnar rim around a darker stromal core
    core_y = surf - ht[k] * 0.45
    rc = np.sqrt(
        ((xs - xc[k]) / (hw[k] * 0.6))[None, :] ** 2
        + ((y - core_y[None, :]) / (ht[k] * 0.5 + 3)[None, :]) ** 2
    )
    refl *= 1 - rng.uniform(0.45, 0.75) * _sig((1 - rc) * 5)
    # a second row of grape-like lobules just below the base
    off = rng.uniform(0, p)
    k2 = np.floor((xs - off) / p)
    cx2 = off + (k2 + 0.5) * p
    cy2 = surf + rng.uniform(6, 16) * h / 220
    r2 = np.sqrt(((xs - cx2) / (p * 0.38))[None, :] ** 2 + ((y - cy2[None, :]) / (p * 0.32)) ** 2)
    refl *= 1 - rng.uniform(0.3, 0.65) * _sig((1 - r2) * 5)
    refl += rng.uniform(0.1, 0.4) * np.exp(-(((r2 - 1) * 4) ** 2))
    # clefts between papillae reach down into the tissue
    cleft = (1 - bump / ht[k]) ** 4
    depth = rng.uniform(8, 22) * h / 220
    refl *= 1 - 0.7 * cleft[None, :] * _sig((depth - d0) / 2) * _sig(d0 + 2)
    return top, refl


def _hsil(rng: np.random.Generator, surf: Array, geo: Geo) -> tuple[Array, Array]:
    x, y, h, w = geo
    xs = x[0]
    d = y - surf[None, :]
    e = h * rng.uniform(0.16, 0.32) * (1 + 0.35 * _smooth1d(rng, w, rng.uniform(10, 25)))
    p = rng.uniform(9, 15) * w / 350
    phase = 2 * np.pi * xs / p + 1.2 * _smooth1d(rng, w, 40)
    idx = np.floor(phase / (2 * np.pi)).astype(int)
    idx -= idx.min()
    length = e * rng.uniform(0.5, 1.25, idx.max() + 1)[idx]  # one icicle length per streak
    taper = _sig((length[None, :] - d) / 3) * _sig(d / 2)
    epi, stroma = rng.uniform(0.12, 0.3), rng.uniform(0.3, 0.6)
    refl = epi * (1 + rng.uniform(0.6, 0.9) * np.cos(phase)[None, :] * taper)
    # disrupted boundary: a wobbling, soft transition with no basement-membrane line
    edge = e * (1 + 0.2 * _smooth1d(rng, w, 6))
    refl = refl + (stroma - epi) * _sig((d - edge[None, :]) / rng.uniform(3, 8))
    return surf, refl * np.exp(0.2 * _smooth2d(rng, h, w, 18))


def _cancer(rng: np.random.Generator, surf: Array, geo: Geo) -> tuple[Array, Array]:
    _, y, h, w = geo
    surf = surf + rng.uniform(1, 4) * _smooth1d(rng, w, 8)
    d = y - surf[None, :]
    refl = rng.uniform(0.2, 0.45) * np.exp(0.5 * _smooth2d(rng, h, w, 30))
    nests = _smooth2d(rng, h, w, rng.uniform(9, 18))
    refl += rng.uniform(0.2, 0.6) * _sig((nests - rng.uniform(0.2, 0.9)) * 4)
    necrosis = _smooth2d(rng, h, w, rng.uniform(25, 45))
    dark = _sig((necrosis - rng.uniform(0.8, 1.5)) * 5) * _sig((d - 10) / 3)
    refl *= 1 - rng.uniform(0.7, 0.95) * dark
    return surf, refl


SIGNATURES: dict[str, Callable[[np.random.Generator, Array, Geo], tuple[Array, Array]]] = {
    _C: _cancer,
    _Y: _cyst,
    _E: _ectropion,
    _H: _hsil,
    _M: _mild,
}


def _confounders(rng: np.random.Generator, cls: str, refl: Array, top: Array, geo: Geo) -> Array:
    """Look-alikes that keep the task from being trivially separable."""
    x, y, h, w = geo
    d = y - top[None, :]
    if rng.random() < 0.4:  # small dark blobs (vessels, glands) in any class
        centres, radii = [], []
        for _ in range(rng.integers(1, 4)):
            cx = rng.uniform(0.05, 0.95) * w
            centres.append((cx, top[int(cx)] + rng.uniform(0.15, 0.7) * (h - top[int(cx)])))
            ax = rng.uniform(3, 11) * w / 350
            radii.append((ax, ax * rng.uniform(0.5, 1.0)))
        blobs = _sig((1 - _ellipses(rng, x, y, centres, radii)) * 6)
        refl = refl * (1 - rng.uniform(0.5, 0.9) * blobs)
    if rng.random() < 0.3:  # shadows below surface debris: dark vertical bands
        band = np.zeros(w, dtype=F32)
        for _ in range(rng.integers(1, 4)):
            c, half = rng.uniform(0, w), rng.uniform(1, 4)
            band = np.maximum(band, _sig((half - np.abs(x[0] - c)) * 2))
        refl = refl * (1 - rng.uniform(0.3, 0.7) * band[None, :])
    if cls != _H and rng.random() < 0.25:  # faint vertical texture, like weak icicles
        p = rng.uniform(7, 12) * w / 350
        fade = _sig((h * rng.uniform(0.08, 0.2) - d) / 4)
        refl = refl * (1 + rng.uniform(0.15, 0.35) * np.cos(2 * np.pi * x / p) * fade)
    return refl


# ---------------------------------------------------------------- image formation


def _surface(rng: np.random.Generator, prof: ScannerProfile, xs: Array) -> Array:
    """Probe-contact surface row per column: tilt, curvature and a slow wobble."""
    h, w = prof.height, prof.width
    u = (xs - w / 2) / (w / 2)
    s = h * (prof.surface + rng.uniform(-0.04, 0.04))
    s = s + rng.uniform(-prof.tilt, prof.tilt) * (xs - w / 2)
    s = s + h * prof.sag * rng.uniform(0.5, 1.2) * u**2
    s = s + rng.uniform(1, 4) * _smooth1d(rng, w, w / 5)
    return np.clip(s, 0.06 * h, 0.45 * h).astype(F32)


def render(cls: str, prof: ScannerProfile, rng: np.random.Generator) -> tuple[Array, Array]:
    """One B-scan in [0, 1] and its tissue mask (bool), both (H, W)."""
    h, w = prof.height, prof.width
    xs = np.arange(w, dtype=F32)
    geo: Geo = (xs[None, :], np.arange(h, dtype=F32)[:, None], h, w)
    top, refl = SIGNATURES[cls](rng, _surface(rng, prof, xs), geo)
    refl = _confounders(rng, cls, refl, top, geo)
    if isinstance(prof, HeldOutProfile) and prof.layer_contrast != 1.0:
        # no RNG draw here, so the standard profiles render exactly as before
        refl = np.clip(refl, 0, None) ** prof.layer_contrast
    d = geo[1] - top[None, :]
    mask = d >= 0
    line = rng.uniform(0.3, 1.0) if cls == _C else rng.uniform(0.8, 2.0)
    refl = refl + line * np.exp(-((d / 1.5) ** 2))  # entry reflection at the surface
    signal = np.where(d >= -1, refl * np.exp(-prof.attenuation * np.clip(d, 0, None) / h), 0)
    signal = signal.astype(F32) * rng.standard_gamma(prof.speckle_looks, (h, w), dtype=F32)
    noise = 10 ** (prof.noise_db / 10) * rng.standard_exponential((h, w), dtype=F32)
    inten = _blur(signal / prof.speckle_looks + noise, prof.blur_x, prof.blur_y)
    db = 10 * np.log10(inten + 1e-9) + prof.gain_db + rng.uniform(-1.5, 1.5)
    img = np.clip(1 + db / prof.range_db, 0, 1) ** prof.gamma
    return img.astype(F32), mask


def _suffix(fmt: str) -> str:
    return ".jpg" if fmt.startswith("jpeg") else ".png"


def _save(
    img: Array, mask: Array, fmt: str, image_path: Path, mask_path: Path, bits: int = 16
) -> None:
    """Encode in the centre's format, so the loader's 8-, 12-, 16-bit and JPEG paths all run.

    ``bits`` is the detector depth of a png16 file (12 leaves the top 4 bits empty, as
    12-bit scanners write them); ``fmt`` "jpeg<q>" sets the JPEG quality.
    """
    if fmt == "png16":
        full = 2**bits - 1
        Image.fromarray(np.round(img * full).astype(np.uint16)).save(image_path, compress_level=1)
    else:
        grey = Image.fromarray(np.round(img * 255).astype(np.uint8))
        if fmt.startswith("jpeg"):  # RGB, as screenshots exported by clinical viewers usually are
            grey.convert("RGB").save(image_path, quality=int(fmt[4:] or JPEG_QUALITY))
        else:
            grey.save(image_path, compress_level=1)
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path, compress_level=1)


# ---------------------------------------------------------------- data set


def _write(
    centre_dir: Path, cls: str, stem: str, img: Array, mask: Array, fmt: str, bits: int = 16
) -> str:
    """Save one B-scan as ``images/<cls>/<stem>.*`` and its mask; returns the image's name."""
    name = stem + _suffix(fmt)
    image_dir, mask_dir = (centre_dir / part / cls for part in ("images", "masks"))
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    _save(img, mask, fmt, image_dir / name, mask_dir / f"{stem}.png", bits)
    return name


def _key(name: str) -> int:
    """Stable per-name seed component, so output does not depend on class or site order."""
    return zlib.crc32(name.encode())


def _counts(site: str, classes: list[str], scale: float) -> dict[str, int]:
    """Images per class for one site; the floor keeps every class at every site (non-IID)."""
    return {c: max(round(BASE_COUNTS[site][c] * scale), MIN_PER_CELL) for c in classes}


def _check_args(seed: int, scale: float, classes: list[str]) -> None:
    """Refuse bad arguments before any pixel is rendered, with a one-line fix."""
    unknown = [c for c in classes if c not in SIGNATURES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise SavltError(
            f"synth classes must be distinct names from {', '.join(CERVICAL_CLASSES)}; "
            f"got {', '.join(classes) or 'none'}"
        )
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise SavltError(f"synth seed must be a non-negative integer, got {seed!r}")
    if not (math.isfinite(scale) and 0 < scale <= 100):
        raise SavltError(f"synth scale must be in (0, 100], got {scale}")


def _check(out: Path, seed: int, scale: float, classes: list[str]) -> None:
    """:func:`_check_args`, and OUT must be new or empty."""
    _check_args(seed, scale, classes)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SavltError(f"{out} exists and is not empty — choose another --out or remove it")


def generate(
    out: Path,
    seed: int = 0,
    scale: float = 1.0,
    classes: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Write OUT/{mixed,huaxi,xiangya} in the real layout.

    Returns the summary also written to OUT/synth.json. Everything is rendered into
    ``OUT.tmp-<pid>`` and renamed at the end, so OUT is either complete or absent.
    """
    out = Path(out)
    classes = list(CERVICAL_CLASSES) if classes is None else list(classes)
    _check(out, seed, scale, classes)
    plan = [
        (centre, site, cls, i)
        for centre, sites in CENTRE_SITES.items()
        for site in sites
        for cls, n in _counts(site, classes, scale).items()
        for i in range(n)
    ]
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        site_of: dict[str, str] = {}
        for centre, site, cls, i in tqdm(plan, desc="synth", unit="img", disable=not progress):
            rng = np.random.default_rng([seed, _key(site), _key(cls), i])
            img, mask = render(cls, PROFILES[site], rng)
            name = _write(tmp / centre, cls, f"{site}_{i:04d}", img, mask, FORMATS[centre])
            if centre == "mixed":
                site_of[f"{cls}/{name}"] = site
        write_json(tmp / "mixed" / "sites.json", site_of)
        summary = _summary(seed, scale, classes)
        write_json(tmp / "synth.json", summary)
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _summary(seed: int, scale: float, classes: list[str]) -> dict[str, Any]:
    """Provenance for OUT/synth.json: enough to regenerate and to explain the centre shift."""
    centres: dict[str, Any] = {}
    for centre, sites in CENTRE_SITES.items():
        per_site = {s: _counts(s, classes, scale) for s in sites}
        centres[centre] = {
            "format": FORMATS[centre],
            "counts": {c: sum(n[c] for n in per_site.values()) for c in classes},
            "sites": {s: {"profile": asdict(PROFILES[s]), "counts": per_site[s]} for s in sites},
        }
    return {
        "note": NOTE,
        "generator": "simulation.synth",
        "version": SYNTH_VERSION,
        "seed": seed,
        "scale": scale,
        "classes": classes,
        "centres": centres,
    }


def _held_out_info(name: str, seed: int, scale: float, classes: list[str]) -> dict[str, Any]:
    """Provenance of one held-out centre, as written to (and compared with) its JSON file."""
    counts = {c: max(round(HELD_OUT_COUNTS[name][c] * scale), MIN_PER_CELL) for c in classes}
    return {
        "note": NOTE,
        "generator": "simulation.synth.add_held_out_centres",
        "version": SYNTH_VERSION,
        "centre": name,
        "seed": seed,
        "scale": scale,
        "classes": classes,
        "format": HELD_OUT_FORMATS[name],
        "counts": counts,
        "profile": asdict(HELD_OUT_PROFILES[name]),
    }


def _existing_held_out(root: Path, info: dict[str, Any]) -> bool:
    """True if ``info``'s centre is already in ``root`` as written with these arguments.

    A folder of that name from other arguments (or not from this generator) is refused
    rather than silently reused, since its images would not be the ones asked for.
    """
    centre = root / info["centre"]
    if not centre.exists():
        return False
    path = centre / HELD_OUT_INFO
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    if found != json.loads(json.dumps(info)):
        raise SavltError(
            f"{centre} exists but was not written by add_held_out_centres with seed "
            f"{info['seed']}, scale {info['scale']} and these classes ({path} differs) — "
            "remove the folder to regenerate it"
        )
    return True


def add_held_out_centres(
    root: Path,
    seed: int = 0,
    scale: float = 1.0,
    classes: list[str] | None = None,
    names: tuple[str, ...] = tuple(HELD_OUT_PROFILES),
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Add the held-out scanner centres ``names`` (test-only) to an existing DATA folder.

    Separate from :func:`generate`, so the standard centres and ``synth.json`` keep their
    bytes. Idempotent: only centres missing from ``root`` are written, so it can run on the
    same folder every time; a centre folder left by different arguments is refused. Each
    centre is rendered into a hidden temp folder and renamed (complete or absent), holds
    ``images/<class>/``, ``masks/<class>/`` and its provenance ``held_out.json``, and is seeded
    by (seed, centre, class, index) like the standard sites. Returns the provenance of
    each centre written now ({} when all were there).
    """
    root = Path(root)
    classes = list(CERVICAL_CLASSES) if classes is None else list(classes)
    _check_args(seed, scale, classes)
    unknown = [n for n in names if n not in HELD_OUT_PROFILES]
    if unknown:
        raise SavltError(
            f"held-out centres must be from {', '.join(HELD_OUT_PROFILES)}; got {unknown}"
        )
    if not root.is_dir():
        raise SavltError(f"{root} is not a DATA folder — generate one first (`savlt synth`)")
    written: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        info = _held_out_info(name, seed, scale, classes)
        if _existing_held_out(root, info):
            continue
        prof, fmt = HELD_OUT_PROFILES[name], info["format"]
        tmp = root / f".{name}.tmp-{os.getpid()}"  # hidden: scan_center never lists it
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            plan = [(c, i) for c, n in info["counts"].items() for i in range(n)]
            for cls, i in tqdm(plan, desc=name, unit="img", disable=not progress):
                rng = np.random.default_rng([seed, _key(name), _key(cls), i])
                img, mask = render(cls, prof, rng)
                _write(tmp, cls, f"{name}_{i:04d}", img, mask, fmt, prof.bit_depth)
            write_json(tmp / HELD_OUT_INFO, info)
            tmp.rename(root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        written[name] = info
    return written


def ensure_data(cfg: Config) -> Path:
    """The run's DATA folder, generated first when ``data.synthetic.enabled`` asks for it
    (the held-out scanner centres of ``data.synthetic.held_out`` are added if missing)."""
    root = resolve_path(cfg.data.root)
    syn = cfg.data.synthetic
    if syn.enabled and not root.exists():
        log.info("Generating synthetic multi-centre OCT data in %s (seed %d)", root, syn.seed)
        generate(root, seed=syn.seed, scale=syn.scale, classes=cfg.task.classes)
    if syn.enabled and syn.held_out:
        add_held_out_centres(root, syn.seed, syn.scale, cfg.task.classes, tuple(syn.held_out))
    return data_root(cfg)
