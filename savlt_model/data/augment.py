"""Scanner-variation augmentation for training: what differs between hospitals' scanners.

Each effect acts in the log display, where OCT physics is simple: gain shifts, dynamic
range scales, gamma bends; attenuation is a ramp in depth; speckle strength is additive
noise; a noise floor lifts the darkest pixels; the PSF blurs axially and laterally; probe
contact tilts and shifts the surface. Measured at the default 160-step budget it did not
help on top of intensity standardisation (docs/scanner-shift.md), so it is off by default
(``train.scanner_augment: 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _blur_1d(x: Tensor, sigma: float, dim: int) -> Tensor:
    """Gaussian blur of a (1, 1, H, W) tensor along H (dim=2) or W (dim=3), reflect padding."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    if dim == 2:
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))


def _tilt(g: Tensor, degrees: float, shift: float) -> Tensor:
    """Rotate by ``degrees`` and move down by ``shift`` (fraction of height); zero fill."""
    a = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), -2 * shift]], dtype=g.dtype
    )
    grid = F.affine_grid(theta[None], list(g.shape), align_corners=False)
    return F.grid_sample(g, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class ScannerAugment:
    """Random scanner variation on a (3, H, W) [0, 1] B-scan; each effect fires with ``p``.

    Draws from torch's global RNG, like the crop and flip before it, so a seeded run
    repeats exactly.
    """

    p: float = 0.5
    gain: float = 0.1  # additive shift, display units
    contrast: tuple[float, float] = (0.75, 1.3)  # dynamic-range scale
    gamma: tuple[float, float] = (0.7, 1.45)
    attenuation: float = 0.2  # +- display units lost (or gained) from top to bottom
    speckle: float = 0.06  # max std of added log-domain noise
    noise_floor: float = 0.2  # max lifted floor
    blur: tuple[float, float] = (1.2, 0.8)  # max axial, lateral PSF sigma, output pixels
    tilt_deg: float = 5.0
    shift: float = 0.06  # max vertical surface shift, fraction of height

    def _fires(self) -> bool:
        return float(torch.rand(())) < self.p

    def __call__(self, image: Tensor) -> Tensor:
        g = image.mean(0, keepdim=True)[None]  # (1, 1, H, W)
        h, w = g.shape[-2:]
        if self._fires():  # probe tilt and contact depth
            g = _tilt(g, _uniform(-self.tilt_deg, self.tilt_deg), _uniform(-1, 1) * self.shift)
        if self._fires():  # axial and lateral resolution
            g = _blur_1d(g, _uniform(0.1, self.blur[0]), dim=2)
            g = _blur_1d(g, _uniform(0.1, self.blur[1]), dim=3)
        if self._fires():  # depth attenuation: wavelength, focus, contact
            ramp = torch.linspace(0.0, 1.0, h).view(1, 1, h, 1)
            g = g - _uniform(-1, 1) * self.attenuation * ramp
        if self._fires():  # speckle strength (number of looks)
            g = g + _uniform(0, self.speckle) * torch.randn_like(g)
        if self._fires():  # noise floor
            g = torch.maximum(g, _uniform(0, self.noise_floor) * torch.rand_like(g))
        if self._fires():  # display gain, dynamic range and gamma
            g = (g - 0.5) * _uniform(*self.contrast) + 0.5 + _uniform(-1, 1) * self.gain
            g = g.clamp(0.0, 1.0) ** math.exp(
                _uniform(math.log(self.gamma[0]), math.log(self.gamma[1]))
            )
        return g.clamp(0.0, 1.0)[0].expand(3, h, w).contiguous()
