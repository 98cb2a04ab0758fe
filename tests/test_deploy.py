"""A real deployment on 127.0.0.1: flower-superlink with TLS and SuperNode authentication,
one flower-supernode per hospital, ``flwr run`` of this project (what ``savlt deploy-local``
does), plus a SuperNode whose key was never registered. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import math
import time

import pytest

from client.policy import load_policy
from savlt_model.checkpoint import load_adapter
from savlt_model.config import load_config
from synthetic.write import ensure_data
from tests.conftest import tree_hashes
from tools.deploy.certificates import write_node_keys
from tools.deploy.flwr_cli import supernode_list
from tools.deploy.local import (
    HospitalNode,
    prepare,
    register,
    run_job,
    start_federation,
    start_superlink,
    start_supernode,
    wait_for_superlink,
)
from tools.deploy.processes import Processes, free_port, managed

pytestmark = pytest.mark.deploy


def test_tls_deployment_trains_and_refuses_an_unregistered_supernode(fed_data_root, tmp_path):
    """Also: every hospital runs with its run policy and the DATA folder is only read. (A job
    outside a hospital's policy is refused through Flower in tests/test_trust.py.)"""
    root = fed_data_root
    cfg = load_config(
        "configs/smoke.yaml",
        [
            f"data.root={root}",
            "data.synthetic.enabled=false",
            "data.external_centers=[xiangya]",  # two hospitals: mixed and xiangya
            "fl.rounds=1",
            "fl.local_steps=1",
            "train.batch_size=8",
        ],
    )
    data_before = tree_hashes(root)
    dep = prepare(cfg, tmp_path / "deploy")
    assert dep.cfg.fl.hospitals == 2 and not dep.cfg.fl.server_eval and dep.cfg.fl.client_eval
    mixed, xiangya = dep.hospitals
    assert load_policy(mixed.policy) == load_policy(xiangya.policy)  # the same approved study
    with managed(Processes(dep.out / "logs", dep.env)) as procs:
        start_federation(dep, procs)
        key, pub = write_node_keys(dep.out / "keys", "intruder")  # never registered
        start_supernode(dep, procs, HospitalNode("huaxi", key, pub, free_port()), name="intruder")
        summary = run_job(dep, procs, "fedavg", timeout=480)
        intruder_exit = procs.procs["intruder"].wait(timeout=60)
        nodes = supernode_list(dep.env)
        assert len(procs.tagged()) > 4  # SuperLink, SuperNodes and their SuperExecs
    # teardown: nothing this deployment started, directly or not, is left running
    assert not procs.tagged()

    # the unregistered SuperNode was refused: it exited, the SuperLink says why, it is not listed
    assert intruder_exit != 0
    assert "No SuperNode found with the given public key" in procs.log_text("superlink")
    assert len(nodes) == 2 and {n["status"] for n in nodes} == {"online"}

    # the job trained with both hospitals and wrote the adapter and hospital-side scores
    state, meta = load_adapter(dep.out / "adapters" / "fedavg_seed42.safetensors")
    assert meta["rounds"] == 1 and state
    assert all(bool(t.isfinite().all()) for t in state.values())
    # ... calibrated by the hospitals' sums after the last round (two queries through TLS)
    assert meta["calibration"]["temperature"] > 0 and meta["centre_calibration"]["recentre"]
    assert len(meta["centre_calibration"]["reference"]) == state["prototypes"].shape[1]
    row = summary["history"][0]
    assert row["hospitals"] == 2 and summary["events"] == []
    assert 0.0 <= row["hospitals-val-acc_multiclass"] <= 100.0
    assert math.isfinite(row["train-loss"])

    # the hospitals' DATA folder is byte-identical; splits and draws are in their work dirs
    assert tree_hashes(root) == data_before
    for node in dep.hospitals:
        work = dep.out / "flwr-nodes" / node.center / "savlt-work"
        assert len(list(work.glob(f"data-*/{node.center}/split.json"))) == 1


def _reconnections(procs, name: str, count: int, seconds: float) -> int:
    """Wait until the SuperNode's log reports ``count`` successful (re)connections."""
    deadline = time.monotonic() + seconds
    while True:
        seen = procs.log_text(name).count("Connection successful")
        if seen >= count or time.monotonic() > deadline:
            return seen
        time.sleep(2.0)


def test_supernode_reconnects_without_manual_action(tmp_path):
    """A SuperNode started while the SuperLink is down, then a SuperLink restart (same
    database): each time the node reconnects by itself, within Flower's retry back-off."""
    cfg = load_config(
        "configs/smoke.yaml",
        [f"data.root={tmp_path / 'data'}", "data.external_centers=[xiangya]"],
    )
    ensure_data(cfg)  # as `savlt deploy-local` does before it prepares the deployment
    dep = prepare(cfg, tmp_path / "deploy")
    node = dep.hospitals[0]
    name = f"hospital-{node.center}"
    with managed(Processes(dep.out / "logs", dep.env)) as procs:
        start_superlink(dep, procs)
        wait_for_superlink(dep, procs)
        register(dep, node)
        procs.stop("superlink")
        start_supernode(dep, procs, node)  # the SuperLink is down: the node must wait
        time.sleep(5.0)
        start_superlink(dep, procs)
        wait_for_superlink(dep, procs)
        first = _reconnections(procs, name, 1, 90.0)
        procs.stop("superlink")  # restart the SuperLink under the running node
        start_superlink(dep, procs)
        wait_for_superlink(dep, procs)
        second = _reconnections(procs, name, 2, 90.0)
        nodes = supernode_list(dep.env)
        assert procs.procs[name].poll() is None  # the node never gave up
    assert (first, second) == (1, 2)
    assert [n["status"] for n in nodes] == ["online"]
    assert not procs.tagged()
