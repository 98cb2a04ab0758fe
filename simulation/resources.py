"""What each simulated hospital's Ray actor gets: CPUs, a GPU share, how many run at once.

Flower's Ray backend reads ``backend_config = {"client_resources": {...}, "init_args":
{...}}``: each ClientApp actor reserves ``client_resources`` and Flower starts as many
actors as the Ray cluster's nodes fit (``pool_size_from_resources``). Ray hides the GPUs
from an actor that asks for none, so a GPU share is what lets hospitals train on CUDA.
This module turns the config's ``simulation`` section into that dict (``savlt simulate``)
and into ``flwr run``'s ``--federation-config`` (the same numbers), and says in the log
what every actor got.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from savlt_model.config import Config
from savlt_model.errors import SavltError
from savlt_model.model.adapters import payload_parameters
from savlt_model.model.build import autocast, build_model, cached_backbone, pick_device

log = logging.getLogger(__name__)
GiB = 1024**3
# Per actor process on top of what the allocator reserves for one step: the CUDA context
# and the kernels it loads (0.3-0.6 GiB on recent GPUs and torch), rounded up to be safe.
CUDA_CONTEXT_BYTES = 1 * GiB
GPU_SHARE_DECIMALS = 4  # Ray keeps GPU fractions to 1e-4; round down so k shares fit in 1


@dataclass(frozen=True)
class ActorResources:
    """Resources of every ClientApp actor, and where Ray runs."""

    cpus: float
    gpus: float
    max_actors: int  # 0: as many as fit
    address: str | None  # None: a local Ray started by the simulation
    need_bytes: int | None = None  # measured GPU memory of one actor (auto share only)

    def backend_config(self) -> dict:
        """``run_simulation``'s backend_config (JSON-serialisable, as Flower sends it)."""
        init_args: dict = {}
        if self.address is not None:
            init_args["address"] = self.address
        if self.max_actors:  # Flower fits int(num_cpus / cpus) actors on the local node
            init_args["num_cpus"] = int(self.max_actors * self.cpus)
        return {
            "client_resources": {"num_cpus": self.cpus, "num_gpus": self.gpus},
            "init_args": init_args,
        }

    def federation_config(self, hospitals: int) -> str:
        """``flwr run . --federation-config "<this>"``: the same resources for Flower's own
        local SuperLink (whose proto takes whole CPUs per ClientApp and no Ray address)."""
        if not float(self.cpus).is_integer():
            raise SavltError(
                f"config key 'simulation.client_cpus' is {self.cpus:g}: flwr run takes a whole "
                "number of CPUs per ClientApp; use 1, 2, ..."
            )
        parts = [
            f"num-supernodes={hospitals}",
            f"client-resources-num-cpus={int(self.cpus)}",
            f"client-resources-num-gpus={self.gpus}",
        ]
        if self.max_actors:
            parts.append(f"init-args-num-cpus={int(self.max_actors * self.cpus)}")
        return " ".join(parts)

    def describe(self, hospitals: int) -> str:
        """One log line: what each actor got and how many run at once."""
        gpu = "no GPU" if not self.gpus else f"GPU share {self.gpus:g}"
        if self.need_bytes is not None:
            gpu += f" (one actor needs {self.need_bytes / GiB:.2f} GiB, measured)"
        concurrent = f"at most {self.max_actors}" if self.max_actors else "as many as fit"
        where = f"Ray cluster at {self.address}" if self.address else "a local Ray"
        return (
            f"{hospitals} hospitals: each ClientApp actor gets {self.cpus:g} CPU(s), {gpu}; "
            f"{concurrent} actors at once, on {where}"
        )


def gpu_share(need_bytes: int, gpu_bytes: int, gpus: int, hospitals: int) -> float:
    """The smallest GPU fraction that fits ``need_bytes``, at most 1.

    k actors share one GPU when k of them fit its memory next to the driver's own use
    (server model, evaluation: one actor's worth is left free on every GPU); k never
    exceeds the hospitals each GPU has to serve (ceil(hospitals / gpus)), so a few
    hospitals spread over the GPUs instead of crowding one. The share is 1/k rounded down
    to Ray's precision, so Flower's int(gpus / share) gives k actors per GPU. When not even
    one fits beside the driver, each actor gets a whole GPU.
    """
    if need_bytes <= 0 or gpu_bytes <= 0 or gpus < 1 or hospitals < 1:
        raise ValueError(
            f"gpu_share needs positive sizes and counts, got need {need_bytes}, "
            f"gpu {gpu_bytes}, gpus {gpus}, hospitals {hospitals}"
        )
    fit = gpu_bytes // need_bytes - 1
    if fit < 1:
        return 1.0
    k = min(fit, math.ceil(hospitals / gpus))
    scale = 10**GPU_SHARE_DECIMALS
    return math.floor(scale / k) / scale


def measure_step_bytes(cfg: Config, seed: int) -> int:
    """GPU bytes one actor needs: one training step and one eval batch of the configured
    backbone and batch sizes (random images), as the caching allocator reserved them, plus
    the CUDA context (:data:`CUDA_CONTEXT_BYTES`). Measured in this (the driver) process."""
    device = pick_device(cfg.train.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = build_model(cfg, seed)
    size = cached_backbone(cfg.model.name, cfg.model.pretrained).image_size
    batch = cfg.train.batch_size
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, len(model.classes), (batch,), device=device)
    model.train()
    optimizer = torch.optim.AdamW(payload_parameters(model).values(), lr=cfg.train.lr)
    with autocast(device, cfg.train.amp):
        loss = model.loss(model(images), labels)
    loss.backward()
    optimizer.step()
    model.eval()
    evals = torch.randn(cfg.train.eval_batch_size, 3, size, size, device=device)
    with torch.no_grad(), autocast(device, cfg.train.amp):
        model(evals)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_reserved(device)
    del model, optimizer, loss, images, evals
    torch.cuda.empty_cache()
    return int(peak) + CUDA_CONTEXT_BYTES


def actor_resources(cfg: Config, seed: int) -> ActorResources:
    """The config's ``simulation`` section with ``client_gpus: auto`` resolved.

    auto: 0 when training runs on the CPU (no CUDA here, or ``train.device: cpu``: today's
    behaviour); on CUDA, :func:`gpu_share` of the measured need over the visible GPUs
    (the smallest of them). On a cluster the driver's GPUs stand for every node's: set
    ``client_gpus`` explicitly when they differ.
    """
    sim = cfg.simulation
    need = None
    if sim.client_gpus != "auto":
        gpus = float(sim.client_gpus)
    elif pick_device(cfg.train.device).type != "cuda":
        gpus = 0.0
    else:
        need = measure_step_bytes(cfg, seed)
        count = torch.cuda.device_count()
        smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(count))
        gpus = gpu_share(need, smallest, count, cfg.fl.hospitals)
        if need > smallest:
            log.warning(
                "one actor needs %.1f GiB, more than a GPU's %.1f GiB: each gets a whole GPU "
                "and may run out of memory; lower train.batch_size or model.lora.last_n_blocks",
                need / GiB,
                smallest / GiB,
            )
    return ActorResources(sim.client_cpus, gpus, sim.max_actors, sim.ray_address, need)
