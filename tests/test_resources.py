"""What each simulated hospital's Ray actor gets, for savlt simulate and for flwr run."""

from __future__ import annotations

import math
import os

import pytest
from flwr.common.config import parse_config_args
from flwr.simulation.app import _run_simulation_settings
from flwr.supercore.utils import simulation_config_from_json

from savlt_model.config import load_config
from savlt_model.cores import usable_cores
from savlt_model.errors import SavltError
from simulation.resources import CUDA_CONTEXT_BYTES, ActorResources, GiB, actor_resources, gpu_share
from tools.cli import main


@pytest.mark.parametrize(
    ("need", "gpu", "gpus", "hospitals", "share"),
    [
        (3 * GiB, 141 * GiB, 1, 3, 0.3333),  # 3 hospitals share one big GPU
        (3 * GiB, 141 * GiB, 1, 50, 0.0217),  # 46 fit beside the driver; 50 take turns
        (3 * GiB, 141 * GiB, 2, 3, 0.5),  # two GPUs: at most 2 actors on each
        (3 * GiB, 141 * GiB, 4, 3, 1.0),  # more GPUs than hospitals: one each
        (20 * GiB, 80 * GiB, 1, 10, 0.3333),  # memory bounds it: 3 fit beside the driver
        (90 * GiB, 80 * GiB, 1, 3, 1.0),  # does not fit: a whole GPU, never more
        (50 * GiB, 80 * GiB, 1, 3, 1.0),  # not two: a whole GPU each
    ],
)
def test_gpu_share_is_the_smallest_fraction_that_fits(need, gpu, gpus, hospitals, share):
    got = gpu_share(need, gpu, gpus, hospitals)
    assert got == share
    k = int(1 / got)  # Flower's pool size: int(node GPUs / share) actors per GPU
    assert k * got <= 1.0
    if got < 1.0:  # sharing
        assert (k + 1) * need <= gpu  # the actors sharing a GPU fit, and the driver too
        assert k <= math.ceil(hospitals / gpus)


def test_gpu_share_refuses_nonsense():
    with pytest.raises(ValueError, match="positive"):
        gpu_share(0, GiB, 1, 3)
    with pytest.raises(ValueError, match="positive"):
        gpu_share(GiB, GiB, 0, 3)


def test_cpu_default_is_todays_behaviour_and_the_log_says_what_each_actor_gets():
    cfg = load_config("configs/smoke.yaml")
    res = actor_resources(cfg, 42)  # no CUDA here: auto means no GPU
    assert res == ActorResources(1.0, 0.0, 0, None)
    assert res.backend_config() == {
        "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
        "init_args": {},
    }
    assert res.describe(3) == (
        "3 hospitals: each ClientApp actor gets 1 CPU(s), no GPU; as many as fit actors "
        "at once, on a local Ray"
    )
    cpu = load_config("configs/smoke.yaml", ["train.device=cpu", "simulation.client_gpus=auto"])
    assert actor_resources(cpu, 42).gpus == 0.0


def test_configured_resources_and_bounds_reach_the_backend_config():
    cfg = load_config(
        "configs/smoke.yaml",
        ["simulation.client_cpus=2", "simulation.client_gpus=0.25", "simulation.max_actors=3"],
    )
    res = actor_resources(cfg, 42)
    assert res.backend_config() == {
        "client_resources": {"num_cpus": 2.0, "num_gpus": 0.25},
        "init_args": {"num_cpus": 6},  # Flower fits int(6 / 2) = 3 actors
    }
    assert "GPU share 0.25" in res.describe(3) and "at most 3 actors" in res.describe(3)
    remote = load_config("configs/smoke.yaml", ["simulation.ray_address=127.0.0.1:6379"])
    assert actor_resources(remote, 42).backend_config()["init_args"] == {
        "address": "127.0.0.1:6379"
    }
    with_need = ActorResources(1.0, 0.3333, 0, None, need_bytes=2 * GiB + CUDA_CONTEXT_BYTES)
    assert "needs 3.00 GiB, measured" in with_need.describe(3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["simulation.client_gpus=half"], r"'simulation\.client_gpus' must be float or 'auto'"),
        (["simulation.client_gpus=1.5"], r"a whole number of GPUs"),
        (["simulation.client_cpus=0"], r"'simulation\.client_cpus' must be > 0"),
        (["simulation.max_actors=-1"], r"'simulation\.max_actors' must be >= 0"),
        (["simulation.max_actors=3", "simulation.client_cpus=0.5"], r"whole number of CPUs"),
        (["simulation.max_actors=2", "simulation.ray_address=auto"], r"local Ray only"),
        (["fl.dirichlet_alpha=0"], r"'fl\.dirichlet_alpha' must be > 0"),
    ],
)
def test_bad_simulation_keys_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(SavltError, match=message):
        load_config("configs/smoke.yaml", overrides)


def test_flwr_run_federation_config_gives_flower_the_same_backend_config(capsys):
    """Our --federation-config string through Flower's own parser and simulation settings."""
    overrides = [
        "--set",
        "fl.hospitals=3",
        "--set",
        "simulation.client_gpus=0.3333",
        "--set",
        "simulation.max_actors=2",
    ]
    assert main(["federation-config", "--config", "configs/smoke.yaml", *overrides]) == 0
    text = capsys.readouterr().out.strip()
    assert text == (
        "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.3333 "
        "init-args-num-cpus=2"
    )
    parsed = {k.replace("-", "_"): v for k, v in parse_config_args([text]).items()}
    nodes, _, backend, _, _ = _run_simulation_settings(simulation_config_from_json(parsed))
    cfg = load_config("configs/smoke.yaml", [o for o in overrides if o != "--set"])
    ours = actor_resources(cfg, 42).backend_config()
    assert nodes == 3
    # Flower's proto carries the GPU share as a float32: equal to 1e-7
    assert backend["client_resources"] == pytest.approx(ours["client_resources"], rel=1e-7)
    assert backend["init_args"] == ours["init_args"]
    fractional = ["federation-config", "--config", "configs/smoke.yaml"]
    assert main([*fractional, "--set", "simulation.client_cpus=0.5"]) == 2
    assert "whole number of CPUs" in capsys.readouterr().err


def test_usable_cores_follows_the_affinity_mask_and_falls_back_to_every_core(monkeypatch):
    """One count for every pool: the process's affinity where the OS has one (Linux), else
    the machine's cores (macOS and Windows have no ``os.sched_getaffinity``)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert usable_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert usable_cores() == 8
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cores() == 1
