"""The weight-free tissue mask of an OCT B-scan: everything below the bright surface.

Batched torch code, so the model's ROI step runs it on the training batch, and the data
layer runs it on one full-resolution B-scan for intensity standardisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights
_OTSU_BINS = 256


def unnormalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Back to [0, 1] RGB (float32 whatever the autocast dtype, so thresholds are stable)."""
    return images.float() * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a (B, 1, H, W) batch with reflect padding."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


def _otsu_threshold(x: Tensor) -> Tensor:
    """Per-image Otsu threshold of a (B, P) batch in [0, 1], via one batched histogram."""
    b = x.shape[0]
    idx = (x * (_OTSU_BINS - 1)).round().long().clamp_(0, _OTSU_BINS - 1)
    hist = torch.zeros(b, _OTSU_BINS, device=x.device).scatter_add_(1, idx, torch.ones_like(x))
    p = hist / hist.sum(1, keepdim=True)
    centres = torch.linspace(0, 1, _OTSU_BINS, device=x.device)
    omega = p.cumsum(1)
    mu = (p * centres).cumsum(1)
    between = (mu[:, -1:] * omega - mu) ** 2 / (omega * (1 - omega)).clamp_min(1e-12)
    return centres[between.argmax(1)]


def _vertical(mask: Tensor, k: int, op: Callable[..., Tensor], identity: bool) -> Tensor:
    """``op`` (logical and / or) over each pixel's window of ``k`` rows, clipped at the
    image's top and bottom: a binary erosion / dilation with a (k, 1) element. The same
    result as a (k, 1) max-pool of the 0/1 image, at a third of its cost or less
    (benchmarks/bench_tissue_mask.py)."""
    r = k // 2
    pad = torch.full((mask.shape[0], r, mask.shape[2]), identity, device=mask.device)
    padded = torch.cat([pad, mask, pad], dim=1)
    h = mask.shape[1]
    out = padded[:, :h].clone()
    for d in range(1, k):
        op(out, padded[:, d : d + h], out=out)
    return out


def below_surface(tissue: Tensor, k: int) -> Tensor:
    """(B, H, W) bool above-threshold pixels -> (B, H, W) float 0/1 tissue mask: a vertical
    opening with a (k, 1) element (erode then dilate: bright speckle shorter than k rows goes),
    then in each column every row from the first remaining one down."""
    eroded = _vertical(tissue, k, torch.logical_and, identity=True)
    opened = _vertical(eroded, k, torch.logical_or, identity=False)
    return opened.to(torch.uint8).cummax(dim=1).values.float()


class SurfaceDetector(nn.Module):
    """Weight-free tissue mask for OCT B-scans: tissue is everything below the bright surface.

    Steps: undo normalisation, grayscale, Gaussian blur (sigma = S/64), per-image Otsu
    threshold on the min-max-scaled image, a vertical morphological opening (removes bright
    speckle shorter than ~S/32 rows above the surface), then per column everything from the
    first tissue row downward (a cumulative max along depth), because OCT signal decays with
    depth and deep tissue can fall below the threshold.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.register_buffer("gray", torch.tensor(GRAY).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        g = (unnormalise(images, self.mean, self.std) * self.gray).sum(1, keepdim=True)
        g = _gaussian_blur(g, sigma=max(1.0, h / 64)).flatten(1)
        lo, hi = g.aminmax(dim=1, keepdim=True)
        g = (g - lo) / (hi - lo).clamp_min(1e-6)  # constant image -> all 0 -> no tissue
        tissue = (g > _otsu_threshold(g)[:, None]).view(b, h, w)
        return below_surface(tissue, k=2 * max(1, h // 64) + 1)
