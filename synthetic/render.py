"""One synthetic cervical OCT B-scan from a small physical model.

Surface, depth attenuation, multiplicative speckle, PSF blur and log display, with one
randomised structural signature per class (docs/method.md, "The clinical task") under one
scanner profile (:mod:`synthetic.centres`). Pure: an RNG in, an image and its tissue mask
out; no files.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from savlt_model.config import CERVICAL_CLASSES
from synthetic.centres import HeldOutProfile, ScannerProfile
from synthetic.family import FamilyProfile

F32 = np.float32
Array = np.ndarray
_C, _Y, _E, _H, _M = CERVICAL_CLASSES


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


# ---------------------------------------------------------------- family-only axes
# Only a FamilyProfile (synthetic.family) reaches these, so the standard profiles draw no
# extra random number and keep their bytes.


def _vessel_shadows(
    rng: np.random.Generator, prof: FamilyProfile, signal: Array, d: Array
) -> Array:
    """Vertical shadows below the surface, as under superficial vessels."""
    w = signal.shape[1]
    xs = np.arange(w, dtype=F32)
    band = np.zeros(w, dtype=F32)
    for _ in range(int(rng.poisson(prof.shadow_count))):
        c, half = rng.uniform(0, w), rng.uniform(1.5, 6.0) * w / 350
        band = np.maximum(band, _sig((half - np.abs(xs - c)) * 1.5))
    below = _sig((d - rng.uniform(2, 12)) / 2)  # the vessel sits a little below the surface
    return signal * (1 - prof.shadow_strength * band[None, :] * below)


def _grain(speckle: Array, sigma: float) -> Array:
    """Speckle correlated over ``sigma`` px, with its mean and contrast kept."""
    blurred = _blur(speckle, sigma, sigma)
    scale = speckle.std() / max(float(blurred.std()), 1e-6)
    return np.clip(speckle.mean() + (blurred - blurred.mean()) * scale, 0, None).astype(F32)


def _specular(rng: np.random.Generator, prof: FamilyProfile, img: Array, top: Array) -> Array:
    """A saturated specular flash at the surface (probability ``specular``) and a display
    that clips the top ``0.3 * specular`` of its range to white."""
    h, w = img.shape
    if rng.random() < prof.specular:
        xs = np.arange(w, dtype=F32)
        c, half = rng.uniform(0, w), rng.uniform(1.0, 4.0) * w / 350
        depth = rng.uniform(0.2, 1.0) * h
        column = _sig((half - np.abs(xs - c)) * 2)[None, :]
        reach = _sig((top[None, :] + depth - np.arange(h, dtype=F32)[:, None]) / 3)
        img = np.maximum(img, column * reach)
    return np.clip(img / (1 - 0.3 * prof.specular), 0, 1).astype(F32)


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
    family = prof if isinstance(prof, FamilyProfile) else None
    if family is not None and family.shadow_count > 0:
        signal = _vessel_shadows(rng, family, signal, d)
    speckle = rng.standard_gamma(prof.speckle_looks, (h, w), dtype=F32)
    if family is not None and family.speckle_grain > 0:
        speckle = _grain(speckle, family.speckle_grain)
    signal = signal.astype(F32) * speckle
    noise = 10 ** (prof.noise_db / 10) * rng.standard_exponential((h, w), dtype=F32)
    inten = _blur(signal / prof.speckle_looks + noise, prof.blur_x, prof.blur_y)
    db = 10 * np.log10(inten + 1e-9) + prof.gain_db + rng.uniform(-1.5, 1.5)
    img = np.clip(1 + db / prof.range_db, 0, 1) ** prof.gamma
    if family is not None:
        img = _specular(rng, family, img, top)
    return img.astype(F32), mask
