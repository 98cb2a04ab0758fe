"""Structure awareness (docs/method.md): tissue mask -> ROI box -> masked attention pooling.

Everything here runs batched on the normalised image batch, on the model's device, so ROI
extraction is part of the timed train step and the data pipeline stays a plain image loader.
The only per-sample loop is :func:`roi_pool_reference`, kept for tests and benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from savlt_model.config import RoiConfig, resolve_path
from savlt_model.data.tissue import SurfaceDetector, unnormalise
from savlt_model.errors import SavltError
from savlt_model.model.unet import UNet, load_unet


class UNetMasker(nn.Module):
    """A trained, frozen U-Net as a mask source.

    The model's batch is re-normalised to the U-Net's own statistics and resized to its
    training size; the logits are resized back before thresholding at sigmoid 0.5 (logit 0).
    ``train()`` keeps the U-Net in eval mode so its BatchNorm statistics never drift.
    """

    def __init__(self, unet: UNet, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        for name, value in (("unet_mean", unet.mean), ("unet_std", unet.std)):
            self.register_buffer(name, torch.tensor(value).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> UNetMasker:
        super().train(mode)
        self.unet.eval()
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        size = images.shape[-2:]
        x = (unnormalise(images, self.mean, self.std) - self.unet_mean) / self.unet_std
        if tuple(size) != (self.unet.size, self.unet.size):
            x = F.interpolate(x, size=self.unet.size, mode="bilinear", align_corners=False)
        logits = self.unet(x)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return (logits.squeeze(1) > 0).float()


def build_mask_source(
    cfg: RoiConfig, mean: Sequence[float], std: Sequence[float]
) -> nn.Module | None:
    """The module that turns a normalised batch into tissue masks; None when ROI is off."""
    if cfg.source == "none":
        return None
    if cfg.source == "surface":
        return SurfaceDetector(mean, std)
    if not cfg.unet_checkpoint:
        raise SavltError(
            "config key 'model.roi.unet_checkpoint' is required when model.roi.source is 'unet' "
            "(train one with `savlt roi train`)"
        )
    return UNetMasker(load_unet(resolve_path(cfg.unet_checkpoint)), mean, std)


def roi_top(mask: Tensor, search_from: float = 0.1) -> Tensor:
    """Normalised top ``y`` of the ROI box ``(0, y, 1, 1)`` for each (H, W) mask in the batch.

    Rows are searched from ``floor(search_from * H)`` downward; the ROI starts at the first
    row whose tissue fraction equals the largest fraction among the searched rows. When some
    row is tissue across its whole width this is exactly the method's rule (first full row).
    Otherwise it falls back gracefully: a column that never turns to tissue (a shadow) does
    not throw the box away, the box starts where every other column has reached tissue; with
    no tissue at all every row ties at 0 and the box starts at ``search_from``.
    """
    if not 0.0 <= search_from < 1.0:
        raise SavltError(
            f"config key 'model.roi.search_from' must lie in [0, 1), got {search_from}"
        )
    h = mask.shape[1]
    start = min(int(search_from * h), h - 1)
    frac = (mask[:, start:] > 0.5).float().mean(dim=2)  # (B, H - start)
    hit = frac >= frac.amax(dim=1, keepdim=True)
    first = hit.float().argmax(dim=1)  # argmax returns the first of equal maxima
    return (first + start).float() / h


def patch_keep_mask(top: Tensor, grid: int) -> Tensor:
    """(B, grid*grid) bool, row-major like ViT tokens: patch row i is kept when i/grid >= top.

    The comparison is made in patch-row units with a 1e-4 tolerance, so a box top that falls
    exactly on a patch border (e.g. 16/224 vs 1/14 in float32) keeps that row. The last patch
    row is always kept, so attention pooling never sees an empty set.
    """
    rows = torch.arange(grid, device=top.device)
    keep_rows = (rows[None, :] >= top[:, None] * grid - 1e-4) | (rows[None, :] == grid - 1)
    return keep_rows[:, :, None].expand(-1, grid, grid).reshape(top.shape[0], grid * grid)


class RoiAttentionPool(nn.Module):
    """Multi-head attention pooling over the ROI patch tokens with one learned query.

    Initialisation: the query is zero, so every head's softmax is uniform over the kept
    tokens, and ``proj`` is the identity (zero bias); at step 0 the pool is exactly masked
    mean pooling, so CLIP's visual projection sees features on its usual scale. The query
    still gets a gradient at zero (tokens minus their mean), so attention is learned.
    """

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise SavltError(
                f"config key 'model.roi.heads': {heads} does not divide the token width {width}"
            )
        self.heads = heads
        self.head_dim = width // heads
        self.query = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(width))
            self.proj.bias.zero_()

    def forward(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """tokens (B, N, W), keep (B, N) bool with at least one True per row -> (B, W).

        One ``scaled_dot_product_attention`` call with a boolean mask: it equals masked_fill
        + softmax to ~1e-6 and is 1.5-3x faster on CPU forward+backward, because it never
        permutes the (B, N, W) tokens into a heads-first copy (benchmarks/bench_roi_pool.py).
        """
        b, n, w = tokens.shape
        kv = tokens.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        q = self.query.to(tokens.dtype).view(1, self.heads, 1, self.head_dim).expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, kv, kv, attn_mask=keep[:, None, None, :])
        return self.proj(out.reshape(b, w))


def roi_pool_reference(pool: RoiAttentionPool, tokens: Tensor, keep: Tensor) -> Tensor:
    """The original per-sample, per-head loop with ``pool``'s parameters (tests/benchmarks only)."""
    d = pool.head_dim
    out = []
    for b in range(tokens.shape[0]):
        roi = tokens[b][keep[b]]  # (n_kept, W)
        heads = []
        for h in range(pool.heads):
            th = roi[:, h * d : (h + 1) * d]
            weights = torch.softmax(th @ pool.query[h * d : (h + 1) * d] / math.sqrt(d), dim=0)
            heads.append(weights @ th)
        out.append(pool.proj(torch.cat(heads)))
    return torch.stack(out)


def mask_patch_tokens(x: Tensor, keep: Tensor) -> Tensor:
    """Zero the non-ROI patch tokens of (B, 1+N, W) activations; CLS (index 0) is kept."""
    cls = torch.ones(keep.shape[0], 1, dtype=torch.bool, device=keep.device)
    return x.masked_fill(~torch.cat([cls, keep], dim=1)[:, :, None], 0.0)
