"""Per-B-scan intensity standardisation, applied when an image is decoded.

Why: a new hospital's scanner shows the same tissue through another display curve (gain,
dynamic range). Measured on the synthetic centres (docs/scanner-shift.md), that offset is
where the shift enters: darker tissue reads as cancer, so a model trained elsewhere calls
nearly every scan high-risk. Mapping robust percentiles of the *tissue* (not of the whole
frame, whose dark gel or air above the surface varies by probe) to fixed values undoes gain
and range, which are affine in the log display; ``equalise`` maps each grey level through
the tissue's own rank instead, which also undoes gamma and clipping (any monotone display
curve; measured in docs/scanner-shift.md, "Training for any scanner"). It runs identically
in training, at every hospital and at inference, because it is part of decoding.
"""

from __future__ import annotations

import numpy as np
import torch

from savlt_model.data.tissue import GRAY as LUMA
from savlt_model.data.tissue import SurfaceDetector

INTENSITY_MODES: tuple[str, ...] = ("none", "percentile", "percentile-detrend", "equalise")
GRAY = np.array(LUMA)  # grey from RGB exactly as the tissue detector makes it
_MIN_TISSUE = 64  # pixels: below this the mask failed and the whole frame is used
_TARGET = (0.05, 0.95)  # where the tissue's 1st and 99th percentiles go
_DETECTOR = SurfaceDetector(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def tissue_mask(gray: np.ndarray) -> np.ndarray:
    """(H, W) bool tissue mask of a [0, 1] grey B-scan, from the weight-free detector."""
    x = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[None, None]
    return _DETECTOR(x.expand(1, 3, -1, -1))[0].numpy() > 0.5


def depth_detrend(gray: np.ndarray, mask: np.ndarray, floor_margin: float = 0.15) -> np.ndarray:
    """Remove the linear trend of tissue intensity with depth below the surface.

    Attenuation (signal lost per mm: wavelength, focus, contact) is a ramp in the log
    display. Depths whose mean is within ``floor_margin`` of the signal range above the
    noise floor (median of the non-tissue pixels) carry no signal: they are left out of the
    fit and get no more lift than the deepest fitted depth, so noise is never amplified
    into fake tissue. Attenuation is also a tissue property in real OCT: off by default.
    """
    h = mask.shape[0]
    if mask.sum() < _MIN_TISSUE:
        return gray
    rows = np.cumsum(mask, axis=0)  # rows below the surface, 1 at the first tissue row
    floor = float(np.median(gray[~mask])) if (~mask).sum() >= _MIN_TISSUE else float(gray.min())
    sums = np.bincount(rows[mask], weights=gray[mask], minlength=h + 1)
    counts = np.bincount(rows[mask], minlength=h + 1)
    level = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    top = np.nanmax(level)
    signal = np.flatnonzero(level > floor + floor_margin * (top - floor))
    if len(signal) < 8:
        return gray
    deepest = int(signal.max())
    fit = mask & (rows <= deepest)
    depth = np.minimum(rows, deepest) / h
    slope = np.polyfit(depth[fit], gray[fit], 1)[0]
    return np.where(mask, gray - slope * (depth - depth[fit].mean()), gray)


def standardise_bscan(gray: np.ndarray, mask: np.ndarray, mode: str = "percentile") -> np.ndarray:
    """Map a [0, 1] grey B-scan so its tissue spans 0.05..0.95 (clipped to [0, 1]).

    ``percentile``: linearly, the tissue's 1st / 99th percentiles onto 0.05 / 0.95;
    ``percentile-detrend``: the same after removing the depth ramp; ``equalise``: through the
    tissue's own distribution (mid-rank of each grey level among the tissue pixels), which
    undoes every monotone display curve, gamma and clipping included, not only affine ones.
    """
    if mode == "percentile-detrend":
        gray = depth_detrend(gray, mask)
    ranked = mask if mask.sum() >= _MIN_TISSUE else np.ones_like(mask)
    if mode == "equalise":
        # rank by grey level (a decoded scan has few): count the ranked pixels at each level;
        # pixels below a level and up to it bracket its rank, ties share their mid-rank
        levels, level_of = np.unique(gray, return_inverse=True)
        level_of = level_of.reshape(gray.shape)  # numpy < 2 returns it flat
        counts = np.bincount(level_of[ranked], minlength=len(levels))
        upto = np.cumsum(counts)
        unit = (2 * upto - counts)[level_of] / (2.0 * counts.sum())
        return _TARGET[0] + unit * (_TARGET[1] - _TARGET[0])
    lo, hi = np.percentile(gray[ranked], [1.0, 99.0])
    unit = np.clip((gray - lo) / max(hi - lo, 1e-6), 0.0, None)
    return np.clip(_TARGET[0] + unit * (_TARGET[1] - _TARGET[0]), 0.0, 1.0)


def standardise_rgb(rgb: np.ndarray, mode: str) -> np.ndarray:
    """(H, W, 3) uint8 -> standardised grey (H, W, 3) uint8; ``mode`` "none" returns it as is.

    Runs at the file's resolution, before resizing, so the percentiles see the scanner's own
    speckle rather than an antialiased thumbnail.
    """
    if mode == "none":
        return rgb
    if mode not in INTENSITY_MODES:
        raise ValueError(f"unknown intensity mode {mode!r}; choose from {INTENSITY_MODES}")
    gray = (rgb.astype(np.float64) / 255.0) @ GRAY
    out = standardise_bscan(gray, tissue_mask(gray), mode)
    return np.repeat(np.round(out * 255.0).astype(np.uint8)[..., None], 3, axis=2)
