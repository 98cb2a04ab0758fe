"""``savlt roi train``: fit the tissue U-Net on the synthetic masks (a tool, not the model).

The trained checkpoint is then loaded frozen by :func:`savlt_model.model.unet.load_unet`.
Its baseline is the weight-free surface detector, scored on the same validation images.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from savlt_model.atomic import atomic_write
from savlt_model.data.folders import IMAGE_SUFFIXES
from savlt_model.data.tissue import SurfaceDetector
from savlt_model.errors import SavltError
from savlt_model.model.unet import ARCH, CLIP_MEAN, CLIP_STD, UNet


def _load_image(path: Path, size: int) -> np.ndarray:
    """Decode 8/16-bit grayscale, RGB or JPEG to (size, size, 3) uint8."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in {"I", "I;16", "I;16B", "I;16L", "F"}:
                a = np.asarray(im, dtype=np.float64)
                a = a / max(a.max(), 1e-12) * 255.0  # 16-bit: scale by max to 8-bit
                im = Image.fromarray(a.round().astype(np.uint8))
            im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError) as exc:
        raise SavltError(
            f"image {path} cannot be decoded ({exc}); delete or regenerate it"
        ) from exc
    return np.asarray(im, dtype=np.uint8)


def _load_mask(path: Path, size: int) -> np.ndarray:
    """Binary (size, size) mask; binarised at half its maximum so 0/1 and 0/255 both work."""
    try:
        with Image.open(path) as im:
            im = im if im.mode.startswith("I") else im.convert("L")
            a = np.asarray(im.resize((size, size), Image.Resampling.NEAREST), dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise SavltError(f"mask {path} cannot be decoded ({exc}); regenerate the masks") from exc
    return a > (a.max() / 2) if a.max() > 0 else np.zeros_like(a, dtype=bool)


def _find_pairs(data_root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs: ROOT/<centre>/images/<class>/<stem>.* + masks/<class>/<stem>.png."""
    if not data_root.is_dir():
        raise SavltError(f"--data {data_root} is not a folder; point it at the synthetic DATA root")
    pairs = []
    # held-out scanner centres (held_out.json) are test-only: never train on them
    centres = (p for p in data_root.iterdir() if (p / "images").is_dir())
    for centre in sorted(c for c in centres if not (c / "held_out.json").is_file()):
        masks = centre / "masks"
        if not masks.is_dir():
            raise SavltError(
                f"masks folder {masks} does not exist; regenerate the synthetic data with masks"
            )
        for image in sorted((centre / "images").glob("*/*")):
            if image.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            mask = masks / image.parent.name / f"{image.stem}.png"
            if not mask.is_file():
                raise SavltError(
                    f"mask {mask} for image {image} does not exist; regenerate the masks"
                )
            pairs.append((image, mask))
    if not pairs:
        raise SavltError(f"no images found under {data_root}/<centre>/images/<class>/")
    return pairs


def _dice(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image Dice of (B, H, W) binary masks; two empty masks count as a perfect 1."""
    inter = (pred * target).flatten(1).sum(1)
    total = pred.flatten(1).sum(1) + target.flatten(1).sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def _normalise(images_u8: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (images_u8.float() / 255.0 - mean) / std


@torch.no_grad()
def _mean_dice(
    masker: Callable[[Tensor], Tensor],
    images_u8: Tensor,
    masks: Tensor,
    mean: Tensor,
    std: Tensor,
    batch_size: int,
) -> float:
    scores = [
        _dice(
            masker(_normalise(images_u8[i : i + batch_size], mean, std)), masks[i : i + batch_size]
        )
        for i in range(0, len(images_u8), batch_size)
    ]
    return float(torch.cat(scores).mean()) if scores else float("nan")


def train_unet(
    data_root: Path,
    out: Path,
    epochs: int = 3,
    size: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> dict:
    """Train the U-Net on the synthetic tissue masks and write ``out`` (.safetensors) atomically.

    Images are held in memory as uint8 (5,000 images at 128 px: ~250 MB) and normalised per
    batch. 80/20 train/val split by a seeded shuffle; BCE + soft-Dice loss, AdamW, horizontal flips.
    Returns train/val Dice and, as a baseline, the weight-free SurfaceDetector's val Dice.
    """
    data_root, out = Path(data_root), Path(out)
    if out.suffix != ".safetensors":
        raise SavltError(f"--out {out} must be a .safetensors file, e.g. runs/roi/unet.safetensors")
    if size % 32 or size < 32:
        raise SavltError(f"--size {size} must be a positive multiple of 32 (ResNet-18 strides)")
    if epochs < 1:
        raise SavltError(f"--epochs {epochs} must be >= 1")
    pairs = _find_pairs(data_root)
    if len(pairs) < 2:
        raise SavltError(
            f"only {len(pairs)} image under {data_root}; need at least 2 for train/val"
        )

    random.Random(seed).shuffle(pairs)
    torch.manual_seed(seed)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    images = torch.from_numpy(np.stack([_load_image(p, size) for p, _ in pairs]))
    images = images.permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8
    masks = torch.from_numpy(np.stack([_load_mask(q, size) for _, q in pairs])).float()
    n_val = max(1, round(0.2 * len(pairs)))
    x_val, y_val, x_tr, y_tr = images[:n_val], masks[:n_val], images[n_val:], masks[n_val:]

    net = UNet(size, mean, std)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = epochs * ((len(x_tr) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc="roi unet", unit="step", disable=not progress)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_tr)).split(batch_size):
            x, y = _normalise(x_tr[idx], m, s), y_tr[idx]
            flip = torch.rand(len(idx)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None, None], y.flip(-1), y)
            logits = net(x).squeeze(1)
            prob = logits.sigmoid()
            soft_dice = (2 * (prob * y).sum((1, 2)) + 1) / (prob.sum((1, 2)) + y.sum((1, 2)) + 1)
            loss = F.binary_cross_entropy_with_logits(logits, y) + (1 - soft_dice).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    net.eval()

    def unet_mask(x: Tensor) -> Tensor:
        return (net(x).squeeze(1) > 0).float()

    result = {
        "train_dice": _mean_dice(unet_mask, x_tr, y_tr, m, s, batch_size),
        "val_dice": _mean_dice(unet_mask, x_val, y_val, m, s, batch_size),
        "surface_val_dice": _mean_dice(SurfaceDetector(mean, std), x_val, y_val, m, s, batch_size),
        "n_train": len(x_tr),
        "n_val": n_val,
        "epochs": epochs,
        "size": size,
    }
    meta = {
        "arch": ARCH,
        "size": size,
        "mean": list(net.mean),
        "std": list(net.std),
        "dice": result,
    }
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(out, lambda p: save_file(state, str(p), metadata={"savlt": json.dumps(meta)}))
    return {**result, "out": str(out)}
