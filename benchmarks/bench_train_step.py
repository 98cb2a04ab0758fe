"""Full SAVLT train step vs frozen forward-only throughput of the same backbone, as a ratio.

Why: the step adds ROI mask extraction, ROI pooling, both losses, backward through the LoRA
blocks and an AdamW step on top of the backbone's forward; the ratio says how much of the
frozen-inference speed training keeps (target on GPU: >= 0.45x for ViT-B/16). The step is
written out here (not train.train_steps) so that bf16 autocast can be timed on its own.

    .venv/bin/python benchmarks/bench_train_step.py [--quick] [--threads N]
    .venv/bin/python benchmarks/bench_train_step.py --device cuda --amp bf16 [--compile]

``--compile`` also times the step through ``torch.compile`` (first call reported apart) and
writes ``train_step_compile*.json``.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch
from common import autocast, machine, median_ms, parser, report, setup, sync, table

from savlt_model.config import load_config
from savlt_model.model.adapters import payload_parameters
from savlt_model.model.backbone import load_backbone
from savlt_model.model.savlt import SavltModel

# row label: (backbone, LoRA blocks (None: all, the default), CPU batch, GPU batch). Fewer
# LoRA blocks stop backward early: what a hospital on a weak machine can trade.
MODELS = {
    "savlt-tiny": ("savlt-tiny", None, 32, 128),
    "ViT-B-16": ("ViT-B-16", None, 4, 64),
    "ViT-B-16, LoRA last 4": ("ViT-B-16", 4, 4, 64),
}
PHASES = ("ROI mask", "forward + loss", "backward", "optimizer")


def phase_ms(
    model: SavltModel,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    amp: str,
    repeats: int,
) -> list[float]:
    """Median ms of each part of the step, synchronised between parts: where the time goes.

    "forward + loss" includes the ROI mask, which is also timed on its own.
    """
    device = images.device
    times: list[list[float]] = [[] for _ in PHASES]

    def timed(i: int, fn: Callable[[], object]) -> object:
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times[i].append((time.perf_counter() - t) * 1e3)
        return out

    for _ in range(repeats):
        with torch.no_grad():
            timed(0, lambda: model.roi_keep(images))
        with autocast(device, amp):
            loss = timed(1, lambda: model.loss(model(images), labels))
        optimizer.zero_grad(set_to_none=True)
        timed(2, loss.backward)
        timed(3, optimizer.step)
    return [statistics.median(t) for t in times]


def savlt_step(
    model: SavltModel,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    amp: str,
    compiled: bool = False,
) -> Callable[[], None]:
    """One full SAVLT train step, the model called eagerly or through ``torch.compile``."""
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        with autocast(images.device, amp):
            loss = model.loss(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def host_syncs(step: Callable[[], None]) -> int:
    """How many times one step makes the host wait for the GPU (CUDA's sync debug mode)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd step")
    args = p.parse_args()
    device = setup(args)
    start = machine(device)
    gpu = device.type == "cuda"
    warmup, repeats = (1, 2) if args.quick else ((3, 10) if gpu else (1, 5))
    names = ["savlt-tiny"] if args.quick and not gpu else list(MODELS)
    rows, phases, compiled, syncs = [], [], [], {}
    for name in names:
        backbone_name, last_n, cpu_batch, gpu_batch = MODELS[name]
        backbone = load_backbone(backbone_name)
        cfg = load_config(
            None, [f"model.name={backbone_name}", f"model.lora.last_n_blocks={last_n or 'null'}"]
        )
        torch.manual_seed(0)
        model = SavltModel(cfg, backbone).to(device).train()
        frozen = backbone.model.to(device).eval()
        optimizer = torch.optim.AdamW(payload_parameters(model).values(), lr=1e-4)
        batch = gpu_batch if gpu else cpu_batch
        size = backbone.image_size
        images = torch.randn(batch, 3, size, size, device=device)
        labels = torch.randint(0, len(model.classes), (batch,), device=device)

        train_step = savlt_step(model, optimizer, images, labels, args.amp)

        @torch.no_grad()
        def forward(frozen: torch.nn.Module = frozen, images: torch.Tensor = images) -> None:
            with autocast(device, args.amp):
                frozen.encode_image(images)

        ms = median_ms({"step": train_step, "forward": forward}, device, warmup, repeats)
        step_ms, fwd_ms = ms["step"], ms["forward"]
        if gpu:
            syncs[name] = host_syncs(train_step)
        ratio = fwd_ms / step_ms
        if name == "ViT-B-16" and gpu:
            target = "met" if ratio >= 0.45 else "not met"
        else:
            target = "not measured here" if name == "ViT-B-16" else "-"
        rows.append((name, size, batch, batch / step_ms * 1e3, batch / fwd_ms * 1e3, ratio, target))
        parts = phase_ms(model, optimizer, images, labels, args.amp, repeats)
        phases.append((name, fwd_ms, *parts, parts[2] / parts[1]))
        if args.compile:
            step = savlt_step(model, optimizer, images, labels, args.amp, compiled=True)
            sync(device)
            first = time.perf_counter()
            step()  # compiles
            sync(device)
            compile_s = time.perf_counter() - first
            ms = median_ms({"eager": train_step, "compiled": step}, device, warmup, repeats)
            eager_ms, fast_ms = ms["eager"], ms["compiled"]
            compiled.append((name, eager_ms, fast_ms, eager_ms / fast_ms, compile_s))
        del model, frozen, backbone, optimizer
    headers = ("model", "px", "batch", "train img/s", "frozen fwd img/s", "ratio", "target")
    phase_headers = ("model", "frozen fwd ms", *(f"{p} ms" for p in PHASES), "bwd / fwd")
    print(table(phase_headers, phases))
    compile_headers = ("model", "eager step ms", "compiled step ms", "speed-up", "compile s")
    if compiled:
        print(table(compile_headers, compiled))
    if syncs:
        print(f"host synchronisations in one train step: {syncs}")
    report(
        "train_step_compile" if args.compile else "train_step",
        args,
        device,
        headers,
        rows,
        start,
        repeats=repeats,
        host_syncs_per_step=syncs,
        phases={"columns": list(phase_headers), "rows": [list(r) for r in phases]},
        compiled={"columns": list(compile_headers), "rows": [list(r) for r in compiled]},
    )


if __name__ == "__main__":
    main()
