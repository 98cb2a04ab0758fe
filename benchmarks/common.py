"""Shared plumbing for the benchmark scripts: arguments, timing, machine record, table, JSON.

Why: every script must report the same provenance (machine, load average, threads, command,
date) next to its numbers, because this machine is shared and a number without the load it
was measured under cannot be compared with the next run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from savlt_model.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results"
# The overrides that reproduce configs/default.yaml as it was before equalise became the
# default (percentile standardisation, lr 1e-3): the federation and hard-partition studies'
# tables were measured there, and their recorded cells must stay comparable.
BEFORE_EQUALISE = ("data.intensity=percentile", "train.lr=0.001")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark accepts (``--device``/``--amp`` matter to the GPU ones)."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast dtype")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Apply threads, and TF32 on CUDA (what a real GPU run would use)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device, amp: str) -> Any:
    """bf16 autocast when asked, else a no-op context."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    steps: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median wall time of each step in ms, timed round-robin (a, b, a, b, ...).

    Interleaving gives every step the same share of whatever else the machine is doing, so
    their ratios hold even when the absolute times drift; medians resist the rest.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """Where and under which load the numbers were taken."""
    info: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (floats to 3 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def report(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    start: dict[str, Any],
    **extra: Any,
) -> Path:
    """Print the table and write ``results/<name>[-<device>][-<amp>].json`` atomically."""
    print(table(headers, rows))
    end_load = [round(x, 2) for x in os.getloadavg()]
    print(f"load average start {start['loadavg']} end {end_load}, threads {start['torch_threads']}")
    tags = ([] if device.type == "cpu" else [device.type]) + (
        [] if args.amp == "none" else [args.amp]
    )
    suffix = "".join(f"-{t}" for t in tags)
    return write_json(
        args.results / f"{name}{suffix}.json",
        {
            "name": name,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "quick": args.quick,
            "amp": args.amp,
            "machine": start,
            "loadavg_end": end_load,
            "columns": list(headers),
            "rows": [list(r) for r in rows],
            **extra,
        },
    )
