"""A short federated simulation on CUDA: do the hospitals' actors train on the GPU, and how
does a round compare with the same number of central steps on the same GPU?

Why: Ray hides the GPUs from an actor that asks for none, so before ``simulation.client_gpus``
the ClientApps of a GPU machine trained on the CPU. Target: a federated round's time within
1.5x of the same number of central steps (3 hospitals x ``fl.local_steps``).

3 hospitals (paper partition, by sub-site), ViT-B/16 shapes with random weights (nothing
downloaded), ``simulation.client_gpus: auto`` (the share the driver measures), and
``train.device: cuda``, so an actor without a GPU fails its hospital instead of quietly
training on the CPU. Each actor's use of the GPU is also read from the operating system: a
``ray::ClientAppActor`` process with ``/dev/nvidia*`` open (checked twice a second).

    benchmarks/gpu.sh   (runs: .venv/bin/python benchmarks/bench_gpu_federation.py
                         --device cuda --amp bf16)
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from bench_simulation import SMOKE, _rounds, _run
from common import machine, parser, report, setup, sync

from savlt_model.config import load_config
from savlt_model.data.partition import build_partition
from savlt_model.model.build import build_model, image_sets
from savlt_model.train import train_steps
from simulation.resources import actor_resources
from synthetic.write import generate

LOCAL_STEPS = 20


def _gpu_actor_pids() -> set[int]:
    """Ray ClientApp actors under this process that hold a /dev/nvidia* device open."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if not proc.cmdline()[:1] or not proc.cmdline()[0].startswith("ray::ClientAppActor"):
                continue
            fds = Path(f"/proc/{proc.pid}/fd")
            if any(os.readlink(fd).startswith("/dev/nvidia") for fd in fds.iterdir()):
                found.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError, IndexError):
            continue
    return found


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup(args)
    if device.type != "cuda" or not torch.cuda.is_available():
        sys.exit("bench_gpu_federation.py measures CUDA: run it with --device cuda on a GPU")
    start = machine(device)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("simulation.runner").setLevel(logging.INFO)  # what each actor got
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        generate(root, scale=0.5, progress=False)
        cfg = load_config(
            SMOKE,
            [
                f"data.root={root}",
                "data.synthetic.enabled=false",
                "data.shots=16",
                "model.name=ViT-B-16",
                "model.lora={r: 8, alpha: 4, dropout: 0.25}",
                "train.batch_size=32",
                "train.device=cuda",
                f"train.amp={str(args.amp == 'bf16').lower()}",
                "fl.hospitals=3",
                "fl.methods=[fedavg]",
                "fl.rounds=3",
                f"fl.local_steps={LOCAL_STEPS}",
                "fl.server_eval=false",
                "simulation.client_gpus=auto",
            ],
        )
        resources = actor_resources(cfg, 42)
        print(resources.describe(cfg.fl.hospitals))
        seen: set[int] = set()
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.5):
                seen.update(_gpu_actor_pids())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            total, events = _run(cfg, Path(tmp) / "out")
        finally:
            stop.set()
            watcher.join()
        result = json.loads((Path(tmp) / "out" / "jobs" / "fedavg_seed42.json").read_text())
        trained = [r["hospitals"] for r in result["history"]]
        rounds = _rounds(events)
        warm = statistics.median(rounds[1:])

        # the same number of steps, centrally, on the same GPU (pooled data, one model)
        pooled = build_partition(cfg, 42).pooled_train
        model = build_model(cfg, 42)
        data = image_sets(cfg, {"t": pooled}, True)["t"]
        steps = LOCAL_STEPS * cfg.fl.hospitals
        train_steps(model, data, cfg, 3, 42)  # warm-up: kernels, allocator
        sync(device)
        began = time.perf_counter()
        train_steps(model, data, cfg, steps, 42)
        sync(device)
        central = time.perf_counter() - began
    ratio = warm / central
    verdict = "met" if ratio <= 1.5 and seen and min(trained) == 3 else "not met"
    headers = (
        "hospitals",
        "GPU share",
        "actor need GiB",
        "actors on GPU",
        "trained per round",
        "round 1 s",
        "warm round s",
        f"central {steps} steps s",
        "round / central",
        "target <= 1.5x",
    )
    need = (resources.need_bytes or 0) / 1024**3
    row = [3, resources.gpus, need, len(seen), trained, rounds[0], warm, central, ratio, verdict]
    report("gpu_federation", args, device, headers, [row], start, job_seconds=total)


if __name__ == "__main__":
    main()
