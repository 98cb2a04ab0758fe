"""Many hospitals through real Flower, and a simulation on a Ray cluster it connects to."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import flwr.simulation
import pytest

from simulation.runner import run_job

pytestmark = pytest.mark.slow


@pytest.fixture
def backend_configs(monkeypatch) -> list[dict]:
    """Every backend_config the runner hands to the real run_simulation (a spy, no mock)."""
    seen: list[dict] = []
    real = flwr.simulation.run_simulation

    def spy(*args, **kwargs):
        seen.append(json.loads(json.dumps(kwargs["backend_config"])))
        return real(*args, **kwargs)

    monkeypatch.setattr(flwr.simulation, "run_simulation", spy)
    return seen


@pytest.mark.ray
def test_twenty_hospitals_with_two_bounded_actors(fed_config, tmp_path, backend_configs):
    cfg = fed_config(
        "fl.partition=paper",
        "fl.split=dirichlet",
        "fl.hospitals=20",  # 20 K-shot images (K = 4): one or more each
        "fl.rounds=1",
        "simulation.max_actors=2",
    )
    summary = run_job(cfg, "fedavg", 42, tmp_path, resume=False)
    assert backend_configs == [
        {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
    ]
    (row,) = summary["history"]
    assert row["hospitals"] == 20 and not summary["events"]  # every hospital trained


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A Ray head node on loopback, started here and stopped here: its own process group
    and temp dir, so no other Ray instance on this machine is touched (never `ray stop`)."""
    ray_cli = Path(sys.executable).parent / "ray"
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths
    out = Path(temp_dir, "head.out")
    head = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--object-store-memory=200000000",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        start_new_session=True,
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in out.read_text():
            assert head.poll() is None, f"ray start --head exited early: {out.read_text()}"
            assert time.monotonic() < deadline, "ray head did not come up in 120 s"
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops its own processes
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
def test_simulation_runs_on_a_ray_cluster_it_connects_to(fed_config, tmp_path, ray_head):
    import ray
    from ray._private.state import jobs  # the GCS job table (no dashboard on this head)

    cfg = fed_config("fl.rounds=1", f"simulation.ray_address={ray_head}")
    summary = run_job(cfg, "fedavg", 42, tmp_path, resume=False)
    assert summary["history"][0]["hospitals"] == 3
    ray.init(address=ray_head, logging_level="ERROR")
    try:  # this process's driver ran a job on that cluster and finished it
        ours = [j for j in jobs() if j["DriverPid"] == os.getpid()]
        assert any(j["IsDead"] for j in ours)
        assert ray.cluster_resources()["CPU"] == 2.0
    finally:
        ray.shutdown()
