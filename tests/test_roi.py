"""Structure awareness: masks, ROI box, patch selection, batched pooling, U-Net checkpoints."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from savlt_model.config import RoiConfig
from savlt_model.data.tissue import SurfaceDetector, below_surface
from savlt_model.errors import SavltError
from savlt_model.model.roi import (
    RoiAttentionPool,
    UNetMasker,
    build_mask_source,
    mask_patch_tokens,
    patch_keep_mask,
    roi_pool_reference,
    roi_top,
)
from savlt_model.model.unet import CLIP_MEAN, CLIP_STD, UNet, load_unet
from tools.unet_train import train_unet


def _normalise(rgb: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (rgb - mean) / std


def _bscan(size: int, surface: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark speckle above ``surface[col]``, a bright band decaying with depth below it."""
    rows = np.arange(size)[:, None].astype(np.float64)
    depth = rows - surface[None, :]
    img = np.abs(rng.normal(0.05, 0.04, (size, size)))
    tissue = 0.95 * np.exp(-depth.clip(0) / (size / 3)) + rng.normal(0, 0.05, (size, size))
    return np.where(depth >= 0, tissue, img).clip(0, 1)


# --- roi_top ----------------------------------------------------------------------------


def test_roi_top_flat_surface() -> None:
    mask = torch.zeros(1, 100, 40)
    mask[:, 30:] = 1
    assert roi_top(mask).tolist() == pytest.approx([0.30])


def test_roi_top_tilted_surface_is_deepest_surface_row() -> None:
    mask = torch.zeros(2, 100, 50)
    for col in range(50):
        mask[0, 20 + col // 2 :, col] = 1  # surface from row 20 (left) to row 44 (right)
        mask[1, 60 - col :, col] = 1  # from row 60 (left) up to row 11 (right)
    assert roi_top(mask).tolist() == pytest.approx([0.44, 0.60])


def test_roi_top_ignores_rows_above_search_start() -> None:
    mask = torch.ones(1, 100, 10)  # full-width tissue everywhere, even at row 0
    assert roi_top(mask, search_from=0.1).tolist() == pytest.approx([0.10])
    assert roi_top(mask, search_from=0.0).tolist() == pytest.approx([0.0])


def test_roi_top_no_tissue_falls_back_to_search_from() -> None:
    assert roi_top(torch.zeros(3, 64, 64), search_from=0.25).tolist() == pytest.approx([0.25] * 3)


def test_roi_top_shadow_column_falls_back_to_max_coverage_row() -> None:
    mask = torch.zeros(1, 100, 10)
    mask[:, 40:] = 1
    mask[:, :, 3] = 0  # a column that never turns to tissue: no row is full width
    assert roi_top(mask).tolist() == pytest.approx([0.40])


def test_roi_top_rejects_bad_search_from() -> None:
    with pytest.raises(SavltError, match="search_from"):
        roi_top(torch.zeros(1, 8, 8), search_from=1.0)


# --- patch_keep_mask --------------------------------------------------------------------


def test_patch_keep_mask_hand_computed() -> None:
    top = torch.tensor([0.0, 0.25, 0.3, 0.99])
    keep = patch_keep_mask(top, grid=4).view(4, 4, 4)
    assert keep[0].all()
    assert keep[1, :, 0].tolist() == [False, True, True, True]  # row 1 starts exactly at 0.25
    assert keep[2, :, 0].tolist() == [False, False, True, True]  # row 1 straddles the top
    assert keep[3, :, 0].tolist() == [False, False, False, True]  # last row is always kept
    assert (keep == keep[:, :, :1]).all()  # whole patch rows, row-major


def test_patch_keep_mask_float_border() -> None:
    # 16/224 and 1/14 differ in float32; the patch row starting on the border is still kept.
    keep = patch_keep_mask(torch.tensor([16 / 224], dtype=torch.float32), grid=14)
    assert keep.view(14, 14)[:, 0].tolist() == [False] + [True] * 13


# --- pooling ----------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "grid", "width", "heads"), [(5, 4, 32, 4), (7, 8, 48, 2)])
def test_batched_pool_matches_reference(batch: int, grid: int, width: int, heads: int) -> None:
    torch.manual_seed(0)
    pool = RoiAttentionPool(width, heads)
    with torch.no_grad():
        pool.query.normal_()
        pool.proj.weight.add_(0.1 * torch.randn(width, width))
        pool.proj.bias.normal_()
    keep = patch_keep_mask(torch.rand(batch), grid)
    tokens = torch.randn(batch, grid * grid, width)
    upstream = torch.randn(batch, width)

    grads = []
    for fn in (pool, lambda t, k: roi_pool_reference(pool, t, k)):
        pool.zero_grad()
        x = tokens.clone().requires_grad_()
        out = fn(x, keep)
        (out * upstream).sum().backward()
        grads.append((out.detach(), x.grad, pool.query.grad.clone(), pool.proj.weight.grad.clone()))
    for batched, reference in zip(*grads, strict=True):
        torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-5)
    assert (grads[0][1].view(batch, grid, grid, width)[~keep.view(batch, grid, grid)] == 0).all()


