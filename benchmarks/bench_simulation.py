"""Federated round time vs number of hospitals, and where a smoke round's wall time goes.

Why: ``make simulate`` is slow on a laptop; this says whether round time grows linearly in
the number of hospitals and which part (Ray start-up, cold actors, model build per message,
training, server evaluation) to cut first.

Scaling: the ``paper`` partition has only 3 sub-sites, so the hospitals here are the
``centers`` partition over N centre folders hard-linked from one synthetic data set (every
copy is a full centre with its own split), with a fixed ``fl.local_steps`` so each hospital
does the same work whatever N, and server evaluation off. The ServerApp runs in this
process (Flower's simulation thread), so round boundaries are timed by wrapping the
strategy; ClientApps run in Ray actors, so their pieces are timed separately, in process,
with the same functions client/app.py calls.

    .venv/bin/python benchmarks/bench_simulation.py [--quick]   (--quick: 3 and 6 hospitals, 2
    rounds, no smoke breakdown)
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import machine, parser, report, setup, table

import server.federation as federation
from client.app import _val_metrics, hospital_data
from savlt_model.config import Config, load_config
from savlt_model.model.adapters import trainable_state
from savlt_model.model.build import build_model, image_sets
from savlt_model.train import train_steps
from server.strategy import SavltStrategy
from simulation.runner import run_job
from simulation.synth import generate

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
SOURCES = ("mixed", "huaxi", "xiangya")
Events = list[tuple[str, int, float, float]]  # (what, round, start, end)


def _wrap(owner: Any, attr: str, label: str, events: Events) -> Callable[[], None]:
    """Record the wall time of every call of ``owner.attr``; returns the undo."""
    original = getattr(owner, attr)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            rnd = next((a for a in args if isinstance(a, int)), 0)
            events.append((label, rnd, start, time.perf_counter()))

    setattr(owner, attr, timed)
    return lambda: setattr(owner, attr, original)


def _centres(source: Path, root: Path, n: int) -> list[str]:
    """N centre folders (hard links, no split files) cycling over the synthetic centres."""
    names = [f"h{i:02d}_{SOURCES[i % 3]}" for i in range(n)]
    root.mkdir(parents=True)
    shutil.copy2(source / "synth.json", root / "synth.json")
    for i, name in enumerate(names):
        shutil.copytree(source / SOURCES[i % 3], root / name, copy_function=os.link)
    return names


def _config(base: Path, root: Path, centres: list[str], rounds: int, eval_: bool) -> Config:
    return load_config(
        base,
        [
            f"data.root={root}",
            "data.synthetic.enabled=false",
            f"data.train_center={centres[0]}",
            f"data.external_centers=[{','.join(centres[1:])}]",
            "fl.partition=centers",
            f"fl.hospitals={len(centres)}",
            "fl.methods=[fedavg]",
            f"fl.rounds={rounds}",
            "fl.local_steps=4",
            f"fl.server_eval={str(eval_).lower()}",
        ],
    )


def _run(cfg: Config, out: Path) -> tuple[float, Events]:
    """Run one federated job under Flower's simulation; (total seconds, timed events)."""
    events: Events = []
    undo = [
        _wrap(SavltStrategy, "configure_train", "configure", events),
        _wrap(SavltStrategy, "aggregate_train", "aggregate", events),
        _wrap(federation, "build_model", "server build_model", events),
        _wrap(federation, "score_centers", "server score", events),
        _wrap(federation, "save_figures", "server figures", events),
    ]
    start = time.perf_counter()
    try:
        run_job(cfg, "fedavg", cfg.seeds[0], out, resume=False)
    finally:
        for u in undo:
            u()
    return time.perf_counter() - start, [(w, r, s - start, e - start) for w, r, s, e in events]


def _rounds(events: Events) -> list[float]:
    """Seconds from each round's configure_train to the end of its aggregate_train."""
    begin = {r: s for w, r, s, _ in events if w == "configure"}
    return [e - begin[r] for w, r, _, e in events if w == "aggregate"]


