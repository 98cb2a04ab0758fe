"""Run the CPU benchmark set (``make bench``), one fresh process per script.

Why: each script in its own process so that one's caches, threads and memory do not colour
the next; compute benchmarks run on one torch thread so that other jobs on a shared
2-core machine disturb them less (medians do the rest). The simulation uses all cores
through Ray, as ``make simulate`` does. Measured: 20.6 min on 2 cores at load average
~10 from other jobs (simulation 12.4 min of it); less on an idle machine.

    .venv/bin/python benchmarks/run_cpu.py [--quick] [--only roi_pool,data,...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# script name -> extra arguments (single-threaded where the work is plain torch compute)
SCRIPTS = {
    "roi_pool": ["--threads", "1"],
    "train_step": ["--threads", "1"],
    "lora_attention": ["--threads", "1"],
    "data": ["--threads", "1"],
    "tissue_mask": ["--threads", "1"],
    "aggregation": ["--threads", "1"],
    "payload": ["--threads", "1"],
    "simulation": [],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fast variant of every script")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SCRIPTS))
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON goes")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SCRIPTS)
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        p.error(f"unknown benchmarks {unknown}; choose from {', '.join(SCRIPTS)}")
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    failed, took = [], {}
    for name in names:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), *SCRIPTS[name]]
        cmd += ["--results", str(args.results)] + (["--quick"] if args.quick else [])
        print(f"\n=== {name}: {' '.join(cmd[1:])}  (load {os.getloadavg()[0]:.2f})", flush=True)
        start = time.perf_counter()
        if subprocess.run(cmd, env=env).returncode:
            failed.append(name)
        took[name] = time.perf_counter() - start
    print("\n" + ", ".join(f"{n} {s:.0f}s" for n, s in took.items()))
    print(f"results in {args.results}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