def test_pool_init_is_masked_mean() -> None:
    pool = RoiAttentionPool(16, 4)
    tokens = torch.randn(3, 9, 16)
    keep = patch_keep_mask(torch.tensor([0.0, 0.5, 1.0]), 3)
    expected = torch.stack([tokens[b][keep[b]].mean(0) for b in range(3)])
    torch.testing.assert_close(pool(tokens, keep), expected, atol=1e-6, rtol=1e-5)


def test_pool_rejects_heads_not_dividing_width() -> None:
    with pytest.raises(SavltError, match="heads"):
        RoiAttentionPool(30, 4)


def test_mask_patch_tokens_keeps_cls() -> None:
    x = torch.randn(2, 1 + 4, 8)
    keep = torch.tensor([[False, False, True, True], [True, False, True, False]])
    y = mask_patch_tokens(x, keep)
    assert torch.equal(y[:, 0], x[:, 0])
    assert torch.equal(y[:, 1:][keep], x[:, 1:][keep])
    assert (y[:, 1:][~keep] == 0).all()


# --- mask sources -----------------------------------------------------------------------


def test_surface_detector_finds_tilted_surface() -> None:
    size = 128
    rng = np.random.default_rng(0)
    surfaces = [np.linspace(25, 55, size), np.linspace(70, 40, size), np.full(size, 35.0)]
    gray = np.stack([_bscan(size, s, rng) for s in surfaces])
    images = _normalise(torch.tensor(gray, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1))
    mask = SurfaceDetector(CLIP_MEAN, CLIP_STD)(images)
    assert mask.shape == (3, size, size)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    found = mask.argmax(dim=1).numpy()  # first tissue row per column
    for b, surface in enumerate(surfaces):
        assert np.abs(found[b] - surface).max() <= 3, (b, np.abs(found[b] - surface).max())
        assert mask[b].sum(0).min() > 0  # every column has tissue down to the bottom
    tops = roi_top(mask).numpy() * size
    assert np.abs(tops - [55, 70, 35]).max() <= 3


