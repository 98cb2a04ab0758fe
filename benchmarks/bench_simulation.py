"""Federated round time and peak memory vs number of hospitals; memory and cold start of
one actor; where a smoke round's wall time goes.

Why: researchers simulate tens of hospitals. This says whether round time grows no faster
than linearly in the number of hospitals (3 / 10 / 20 / 50), whether memory grows with the
Ray actors (bounded by ``simulation.max_actors``) rather than with hospitals, what one actor
costs in memory for savlt-tiny and ViT-B/16 shapes on CPU, and which part (Ray start-up,
cold actors, training, server evaluation) to cut first.

Scaling: the ``paper`` partition with ``fl.split: dirichlet`` deals the mixed centre's
K-shot set (K = 16: 80 images) into N hospitals, with a fixed ``fl.local_steps`` so each
hospital does the same work whatever N, server evaluation off and 2 actors (2 cores). The
ServerApp runs in this process (Flower's simulation thread), so round boundaries are timed by
wrapping the strategy; memory is the summed PSS of this process and every process under it
(Ray's daemons and actors), sampled twice a second; ClientApps run in Ray actors, so their
pieces are timed separately, in process, with the same functions client/app.py calls.

    .venv/bin/python benchmarks/bench_simulation.py [--quick] [--breakdown]
    (--quick: 3 and 10 hospitals, 2 rounds, savlt-tiny actor only; --breakdown: also where
    the smoke job's wall time goes)
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from common import machine, parser, report, setup, table

import savlt_model.evaluation as evaluation
import server.federation as federation
from client.app import _val_metrics, hospital_data
from savlt_model.budget import local_steps
from savlt_model.config import Config, load_config
from savlt_model.model.adapters import trainable_state
from savlt_model.model.build import build_model, image_sets
from savlt_model.train import train_steps
from server.strategy import SavltStrategy
from simulation.runner import run_job
from synthetic.write import generate

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


def _config(base: Path, root: Path, hospitals: int, rounds: int, eval_: bool) -> Config:
    return load_config(
        base,
        [
            f"data.root={root}",
            "data.synthetic.enabled=false",
            "data.shots=16",
            "fl.split=dirichlet",
            "fl.dirichlet_alpha=1.0",
            f"fl.hospitals={hospitals}",
            "fl.methods=[fedavg]",
            f"fl.rounds={rounds}",
            "fl.local_steps=4",
            f"fl.server_eval={str(eval_).lower()}",
            "simulation.max_actors=2",
        ],
    )


class PeakMemory:
    """Peak summed PSS (and peak actor RSS) of this process and all its descendants."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.total, self.actor = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
                if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::ClientAppActor"):
                    self.actor = max(self.actor, proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                continue
        self.total = max(self.total, total)

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _run(cfg: Config, out: Path) -> tuple[float, Events]:
    """Run one federated job under Flower's simulation; (total seconds, timed events)."""
    events: Events = []
    undo = [
        _wrap(SavltStrategy, "configure_train", "configure", events),
        _wrap(SavltStrategy, "aggregate_train", "aggregate", events),
        _wrap(federation, "build_model", "server build_model", events),
        _wrap(evaluation, "score_centers", "server score", events),
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
    steps = local_steps(cfg)
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


def _breakdown(work: Path) -> dict[str, Any]:
    """The smoke config (paper partition, server eval on) as ``make simulate`` would run it."""
    root = work / "smoke-data"
    generate(root, scale=0.25, progress=False)
    cfg = load_config(SMOKE, [f"data.root={root}", "fl.methods=[fedavg]"])
    total, events = _run(cfg, work / "smoke-out")
    rounds = _rounds(events)
    first = min(s for w, _, s, _ in events if w == "configure")
    last = max(e for w, _, _, e in events if w == "aggregate")
    server = {
        w: sum(e - s for x, _, s, e in events if x == w)
        for w in ("server build_model", "server score")
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


ACTOR = """
import json, sys, time
import psutil
rss = lambda: psutil.Process().memory_info().rss
out = {"start": rss()}
t = time.perf_counter()
import client.app
out["import s"] = time.perf_counter() - t
out["imports"] = rss()
from savlt_model.config import load_config
from savlt_model.data.partition import build_partition
from savlt_model.model.build import cached_model, image_sets
from savlt_model.train import train_steps
cfg = load_config(sys.argv[1], sys.argv[2:])
model = cached_model(cfg, 42)
out["model"] = rss()
hospitals = build_partition(cfg, 42).hospitals
def serve(h):
    train_steps(model, image_sets(cfg, {"t": h.train, "v": h.val}, True)["t"], cfg, 1, 42)
serve(hospitals[0])
out["one step"] = rss()
for h in hospitals[1:4]:
    serve(h)
out["per hospital"] = (rss() - out["one step"]) / 3
print(json.dumps(out))
"""
GiB = 1024**3
# backbone -> its overrides: ViT-B/16 shapes (random weights, no download), batch 8 on CPU
ACTOR_MODELS = {
    "savlt-tiny": [],
    "ViT-B-16": ["model.name=ViT-B-16", "train.batch_size=8"],
}


def _actor_memory(name: str, root: Path) -> list[Any]:
    """RSS (GiB) of a fresh process as an actor grows: imports, model, one step; and what
    each further hospital it serves adds (its decoded images), with 10 hospitals' data."""
    base = [f"data.root={root}", "data.shots=16", "fl.split=dirichlet", "fl.hospitals=10"]
    cmd = [sys.executable, "-c", ACTOR, str(SMOKE), *base, *ACTOR_MODELS[name]]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = json.loads(done.stdout.strip().splitlines()[-1])
    return [
        name,
        m["import s"],
        m["imports"] / GiB,
        m["model"] / GiB,
        m["one step"] / GiB,
        m["per hospital"] / 2**20,
    ]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--breakdown", action="store_true", help="also the smoke job's phases")
    args = p.parse_args()
    device = setup(args)
    start = machine(device)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    counts, rounds = ((3, 10), 2) if args.quick else ((3, 10, 20, 50), 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "synthetic"
        generate(source, scale=1.0, progress=False)
        for n in counts:
            cfg = _config(SMOKE, source, n, rounds, eval_=False)
            _client_pieces(cfg, n)  # cold: writes the split files before the run
            pieces = _client_pieces(cfg, n)
            with PeakMemory() as memory:
                total, events = _run(cfg, work / f"out{n}")
            result = json.loads((work / f"out{n}" / "jobs" / "fedavg_seed42.json").read_text())
            trained = min(r["hospitals"] for r in result["history"])
            per_round = _rounds(events)
            warm = statistics.median(per_round[1:])
            rows.append(
                [
                    n,
                    trained,
                    total,
                    per_round[0],
                    warm,
                    warm / n,
                    memory.total / GiB,
                    memory.actor / GiB,
                    sum(pieces.values()),
                ]
            )
        base = rows[0][4] / rows[0][0]
        growth = max(r[4] / (r[0] * base) for r in rows[1:])
        linear = "met" if growth <= 1.15 else "not met"
        peak = max(r[6] for r in rows)
        memory_target = "met" if peak < 12 else "not met"
        fifty = [r for r in rows if r[0] == 50]
        completes = ("met" if fifty[0][1] == 50 else "not met") if fifty else "not measured"
        names = ["savlt-tiny"] if args.quick else list(ACTOR_MODELS)
        actors = [_actor_memory(name, source) for name in names]
        extra = _breakdown(work) if args.breakdown else {}
    actor_headers = (
        "backbone",
        "import s",
        "RSS after imports GiB",
        "+ model GiB",
        "+ one step GiB",
        "per extra hospital MiB",
    )
    print("\none actor's resident memory, fresh process, CPU")
    print(table(actor_headers, actors))
    headers = (
        "hospitals",
        "trained every round",
        "job s",
        "round 1 s",
        "warm round s",
        "s/hospital",
        "peak PSS GiB (all processes)",
        "peak actor RSS GiB",
        "client call s (warm)",
    )
    print(f"\nround time and memory vs hospitals ({rounds} rounds, 4 local steps, 2 actors)")
    report(
        "simulation",
        args,
        device,
        headers,
        rows,
        start,
        linear_target=linear,
        worst_growth_vs_linear=growth,
        memory_target=memory_target,
        fifty_hospitals_target=completes,
        actor_memory={"columns": list(actor_headers), "rows": actors},
        **extra,
    )
    print(
        f"targets: a round with 50 hospitals {completes}; round time no faster than linear "
        f"{linear} (worst {growth:.2f}x); peak memory < 12 GiB {memory_target} ({peak:.2f} GiB)"
    )


if __name__ == "__main__":
    main()
