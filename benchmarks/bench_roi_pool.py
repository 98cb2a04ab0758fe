"""Batched ROI attention pooling vs the original per-sample loop, forward + backward.

Why: SAVLT_METHOD.md §3 reports the loop at 26x slower than one batched masked attention at
batch 128 on an H200; this checks the claim for our implementation on the hardware at hand.

    .venv/bin/python benchmarks/bench_roi_pool.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from savlt_model.roi import RoiAttentionPool, patch_keep_mask, roi_pool_reference

SHAPES = {"savlt-tiny": (8, 192), "ViT-B/16": (14, 768)}  # name: (patch grid, token width)
BATCHES = (32, 128)


def _time(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``step`` in milliseconds (synchronising CUDA around each call)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _step(pool: Callable[..., torch.Tensor], tokens: torch.Tensor, keep: torch.Tensor) -> None:
    pool(tokens, keep).sum().backward()


def bench(device: torch.device, warmup: int, repeats: int) -> list[tuple]:
    rows = []
    for name, (grid, width) in SHAPES.items():
        for batch in BATCHES:
            torch.manual_seed(0)
            pool = RoiAttentionPool(width).to(device)
            with torch.no_grad():
                pool.query.normal_()
            tokens = torch.randn(batch, grid * grid, width, device=device, requires_grad=True)
            keep = patch_keep_mask(torch.rand(batch, device=device) * 0.6, grid)

            fast = _time(partial(_step, pool, tokens, keep), device, warmup, repeats)
            reference = partial(roi_pool_reference, pool)
            slow = _time(partial(_step, reference, tokens, keep), device, warmup, repeats)
            rows.append((device.type, name, grid * grid, width, batch, fast, slow, slow / fast))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed repeats")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup, repeats = (1, 3) if args.quick else (3, 15)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, median of {repeats}")
    header = ("device", "shape", "N", "W", "batch", "batched ms", "reference ms", "speed-up")
    row = "{:<6} {:<10} {:>4} {:>4} {:>5} {:>11} {:>13} {:>9}"
    print(row.format(*header))
    for device in devices:
        for dev, name, n, w, b, fast, slow, ratio in bench(device, warmup, repeats):
            print(row.format(dev, name, n, w, b, f"{fast:.2f}", f"{slow:.2f}", f"{ratio:.1f}x"))


if __name__ == "__main__":
    main()
