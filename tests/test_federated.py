"""Federated SAVLT through real Flower (`run_simulation`, Ray, real ClientApp/ServerApp)."""

from __future__ import annotations

import shutil

import pytest
import torch

from savlt_model.checkpoint import load_adapter
from savlt_model.model.adapters import trainable_state
from savlt_model.model.build import build_model
from server import strategy as strategy_module
from simulation.runner import run_job
from tests.conftest import check_declared_replies

pytestmark = pytest.mark.slow


def _final(out, method: str) -> dict[str, torch.Tensor]:
    state, meta = load_adapter(out / "adapters" / f"{method}_seed42.safetensors")
    assert meta["rounds"] == 2
    return state


def test_lambda_zero_text_anchored_equals_fedavg(fed_config, tmp_path):
    cfg = fed_config("fl.anchor_lambda=0", "fl.anchor_loss_weight=0")
    run_job(cfg, "fedavg", 42, tmp_path / "a", resume=False)
    run_job(cfg, "text-anchored", 42, tmp_path / "b", resume=False)
    fedavg, anchored = _final(tmp_path / "a", "fedavg"), _final(tmp_path / "b", "text-anchored")
    assert fedavg.keys() == anchored.keys()
    for key in fedavg:
        assert torch.equal(fedavg[key], anchored[key]), key
    # ... and the federation really trained: the global adapter moved away from the start
    start = trainable_state(build_model(cfg, 42))
    assert any(not torch.equal(start[k], fedavg[k]) for k in start)
    # a positive lambda changes the aggregate
    cfg5 = fed_config("fl.anchor_lambda=50", "fl.anchor_loss_weight=0")
    run_job(cfg5, "text-anchored", 42, tmp_path / "c", resume=False)
    other = _final(tmp_path / "c", "text-anchored")
    assert any(not torch.equal(other[k], fedavg[k]) for k in fedavg)


def test_replies_hold_only_declared_tensors_and_numbers(fed_config, tmp_path, train_replies):
    cfg = fed_config("fl.rounds=1")
    run_job(cfg, "text-anchored", 42, tmp_path, resume=False)
    check_declared_replies(train_replies, set(trainable_state(build_model(cfg, 42))), n=3)
    for msg in train_replies:
        counts = msg.content.metric_records["metrics"]["class-counts"]
        assert len(counts) == len(cfg.task.classes)


def test_resume_after_crash_ends_at_the_same_adapter(fed_config, tmp_path, monkeypatch):
    cfg = fed_config("fl.lora_aggregation=fedex")
    saved: dict = {}
    original = strategy_module.save_checkpoint

    def keep_round_one(path, state, round_, history):
        original(path, state, round_, history)
        if round_ == 1:
            saved.setdefault("round1", path.read_bytes())

    monkeypatch.setattr(strategy_module, "save_checkpoint", keep_round_one)
    full = tmp_path / "full"
    run_job(cfg, "fedavg", 42, full, resume=False)
    uninterrupted = _final(full, "fedavg")
    assert any(k.startswith("residual.") for k in uninterrupted)

    # What a server killed during round 2 leaves behind: the round-1 checkpoint only.
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    (crashed / "checkpoints" / "fedavg_seed42.safetensors").write_bytes(saved["round1"])
    summary = run_job(cfg, "fedavg", 42, crashed, resume=True)
    resumed = _final(crashed, "fedavg")
    assert [r["round"] for r in summary["history"]] == [1, 2]
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key
    shutil.rmtree(crashed / "jobs")
