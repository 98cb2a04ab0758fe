"""A plain LoRA train step with peft on nn.MultiheadAttention vs on LinearAttention.

Why: this is the measurement behind ``savlt_model.model.attention``. peft adapts open_clip's
``nn.MultiheadAttention`` by merging ``s B A`` into the frozen weights around every forward,
so backward forms dense weight gradients; on LinearAttention's Linears LoRA gradients flow
through the rank-r path only. Same backbone, same LoRA (every block, r 8, alpha 4, dropout
0.25), same loss (mean squared image embedding), AdamW; frozen forward as the reference. peft's
MultiheadAttention path skips dropout, so LinearAttention is also timed without it.

    .venv/bin/python benchmarks/bench_lora_attention.py [--quick] [--threads N]
    .venv/bin/python benchmarks/bench_lora_attention.py --device cuda --amp bf16
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from common import autocast, machine, median_ms, parser, report, setup
from peft import LoraConfig, get_peft_model

from savlt_model.model.attention import lora_targets
from savlt_model.model.backbone import load_backbone, vision_tower

# model: (CPU batch, GPU batch)
MODELS = {"savlt-tiny": (32, 128), "ViT-B-16": (4, 64)}


# label: (split into LinearAttention, LoRA dropout); peft's MHA path never applies dropout
VARIANTS = {
    "peft on MultiheadAttention": (False, 0.25),
    "LinearAttention": (True, 0.25),
    "LinearAttention, dropout 0": (True, 0.0),
}
BASELINE = "peft on MultiheadAttention"
FORWARD = "frozen forward"


def lora_step(
    clip: torch.nn.Module, split: bool, dropout: float, images: torch.Tensor, amp: str
) -> Callable[[], None]:
    """One train step of a copy of ``clip`` with LoRA on every vision attention, through
    peft's MultiheadAttention path or on LinearAttention's Linears."""
    clip = copy.deepcopy(clip)
    names = vision_tower(clip).attention_modules
    targets = lora_targets(clip, names) if split else names
    cfg = LoraConfig(r=8, lora_alpha=4, lora_dropout=dropout, target_modules=targets)
    model = get_peft_model(clip, cfg).to(images.device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with autocast(images.device, amp):
            loss = model.encode_image(images).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup(args)
    start = machine(device)
    gpu = device.type == "cuda"
    warmup, repeats = (1, 2) if args.quick else ((3, 10) if gpu else (1, 5))
    names = ["savlt-tiny"] if args.quick and not gpu else list(MODELS)
    rows = []
    for name in names:
        backbone = load_backbone(name)
        batch = MODELS[name][1 if gpu else 0]
        size = backbone.image_size
        images = torch.randn(batch, 3, size, size, device=device)
        frozen = backbone.model.to(device).eval()

        @torch.no_grad()
        def forward(frozen: torch.nn.Module = frozen, images: torch.Tensor = images) -> None:
            with autocast(device, args.amp):
                frozen.encode_image(images)

        torch.manual_seed(0)
        steps = {
            label: lora_step(frozen, split, dropout, images, args.amp)
            for label, (split, dropout) in VARIANTS.items()
        }
        ms = median_ms({FORWARD: forward, **steps}, device, warmup, repeats)
        for label in VARIANTS:
            speedup = ms[BASELINE] / ms[label]
            row = (name, batch, label, ms[label], batch / ms[label] * 1e3, ms[FORWARD] / ms[label])
            rows.append((*row, speedup))
        del steps, frozen, backbone
    headers = ("model", "batch", "LoRA on", "step ms", "img/s", "x frozen fwd", "speed-up")
    report("lora_attention", args, device, headers, rows, start, repeats=repeats)


if __name__ == "__main__":
    main()