@pytest.mark.parametrize(("shape", "k"), [((4, 128, 128), 5), ((1, 224, 384), 7), ((2, 3, 5), 9)])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.9])
def test_below_surface_is_the_max_pool_opening_and_cumulative_max(
    shape: tuple[int, int, int], k: int, density: float
) -> None:
    """The boolean opening equals the textbook one: (k, 1) max-pools of the 0/1 image
    (min-pool = -max-pool(-x)), padded so the window is clipped at the borders, then a
    cumulative max down each column."""
    tissue = torch.rand(shape, generator=torch.Generator().manual_seed(k)) < density
    x = tissue.float()[:, None]
    pool = {"kernel_size": (k, 1), "stride": 1, "padding": (k // 2, 0)}
    opened = F.max_pool2d(-F.max_pool2d(-x, **pool), **pool)
    expected = opened.squeeze(1).cummax(dim=1).values
    assert torch.equal(below_surface(tissue, k), expected)


def test_surface_detector_blank_image_has_no_tissue() -> None:
    images = _normalise(torch.zeros(2, 3, 64, 64))
    assert SurfaceDetector(CLIP_MEAN, CLIP_STD)(images).sum() == 0


def test_build_mask_source() -> None:
    assert build_mask_source(RoiConfig(source="none"), CLIP_MEAN, CLIP_STD) is None
    assert isinstance(build_mask_source(RoiConfig(), CLIP_MEAN, CLIP_STD), SurfaceDetector)
    with pytest.raises(SavltError, match="unet_checkpoint"):
        build_mask_source(RoiConfig(source="unet"), CLIP_MEAN, CLIP_STD)


def test_unet_forward_shape_and_masker() -> None:
    net = UNet(size=64).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64, 64)
    masker = UNetMasker(net, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).train()
    assert not masker.unet.training  # BatchNorm stays frozen inside a training model
    mask = masker(torch.randn(2, 3, 96, 96))  # resized to the U-Net's size and back
    assert mask.shape == (2, 96, 96)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def _write_dataset(root: Path, n: int = 10) -> None:
    rng = np.random.default_rng(1)
    for i in range(n):
        cls = "cyst" if i % 2 else "cancer"
        surface = np.full(40, 8.0 + i)
        gray = _bscan(40, surface, rng)
        (root / "c1" / "images" / cls).mkdir(parents=True, exist_ok=True)
        (root / "c1" / "masks" / cls).mkdir(parents=True, exist_ok=True)
        if i % 3 == 0:  # 16-bit PNG
            Image.fromarray((gray * 4000).astype(np.uint16)).save(
                root / f"c1/images/{cls}/s{i}.png"
            )
        elif i % 3 == 1:  # 8-bit grayscale JPEG
            Image.fromarray((gray * 255).astype(np.uint8)).save(root / f"c1/images/{cls}/s{i}.jpg")
        else:  # 8-bit RGB PNG
            rgb = np.repeat((gray * 255).astype(np.uint8)[:, :, None], 3, axis=2)
            Image.fromarray(rgb).save(root / f"c1/images/{cls}/s{i}.png")
        mask = (np.arange(40)[:, None] >= surface[None, :]).astype(np.uint8) * 255
        Image.fromarray(mask).save(root / f"c1/masks/{cls}/s{i}.png")


def test_train_unet_writes_loadable_checkpoint(tmp_path: Path) -> None:
    _write_dataset(tmp_path / "data")
    out = tmp_path / "ck" / "unet.safetensors"
    result = train_unet(tmp_path / "data", out, epochs=1, size=64, batch_size=4, progress=False)
    assert out.is_file()
    assert list(out.parent.iterdir()) == [out]  # no temporary left behind
    assert (result["n_train"], result["n_val"]) == (8, 2)
    for key in ("train_dice", "val_dice", "surface_val_dice"):
        assert 0.0 <= result[key] <= 1.0 and not math.isnan(result[key])
    net = load_unet(out)
    assert net.size == 64 and net.mean == pytest.approx(CLIP_MEAN)
    masker = build_mask_source(
        RoiConfig(source="unet", unet_checkpoint=str(out)), CLIP_MEAN, CLIP_STD
    )
    assert isinstance(masker, UNetMasker)
    assert masker(torch.randn(1, 3, 64, 64)).shape == (1, 64, 64)


def test_train_unet_missing_masks_folder(tmp_path: Path) -> None:
    _write_dataset(tmp_path, n=2)
    shutil.rmtree(tmp_path / "c1" / "masks")
    with pytest.raises(SavltError, match="masks"):
        train_unet(tmp_path, tmp_path / "u.safetensors", progress=False)


def test_load_unet_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(SavltError, match="does not exist"):
        load_unet(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SavltError, match="not a valid"):
        load_unet(bad)
