"""Upload and download bytes per hospital and round vs the size of the frozen backbone.

Why: a hospital uploads only the trainable payload (LoRA factors, ROI pooling, prototypes,
visual projection); target: one upload < 1% of the ViT-B/16 weights. In FedEx mode the
server's download also carries one dense residual per LoRA layer (the size of the frozen
in-projection), which this reports next to the upload. Random weights: only shapes count.

    .venv/bin/python benchmarks/bench_payload.py [--quick]
"""

from __future__ import annotations

import gc

import torch
from common import machine, parser, report, setup

from savlt_model.config import load_config
from savlt_model.model.adapters import residual_targets, trainable_state
from savlt_model.model.backbone import load_backbone
from savlt_model.model.savlt import SavltModel

RANKS = (4, 8, 16)


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup(args)
    start = machine(device)
    names = ["savlt-tiny", "ViT-B-16"] + ([] if args.quick else ["ViT-L-14"])
    rows = []
    for name in names:
        backbone = load_backbone(name)
        full = _bytes(list(backbone.model.state_dict().values()))
        for r in RANKS:
            cfg = load_config(None, [f"model.name={name}", f"model.lora.r={r}"])
            model = SavltModel(cfg, backbone)
            upload = _bytes(list(trainable_state(model).values()))
            residual = _bytes([w for w, _ in residual_targets(model).values()])
            pct = 100 * upload / full
            target = ("met" if pct < 1 else "not met") if name == "ViT-B-16" else "-"
            rows.append((name, r, full / 2**20, upload / 2**20, pct, residual / 2**20, target))
            del model
            gc.collect()
        del backbone
        gc.collect()
    headers = ("model", "r", "backbone MiB", "upload MiB", "upload %", "FedEx resid MiB", "target")
    report("payload", args, device, headers, rows, start)


if __name__ == "__main__":
    main()
