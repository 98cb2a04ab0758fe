"""Scanner randomisation for training: each training scan re-imaged by a random scanner.

Why (issue #24): a model trained on three sites' scanners meets scanners outside their
ranges. Instead of mapping a new scanner back after the fact, every training image is
shown through a random scanner drawn per image from ranges a physical OCT system can
plausibly take, deliberately wider than any one hospital's (``train.scanner_augment: p``,
each effect fires with probability p; off by default). It runs where the image is, at
each hospital on its own scans, so nothing new leaves a hospital.

How: the decoded display is read back through a nominal log display (:data:`NOMINAL_RANGE_DB`,
gamma 1) to linear intensity, the physical effects act on that intensity below the tissue
surface (the weight-free detector's mask), and the result is displayed again with a drawn
range, gain and gamma, then exported (resampling, JPEG) and standardised exactly as
decoding does (``data.intensity``). Nothing fires: the image is returned unchanged.

The ranges, in model-input pixels (the B-scan squashed to the backbone's size, about 12-25
um per pixel for 1.5-3 mm imaged), and why (none is read from the synthetic generator):

- displayed dynamic range 20-60 dB: handheld and low-cost systems show 20-30 dB above
  their floor, high-end swept-source systems 50-60 dB;
- display gain -8..+4 dB: where the window sits, as vendors and users set it (beyond
  that the tissue leaves a 20 dB window, which nobody would read);
- noise floor -40..-15 dB below the brightest tissue: 40 dB SNR (deep stroma visible)
  down to 15 dB (a noisy probe whose deep tissue drowns);
- display gamma 0.5-2: square-root to square look-up tables;
- attenuation -3..+4 e-folds over the image height, on top of the scan's own: tissue
  attenuation of 2-10 /mm over 1-2 mm at 800-1300 nm gives 1-10 e-folds in total;
- axial and lateral blur 0-1.5 px (sigma): axial resolution 3-15 um, lateral 8-30 um;
- resampling to 40-100 % per axis and back: A-scan density and the file's native size;
- JPEG quality 40-95: viewers and PACS export lossy files;
- layer contrast: local mean reflectivity raised to 0.5-1.8 (wavelength, polarisation,
  roll-off change how strongly layers differ);
- speckle: extra multiplicative speckle of 0.8-8 looks (no averaging to 8-frame
  averaging), correlated over 0-1.5 px (the coherence gate and PSF set the grain);
- vessel-like shadows: Poisson mean 0-8 per B-scan, 0.5-3 px half-width (10-60 um
  superficial vessels), 20-95 % of the signal lost below them;
- specular and saturation: a saturated vertical flash from the surface (half the time)
  and the top 0-35 % of the display range clipped to white (detector or display);
- probe tilt up to 8 degrees and contact depth up to 8 % of the height.

Draws come from torch's global RNG, like the crop and flip before it, so a seeded run
repeats exactly.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from savlt_model.data.intensity import standardise_bscan, tissue_mask

NOMINAL_RANGE_DB = 40.0  # the display a decoded (standardised) scan is read back through
Range = tuple[float, float]


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _blur_1d(x: Tensor, sigma: float, dim: int) -> Tensor:
    """Gaussian blur of a (1, 1, H, W) tensor along H (dim=2) or W (dim=3), reflect padding."""
    if sigma <= 0.05:
        return x
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    if dim == 2:
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))


def _blur(x: Tensor, axial: float, lateral: float) -> Tensor:
    return _blur_1d(_blur_1d(x, axial, dim=2), lateral, dim=3)


def _tilt(g: Tensor, degrees: float, shift: float) -> Tensor:
    """Rotate by ``degrees`` and move down by ``shift`` (fraction of height); zero fill."""
    a = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), -2 * shift]], dtype=g.dtype
    )
    grid = F.affine_grid(theta[None], list(g.shape), align_corners=False)
    return F.grid_sample(g, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _columns(w: int, count: int, half: Range) -> Tensor:
    """(W,) in [0, 1]: ``count`` soft vertical bands at random columns."""
    xs = torch.arange(w, dtype=torch.float32)
    band = torch.zeros(w)
    for _ in range(count):
        c, hw = _uniform(0, w), _uniform(*half)
        band = torch.maximum(band, torch.sigmoid((hw - (xs - c).abs()) * 1.5))
    return band


def _jpeg(g: Tensor, quality: int) -> Tensor:
    """Encode and decode a (1, 1, H, W) [0, 1] image as 8-bit JPEG at ``quality``."""
    grey = np.round(g[0, 0].numpy() * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as img:
        back = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(back)[None, None]


# effect -> the axes it draws, in the order the effects act
EFFECTS: dict[str, tuple[str, ...]] = {
    "tilt": ("tilt_deg", "shift"),
    "layer_contrast": ("layer_contrast",),
    "attenuation": ("attenuation",),
    "shadows": ("shadow_count", "shadow_strength"),
    "speckle": ("speckle_looks", "speckle_grain"),
    "noise": ("noise_db",),
    "blur": ("blur_axial", "blur_lateral"),
    "display": ("range_db", "gain_db", "gamma"),
    "saturation": ("saturation",),
    "resample": ("resample",),  # one draw per axis: resample_y, resample_x
    "jpeg": ("jpeg_quality",),
}


@dataclass(frozen=True)
class ScannerAugment:
    """A random scanner per call on a (3, H, W) [0, 1] B-scan; each effect fires with ``p``.

    ``intensity`` is the decoding's ``data.intensity``: the re-imaged scan is standardised
    the same way, as a new scanner's file would be. Ranges: see the module docstring.
    """

    p: float = 0.5
    intensity: str = "none"
    range_db: Range = (20.0, 60.0)
    gain_db: Range = (-8.0, 4.0)
    noise_db: Range = (-40.0, -15.0)
    gamma: Range = (0.5, 2.0)
    attenuation: Range = (-3.0, 4.0)  # extra e-folds over the image height
    blur_axial: Range = (0.0, 1.5)
    blur_lateral: Range = (0.0, 1.5)
    resample: Range = (0.4, 1.0)  # kept fraction of the pixels, per axis
    jpeg_quality: Range = (40.0, 95.0)
    layer_contrast: Range = (0.5, 1.8)
    speckle_looks: Range = (0.8, 8.0)
    speckle_grain: Range = (0.0, 1.5)
    shadow_count: Range = (0.0, 8.0)
    shadow_width: Range = (0.5, 3.0)
    shadow_strength: Range = (0.2, 0.95)
    saturation: Range = (0.0, 0.35)
    tilt_deg: Range = (-8.0, 8.0)
    shift: Range = (-0.08, 0.08)

    def ranges(self) -> dict[str, Range]:
        """Every drawn axis and its range."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("p", "intensity")
        }

    def draw(self) -> dict[str, float]:
        """One scanner: a value per axis of every effect that fires (the rest stay off)."""
        out: dict[str, float] = {}
        for effect, axes in EFFECTS.items():
            if float(torch.rand(())) >= self.p:
                continue
            if effect == "resample":
                out["resample_y"], out["resample_x"] = (_uniform(*self.resample) for _ in "yx")
            else:
                out.update({a: _uniform(*getattr(self, a)) for a in axes})
        return out

    def __call__(self, image: Tensor) -> Tensor:
        return self.apply(image, self.draw())

    def apply(self, image: Tensor, s: dict[str, float]) -> Tensor:
        """``image`` re-imaged by scanner ``s`` (:meth:`draw`)."""
        if not s:
            return image
        g = image.mean(0, keepdim=True)[None].float()  # (1, 1, H, W)
        h, w = g.shape[-2:]
        if "tilt_deg" in s:  # probe tilt and contact depth
            g = _tilt(g, s["tilt_deg"], s["shift"])
        mask = torch.from_numpy(tissue_mask(g[0, 0].numpy()))[None, None].float()
        depth = (mask.cumsum(dim=2) / h) * mask  # image heights below the surface
        inten = 10 ** ((g - 1) * NOMINAL_RANGE_DB / 10)  # back through the nominal display
        if "layer_contrast" in s:  # local mean reflectivity ** c, speckle kept
            local = _blur(inten, 2.0, 2.0)
            ref = local[mask > 0].median() if mask.sum() > 0 else local.median()
            inten = inten * (local / ref).clamp_min(1e-6) ** (s["layer_contrast"] - 1)
        if "attenuation" in s:
            inten = inten * torch.exp(-s["attenuation"] * depth)
        if "shadow_count" in s:  # superficial vessels shadow the tissue below them
            count = int(torch.poisson(torch.tensor(s["shadow_count"])))
            band = _columns(w, count, self.shadow_width).view(1, 1, 1, w)
            below = (depth * h > 2).float()
            inten = inten * (1 - s["shadow_strength"] * band * below)
        if "speckle_looks" in s:  # speckle of another number of looks and grain size
            looks = s["speckle_looks"]
            field = torch.distributions.Gamma(looks, looks).sample(g.shape)
            if s["speckle_grain"] > 0.05:
                blurred = _blur(field, s["speckle_grain"], s["speckle_grain"])
                field = 1 + (blurred - blurred.mean()) * (
                    field.std() / blurred.std().clamp_min(1e-6)
                )
            inten = inten * field.clamp_min(0)
        if "noise_db" in s:  # detector noise floor
            inten = inten + 10 ** (s["noise_db"] / 10) * torch.empty_like(inten).exponential_()
        if "blur_axial" in s:  # point-spread function
            inten = _blur(inten, s["blur_axial"], s["blur_lateral"])
        db = 10 * torch.log10(inten.clamp_min(1e-9)) + s.get("gain_db", 0.0)
        g = (1 + db / s.get("range_db", NOMINAL_RANGE_DB)).clamp(0, 1) ** s.get("gamma", 1.0)
        if "saturation" in s:  # a saturated flash at the surface; the top of the range clips
            if float(torch.rand(())) < 0.5:
                column = _columns(w, 1, (1.0, 3.0)).view(1, 1, 1, w)
                reach = (depth > 0) & (depth < _uniform(0.2, 1.0))
                g = torch.maximum(g, column * reach.float())
            g = (g / (1 - s["saturation"])).clamp(0, 1)
        if "resample_y" in s:  # fewer A-scans / rows, squashed back to the model's size
            small = (max(8, round(h * s["resample_y"])), max(8, round(w * s["resample_x"])))
            g = F.interpolate(g, size=small, mode="bilinear", antialias=True, align_corners=False)
            g = F.interpolate(g, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
        if "jpeg_quality" in s:
            g = _jpeg(g, round(s["jpeg_quality"]))
        if self.intensity != "none":  # decoded as any new scanner's file would be
            grey = g[0, 0].double().numpy()
            std = standardise_bscan(grey, tissue_mask(grey), self.intensity)
            g = torch.from_numpy(std).float()[None, None]
        return g.clamp(0.0, 1.0)[0].expand(3, h, w).contiguous()