def _client_pieces(cfg: Config, n: int) -> dict[str, float]:
    """One hospital's ClientApp train call, piece by piece, as client/app.py runs it."""
    seed = cfg.seeds[0]
    out: dict[str, float] = {}

    def clock(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = fn()
        out[name] = out.get(name, 0.0) + time.perf_counter() - start
        return value

    node = {"partition-id": 0, "num-partitions": n}
    _, hospital = clock("hospital_data", lambda: hospital_data(cfg, seed, node))
    model = clock("build_model", lambda: build_model(cfg, seed))
    state = trainable_state(model)
    clock("load_global_state", lambda: model.load_global_state(state))
    train = clock("image_sets", lambda: image_sets(cfg, {"t": hospital.train}, True)["t"])
    steps = federation.local_steps(cfg)
    clock("train_steps", lambda: train_steps(model, train, cfg, steps, seed))
    clock("val_metrics", lambda: _val_metrics(model, cfg, hospital))
    clock("trainable_state", lambda: trainable_state(model))
    return out


COLD = """
import time
t = time.perf_counter()
import client.app
t1 = time.perf_counter()
from savlt_model.model.build import cached_backbone
cached_backbone("savlt-tiny", None)
print(t1 - t, time.perf_counter() - t1)
"""


def _actor_cold_start() -> tuple[float, float]:
    """(import client.app, load savlt-tiny) seconds in a fresh process, as each actor pays."""
    done = subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, check=True)
    imports, backbone = done.stdout.split()
    return float(imports), float(backbone)


def _breakdown(source: Path, work: Path) -> dict[str, Any]:
    """The smoke config (paper partition, server eval on) as ``make simulate`` would run it."""
    root = work / "smoke-data"
    shutil.copytree(source, root, copy_function=os.link)
    cfg = load_config(SMOKE, [f"data.root={root}", "fl.methods=[fedavg]"])
    total, events = _run(cfg, work / "smoke-out")
    rounds = _rounds(events)
    first = min(s for w, _, s, _ in events if w == "configure")
    last = max(e for w, _, _, e in events if w == "aggregate")
    server = {
        w: sum(e - s for x, _, s, e in events if x == w)
        for w in ("server build_model", "server score", "server figures")
    }
    in_rounds = sum(e - s for w, _, s, e in events if w == "server score" and first < s < last)
    before = [e - s for w, _, s, e in events if w != "configure" and e <= first]
    imports, backbone = _actor_cold_start()
    rows = [
        ["start-up to round 1 (Ray init, actor pool, server model, round-0 eval)", first],
        ["  of which server work (build_model + round-0 eval)", sum(before)],
        ["round 1 (cold actors: imports, backbone, decode)", rounds[0]],
        ["  fresh process: import client.app (each actor)", imports],
        ["  fresh process: load savlt-tiny backbone (each actor)", backbone],
        *[[f"round {i + 2} (warm actors)", r] for i, r in enumerate(rounds[1:])],
        ["server eval between rounds (build_model + score, all rounds)", in_rounds],
        ["after last round (final score, figures, adapter, Ray shutdown)", total - last],
        ["total run_job", total],
    ]
    cold = _client_pieces(cfg, cfg.fl.hospitals)
    warm = _client_pieces(cfg, cfg.fl.hospitals)
    pieces = [[k, cold[k], warm[k]] for k in cold]
    pieces.append(["sum", sum(cold.values()), sum(warm.values())])
    print("\nsmoke config, one fedavg job (wall seconds)")
    print(table(("phase", "s"), rows))
    print("\none ClientApp train call in process (seconds; cold = first in this process)")
    print(table(("piece", "cold s", "warm s"), pieces))
    return {
        "phases": rows,
        "server_seconds": server,
        "client_pieces": {"columns": ["piece", "cold s", "warm s"], "rows": pieces},
    }


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup(args)
    start = machine(device)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    counts, rounds = ((3, 6), 2) if args.quick else ((3, 6, 12), 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "synthetic"
        generate(source, scale=0.25, progress=False)
        for n in counts:
            centres = _centres(source, work / f"data{n}", n)
            cfg = _config(SMOKE, work / f"data{n}", centres, rounds, eval_=False)
            _client_pieces(cfg, n)  # cold: writes the split files before the run
            pieces = _client_pieces(cfg, n)
            total, events = _run(cfg, work / f"out{n}")
            per_round = _rounds(events)
            warm = statistics.median(per_round[1:])
            client = sum(pieces.values())
            rows.append([n, total, per_round[0], warm, warm / n, pieces["hospital_data"], client])
        base = rows[0][3] / rows[0][0]
        growth = max(r[3] / (r[0] * base) for r in rows[1:])
        verdict = "met" if growth <= 1.15 else "not met"
        extra = {} if args.quick else _breakdown(source, work)
    headers = (
        "hospitals",
        "job s",
        "round 1 s",
        "warm round s",
        "s/hospital",
        "client partition s",
        "client call s (warm)",
    )
    print(f"\nround time vs hospitals ({rounds} rounds, 4 local steps, no server eval)")
    report(
        "simulation",
        args,
        device,
        headers,
        rows,
        start,
        linear_target=verdict,
        worst_growth_vs_linear=growth,
        **extra,
    )
    print(f"target (round time grows no faster than linearly): {verdict}, worst {growth:.2f}x")


if __name__ == "__main__":
    main()
