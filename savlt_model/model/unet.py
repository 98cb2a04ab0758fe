"""The tissue-segmentation U-Net (docs/method.md, structure awareness): ResNet-18 encoder,
one sigmoid output.

Trained once on the synthetic masks (``savlt roi train``, :mod:`tools.unet_train`) and then
used frozen as a mask source. The decoder is deliberately narrow so that training at 128 px
runs on a laptop CPU.
Checkpoints are ``.safetensors`` files whose metadata carries the preprocessing contract
(input size, mean, std) along with the Dice scores it reached.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from safetensors import safe_open
from torch import Tensor, nn

from savlt_model.errors import SavltError

ARCH = "unet-resnet18"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _Up(nn.Module):
    """Upsample x2, concatenate the encoder skip, two 3x3 convolutions."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.block = nn.Sequential(_conv_bn_relu(cin + skip, cout), _conv_bn_relu(cout, cout))

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.block(x if skip is None else torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """U-Net on a torchvision ResNet-18 (random init: no weights can be downloaded here).

    ``size``, ``mean`` and ``std`` are the preprocessing the weights were trained with;
    they travel in the checkpoint so a mask source can re-normalise any backbone's batch.
    Input side must be a multiple of 32. Output: (B, 1, S, S) logits.
    """

    def __init__(
        self,
        size: int = 128,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        super().__init__()
        self.size = size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        r = torchvision.models.resnet18(weights=None)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu)  # 64 @ S/2
        self.pool = r.maxpool
        self.enc = nn.ModuleList([r.layer1, r.layer2, r.layer3, r.layer4])  # 64..512 @ S/4..S/32
        self.up4 = _Up(512, 256, 128)  # S/16
        self.up3 = _Up(128, 128, 64)  # S/8
        self.up2 = _Up(64, 64, 48)  # S/4
        self.up1 = _Up(48, 64, 32)  # S/2
        self.up0 = _Up(32, 0, 16)  # S
        self.head = nn.Conv2d(16, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        s0 = self.stem(x)
        s1 = self.enc[0](self.pool(s0))
        s2 = self.enc[1](s1)
        s3 = self.enc[2](s2)
        y = self.up4(self.enc[3](s3), s3)
        y = self.up1(self.up2(self.up3(y, s2), s1), s0)
        return self.head(self.up0(y, None))


def load_unet(path: str | Path) -> UNet:
    """Load a checkpoint written by :func:`train_unet`, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise SavltError(
            f"U-Net checkpoint {path} does not exist; train one with `savlt roi train`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["savlt"])
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        if meta["arch"] != ARCH:
            raise ValueError(f"arch {meta['arch']!r} is not {ARCH!r}")
        net = UNet(int(meta["size"]), meta["mean"], meta["std"])
        net.load_state_dict(state)
    except Exception as exc:  # safetensors raises its own error types; all mean "bad file"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SavltError(
            f"U-Net checkpoint {path} is not a valid {ARCH} .safetensors file ({first}); "
            "retrain it with `savlt roi train`"
        ) from exc
    return net.eval()
