"""The tissue mask's vertical opening: boolean window shifts vs (k, 1) max-pools.

Why: the weight-free surface detector runs on every training batch (the ROI step) and on
every B-scan at decode (intensity standardisation). Its opening was two (k, 1) max-pools of
the 0/1 image and a cumulative max; ``savlt_model.data.tissue.below_surface`` does the same
with logical and / or over k shifted rows. This times both, round-robin, on a training
batch and on one full-resolution B-scan, and checks they agree to the bit.

    .venv/bin/python benchmarks/bench_tissue_mask.py [--quick] [--threads N]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import machine, median_ms, parser, report, setup

from savlt_model.data.tissue import below_surface

# (what, batch shape (B, H, W), k as the detector picks it: 2 * max(1, H // 64) + 1)
CASES = (("training batch", (32, 128, 128)), ("one B-scan at decode", (1, 224, 384)))


def max_pool_opening(tissue: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: min-pool then max-pool over k rows, clipped at the borders."""
    pool = {"kernel_size": (k, 1), "stride": 1, "padding": (k // 2, 0)}
    x = tissue.float()[:, None]
    return F.max_pool2d(-F.max_pool2d(-x, **pool), **pool).squeeze(1).cummax(dim=1).values


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup(args)
    start = machine(device)
    repeats = 10 if args.quick else 50
    rows = []
    for what, shape in CASES:
        k = 2 * max(1, shape[1] // 64) + 1
        tissue = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5
        same = torch.equal(below_surface(tissue, k), max_pool_opening(tissue, k))
        ms = median_ms(
            {
                "pool": lambda t=tissue, k=k: max_pool_opening(t, k),
                "shifts": lambda t=tissue, k=k: below_surface(t, k),
            },
            device,
            warmup=3,
            repeats=repeats,
        )
        rows.append((what, "x".join(map(str, shape)), k, ms["pool"], ms["shifts"], same))
        rows[-1] += (ms["pool"] / ms["shifts"],)
    headers = ("input", "B x H x W", "k", "max-pool ms", "shifts ms", "bit-identical", "speed-up")
    report("tissue_mask", args, device, headers, rows, start, repeats=repeats)


if __name__ == "__main__":
    main()
