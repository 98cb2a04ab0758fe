"""Server aggregation time per round, and how wrong naive LoRA averaging is.

Why: the exact (FedEx) mode forms sum_k w_k B_k A_k densely for every LoRA layer each round;
this checks that it stays cheap next to a client's local epoch, up to 50 hospitals and on
ViT-B/16 shapes, and reports the naive product error on the same factors.

Factors are random: A ~ N(0, 1/in) like peft's init scale, B ~ N(0, 0.01) as after some
local steps from B = 0, each client = a shared part + an independent client part, so
the naive error depends on how far the clients drifted apart (the ``drift`` column). The
``first`` rows model round 1: every client starts from peft's B = 0, so B is all client part
while A moved only by ``drift`` from the common init.

    .venv/bin/python benchmarks/bench_aggregation.py [--quick] [--threads N]

Median of 3 calls (2 with --quick), float64 accumulation on the CPU as on the server.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from common import machine, median_ms, parser, report, setup, table

from savlt_model.config import Config, FederatedConfig, MethodsConfig
from savlt_model.methods.text_anchored import TextAnchoredConfig
from server.aggregation import ClientUpdate, aggregate

R = 8
CLASSES = 5
MODELS = {"savlt-tiny": (6, 192, 256), "ViT-B/16": (12, 768, 512)}  # blocks, width, embed
MODES = (("fedavg", "naive"), ("fedavg", "fedex"), ("text-anchored", "fedex"))


def _shapes(blocks: int, width: int, embed: int) -> dict[str, tuple[int, ...]]:
    """Payload shapes of the vision LoRA (fused in-projection + out-projection) and heads."""
    shapes: dict[str, tuple[int, ...]] = {
        "prototypes": (CLASSES, embed),
        "roi_pool.proj": (width, width),
        "roi_pool.query": (width,),
        "clip.visual.proj": (width, embed),
    }
    for i in range(blocks):
        for name, out in (("attn.qkv", 3 * width), ("attn.out_proj", width)):
            prefix = f"clip.visual.transformer.resblocks.{i}.{name}"
            shapes[f"{prefix}.lora_A.weight"] = (R, width)
            shapes[f"{prefix}.lora_B.weight"] = (out, R)
    return shapes


def _anchors(embed: int) -> torch.Tensor:
    """The server's frozen text anchors (unit rows) for the agreement of the uploads."""
    gen = torch.Generator().manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(CLASSES, embed, generator=gen), dim=-1)


def _random(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """peft-like scale for A (1/sqrt(in)); 0.01 for B and everything else."""
    scale = shape[-1] ** -0.5 if key.endswith(".lora_A.weight") else 0.01
    return scale * torch.randn(shape, generator=gen)


def _round(
    shapes: dict[str, tuple[int, ...]], clients: int, drift: float, seed: int, first: bool = False
) -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    """Global state and client updates: each client = common + drift * own, per tensor."""
    gen = torch.Generator().manual_seed(seed)
    glob = {k: _random(k, s, gen) for k, s in shapes.items()}
    if first:  # B = 0 at the start: the client B is entirely the client's own (drift 1/0)
        glob = {k: torch.zeros_like(t) if "lora_B" in k else t for k, t in glob.items()}
    own = {k: 1.0 if first and k.endswith(".lora_B.weight") else drift for k in glob}
    rng = np.random.default_rng(seed)
    updates = [
        ClientUpdate(
            node=f"h{k}",
            state={k: t + own[k] * _random(k, t.shape, gen) for k, t in glob.items()},
            num_examples=int(rng.integers(50, 500)),
            class_counts=rng.integers(1, 100, CLASSES).tolist(),
        )
        for k in range(clients)
    ]
    return glob, updates


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup(args)
    start = machine(device)
    models = {"savlt-tiny": MODELS["savlt-tiny"]} if args.quick else MODELS
    repeats = 2 if args.quick else 3
    rows = []
    for name, dims in models.items():
        shapes = _shapes(*dims)
        scalings = {
            k[: -len(".lora_A.weight")]: 2.0 for k in shapes if k.endswith(".lora_A.weight")
        }
        mb = sum(int(np.prod(s)) for s in shapes.values()) * 4 / 2**20
        for clients in (3, 10, 50):
            glob, updates = _round(shapes, clients, 1.0, seed=clients)
            for method, mode in MODES:
                fl = Config(
                    fl=FederatedConfig(lora_aggregation=mode),
                    methods=MethodsConfig(text_anchored=TextAnchoredConfig(anchor_lambda=1.0)),
                )
                step = partial(aggregate, updates, glob, method, fl, scalings, _anchors(dims[2]))
                ms = median_ms({"aggregate": step}, device, 1, repeats)["aggregate"]
                rows.append((name, clients, f"{method}-{mode}", ms, mb))
    errors = []
    name = "savlt-tiny" if args.quick else "ViT-B/16"
    shapes = _shapes(*MODELS[name])
    for clients in (3, 10):
        for first, drift in ((True, 0.05), (True, 0.2), (False, 0.1), (False, 0.3), (False, 1.0)):
            glob, updates = _round(shapes, clients, drift, 7, first)
            naive = Config(fl=FederatedConfig(lora_aggregation="naive"))
            _, _, rep = aggregate(updates, glob, "fedavg", naive, {}, _anchors(MODELS[name][2]))
            label = "first" if first else "later"
            mean, worst = rep["lora_naive_rel_error"], rep["lora_max_rel_error"]
            errors.append((name, clients, label, drift, mean, worst))
    error_headers = ("model", "clients", "round", "drift", "mean rel", "max rel")
    print("naive LoRA product error ||sum w BA - mean(B) mean(A)||_F / ||sum w BA||_F")
    print(table(error_headers, errors))
    print()
    report(
        "aggregation",
        args,
        device,
        ("model", "clients", "mode", "median ms", "payload MiB"),
        rows,
        start,
        repeats=repeats,
        naive_error={"columns": list(error_headers), "rows": [list(r) for r in errors]},
    )


if __name__ == "__main__":
    main()
