"""Data pipeline throughput: first pass (decode + resize) vs cached passes (augment only).

Why: ImageSet decodes every file once per process and keeps uint8 tensors; after that a
training batch costs only RandomResizedCrop + flip + normalise. This measures both, on the
synthetic B-scans (PNG 8/16-bit and JPEG, like the real centres), so the data side can be
compared with the train-step throughput of bench_train_step.py.

    .venv/bin/python benchmarks/bench_data.py [--quick] [--threads N]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from common import machine, parser, report, setup

from savlt_model.config import CERVICAL_CLASSES
from savlt_model.data import folders, images
from synthetic.write import generate

SIZES = {"savlt-tiny": 128, "ViT-B-16": 224}
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _pass(dataset: images.ImageSet, batch: int) -> float:
    """Seconds for one epoch through the same loader train_steps uses (no workers)."""
    start = time.perf_counter()
    for _ in images.make_loader(dataset, batch, shuffle=True, seed=0):
        pass
    return time.perf_counter() - start


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup(args)
    start = machine(device)
    passes = 2 if args.quick else 5
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        generate(root, scale=0.1 if args.quick else 0.3, progress=False)
        samples = [
            s
            for centre in ("mixed", "huaxi", "xiangya")
            for s in folders.scan_center(root, centre, list(CERVICAL_CLASSES))
        ]
        for name, size in SIZES.items():
            images._DECODED.clear()  # first pass must decode from disk
            t0 = time.perf_counter()
            train_set = images.ImageSet(samples, size, MEAN, STD, train=True)
            decode = time.perf_counter() - t0
            t0 = time.perf_counter()  # the default decode: + per-B-scan standardisation
            images.ImageSet(samples, size, MEAN, STD, train=False, intensity="percentile")
            standardised = time.perf_counter() - t0
            eval_set = images.ImageSet(samples, size, MEAN, STD, train=False)
            n = len(samples)
            augment = statistics.median(_pass(train_set, 32) for _ in range(passes))
            plain = statistics.median(_pass(eval_set, 64) for _ in range(passes))
            rows.append((name, size, n, n / decode, n / standardised, n / augment, n / plain))
    headers = (
        "backbone",
        "px",
        "images",
        "decode img/s",
        "decode+std img/s",
        "augment img/s",
        "eval img/s",
    )
    report("data", args, device, headers, rows, start, passes=passes)


if __name__ == "__main__":
    main()
