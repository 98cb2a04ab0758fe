"""Full SAVLT train step vs frozen forward-only throughput of the same backbone, as a ratio.

Why: the step adds ROI mask extraction, ROI pooling, both losses, backward through the LoRA
blocks and an AdamW step on top of the backbone's forward; the ratio says how much of the
frozen-inference speed training keeps (target on GPU: >= 0.45x for ViT-B/16). The step is
written out here (not train.train_steps) so that bf16 autocast can be timed on its own.

    .venv/bin/python benchmarks/bench_train_step.py [--quick] [--threads N]
    .venv/bin/python benchmarks/bench_train_step.py --device cuda --amp bf16
"""

from __future__ import annotations

import torch
from common import autocast, machine, median_ms, parser, report, setup

from savlt_model.adapters import payload_parameters
from savlt_model.backbone import load_backbone
from savlt_model.config import load_config
from savlt_model.model import SavltModel

# model: (CPU batch, GPU batch)
MODELS = {"savlt-tiny": (32, 128), "ViT-B-16": (4, 64)}


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup(args)
    start = machine(device)
    gpu = device.type == "cuda"
    warmup, repeats = (1, 2) if args.quick else ((3, 10) if gpu else (1, 3))
    names = ["savlt-tiny"] if args.quick and not gpu else list(MODELS)
    rows = []
    for name in names:
        backbone = load_backbone(name)
        cfg = load_config(None, [f"model.name={name}"])
        torch.manual_seed(0)
        model = SavltModel(cfg, backbone).to(device).train()
        frozen = backbone.model.to(device).eval()
        optimizer = torch.optim.AdamW(payload_parameters(model).values(), lr=1e-4)
        batch = MODELS[name][1 if gpu else 0]
        size = backbone.image_size
        images = torch.randn(batch, 3, size, size, device=device)
        labels = torch.randint(0, len(model.classes), (batch,), device=device)

        def train_step(
            model: SavltModel = model,
            optimizer: torch.optim.Optimizer = optimizer,
            images: torch.Tensor = images,
            labels: torch.Tensor = labels,
        ) -> None:
            with autocast(device, args.amp):
                loss = model.loss(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        @torch.no_grad()
        def forward(frozen: torch.nn.Module = frozen, images: torch.Tensor = images) -> None:
            with autocast(device, args.amp):
                frozen.encode_image(images)

        step_ms = median_ms(train_step, device, warmup, repeats)
        fwd_ms = median_ms(forward, device, warmup, repeats)
        ratio = fwd_ms / step_ms
        if name == "ViT-B-16" and gpu:
            target = "met" if ratio >= 0.45 else "not met"
        else:
            target = "not measured here" if name == "ViT-B-16" else "-"
        rows.append((name, size, batch, batch / step_ms * 1e3, batch / fwd_ms * 1e3, ratio, target))
        del model, frozen, backbone, optimizer
    headers = ("model", "px", "batch", "train img/s", "frozen fwd img/s", "ratio", "target")
    report("train_step", args, device, headers, rows, start, repeats=repeats)


if __name__ == "__main__":
    main()
