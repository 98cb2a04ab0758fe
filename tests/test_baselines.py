"""The baselines' models train in forked processes, side by side (simulation/baselines.py)."""

from __future__ import annotations

import pytest

from simulation.baselines import train_baselines

pytestmark = pytest.mark.slow


def test_a_baselines_records_do_not_depend_on_what_trains_beside_it(fed_config, tmp_path):
    """Central alone and central beside the local models: each model trains in its own
    process on the hospitals' actor threads, so the records are the same to the bit, and
    local averages one model per hospital."""
    cfg = fed_config("train.iterations_per_shot=1", "simulation.max_actors=2")
    alone = train_baselines(cfg, [("central", 42)], tmp_path / "alone")
    together = train_baselines(cfg, [("central", 42), ("local", 42)], tmp_path / "together")
    assert alone["central", 42]["records"] == together["central", 42]["records"]
    local = together["local", 42]["records"]
    assert {r["method"] for r in local} == {"local", "local+cal"}
    for r in local:
        assert len(r["per_hospital_acc_multiclass"]) == cfg.fl.hospitals
        assert r["acc_multiclass"] == pytest.approx(
            sum(r["per_hospital_acc_multiclass"]) / cfg.fl.hospitals
        )
    figures = tmp_path / "together" / "figures"
    assert {f"roc_local_seed42_h{i}.png" for i in range(3)} <= {p.name for p in figures.iterdir()}


def test_a_leave_one_out_run_trains_every_baseline_before_any_federation(
    fed_config, monkeypatch, tmp_path
):
    """The baselines fork their processes, and one forked after Ray ran in its parent
    crashed in Ray's native code (a leave-one-out run's second variant), so
    ``run_simulate`` trains every variant's baselines before it starts any federation."""
    from savlt_model.atomic import write_json
    from simulation import runner

    calls: list[tuple[str, str | None]] = []

    def baselines(cfg, jobs, out):
        calls.append(("baselines", cfg.fl.held_out))
        return {job: dict(records=[], curves=[]) for job in jobs}

    def federations(cfg, jobs, progress=None):
        calls.append(("federation", cfg.fl.held_out))
        for job in jobs:
            write_json(job.result_file, dict(records=[], curves=[]))

    monkeypatch.setattr(runner, "train_baselines", baselines)
    monkeypatch.setattr(runner, "simulate_federated", federations)
    monkeypatch.setattr(runner, "plot_method_bars", lambda *a, **k: None)
    cfg = fed_config(
        "fl.leave_one_out=true", "fl.methods=[central,fedavg]", "tracking.tensorboard=false"
    )
    runner.run_simulate(cfg, tmp_path / "run")
    variants = [None, "mixed", "xiangya", "huaxi"]
    assert calls == [("baselines", v) for v in variants] + [("federation", v) for v in variants]
