"""Federated SAVLT through the real ServerApp, strategy and ClientApp, in process
(tests/inprocess.py: no Ray); the end-to-end Ray run is tests/test_cli.py's simulate test."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from reporting.finish import calibrations_for
from savlt_model.calibration import calibration_to_dict
from savlt_model.checkpoint import load_adapter
from savlt_model.data.partition import build_partition
from savlt_model.messages import RoundPlan
from savlt_model.model.adapters import (
    lora_pairs,
    lora_scalings,
    residual_matrices,
    residual_targets,
    trainable_state,
)
from savlt_model.model.build import build_model
from server import strategy as strategy_module
from server.federation import FederatedJob, job_calibrations
from server.strategy import array_bytes, load_checkpoint
from simulation.runner import run_job, simulate_federated
from tests.conftest import check_declared_replies

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_process")]


def _final(out, method: str, rounds: int = 2) -> dict[str, torch.Tensor]:
    state, meta = load_adapter(out / "adapters" / f"{method}_seed42.safetensors")
    assert meta["rounds"] == rounds
    return state


def test_lambda_zero_text_anchored_is_fedavg_with_per_class_prototypes(
    fed_config, tmp_path, train_replies
):
    """lambda = 0 through Flower: shared tensors bit for bit FedAvg's, prototype row c the
    class-c sample-weighted average of the replies (the centres' class mixes differ); a
    positive lambda changes the shared aggregate; and every reply holds only the declared
    tensors and numbers. Three jobs in one simulation (one Ray start)."""
    terms = ("methods.text_anchored.anchor_loss_weight=0", "fl.rounds=1")
    cfg = fed_config("methods.text_anchored.anchor_lambda=0", *terms)
    cfg5 = fed_config("methods.text_anchored.anchor_lambda=50", *terms)
    simulate_federated(
        cfg,
        [
            FederatedJob(cfg, "fedavg", 42, tmp_path / "a"),
            FederatedJob(cfg, "text-anchored", 42, tmp_path / "b"),
            FederatedJob(cfg5, "text-anchored", 42, tmp_path / "c"),
        ],
    )
    fedavg, anchored = (
        _final(tmp_path / "a", "fedavg", 1),
        _final(tmp_path / "b", "text-anchored", 1),
    )
    assert fedavg.keys() == anchored.keys()
    for key in fedavg:
        if key != "prototypes":
            assert torch.equal(fedavg[key], anchored[key]), key
    replies = train_replies[3:6]  # the lambda = 0 text-anchored job's
    check_declared_replies(replies, set(trainable_state(build_model(cfg, 42))), n=3)
    counts = torch.tensor(
        [list(m.content.metric_records["metrics"]["class-counts"]) for m in replies],
        dtype=torch.float64,
    )
    assert counts.shape[1] == len(cfg.task.classes)
    assert len({tuple((row / row.sum()).tolist()) for row in counts}) == 3  # mixes differ
    protos = torch.stack(
        [m.content.array_records["arrays"].to_torch_state_dict()["prototypes"] for m in replies]
    ).double()
    expected = torch.einsum("kc,kcd->cd", counts / counts.sum(0), protos)
    torch.testing.assert_close(anchored["prototypes"].double(), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(anchored["prototypes"], fedavg["prototypes"], atol=1e-4)
    # ... and the federation really trained: the global adapter moved away from the start
    start = trainable_state(build_model(cfg, 42))
    assert any(not torch.equal(start[k], fedavg[k]) for k in start)
    # a positive lambda changes the shared aggregate
    other = _final(tmp_path / "c", "text-anchored", 1)
    assert any(not torch.equal(other[k], fedavg[k]) for k in fedavg if k != "prototypes")


def test_fedex_through_flower_is_exact_with_factorised_residuals(
    fed_config, tmp_path, train_replies
):
    """One FedEx round through Flower: the global adapter's s B̄ Ā plus its residual, sent as
    low-rank factors (rank (K-1) r, smaller than dense here), is the n_k-weighted average of the
    hospitals' s B_k A_k, and a model that loads it carries exactly that in its weights."""
    cfg = fed_config("fl.lora_aggregation=fedex", "fl.rounds=1")
    run_job(cfg, "fedavg", 42, tmp_path, resume=False)
    final = _final(tmp_path, "fedavg", 1)
    replies = [m.content for m in train_replies]
    states = [c.array_records["arrays"].to_torch_state_dict() for c in replies]
    n = torch.tensor([float(c.metric_records["metrics"]["num-examples"]) for c in replies])
    w = (n / n.sum()).double()
    model = build_model(cfg, 42)
    scalings, base = lora_scalings(model), model.base_weights
    residuals = residual_matrices(final)
    pairs = lora_pairs(list(final))
    assert pairs and residuals.keys() == {f"residual.{p}" for p, _, _ in pairs}
    assert not residuals.keys() & final.keys()  # every layer's residual went as factors
    model.load_global_state(final)
    targets = residual_targets(model)
    for prefix, a_key, b_key in pairs:
        s, key = scalings[prefix], f"residual.{prefix}"
        assert final[key + ".B"].shape[1] == 2 * cfg.model.lora.r  # (K-1) r
        want = sum(
            wk * s * st[b_key].double() @ st[a_key].double()
            for wk, st in zip(w, states, strict=True)
        )
        got = residuals[key].double() + s * final[b_key].double() @ final[a_key].double()
        assert float((got - want).norm() / want.norm()) < 1e-6, prefix
        loaded = targets[key][0].detach().double() - base[key].double()
        torch.testing.assert_close(loaded, residuals[key].double(), rtol=0, atol=1e-6)


def test_ffa_uploads_only_b_and_averages_it_exactly(fed_config, tmp_path, train_replies):
    """FFA-LoRA through Flower: replies carry every LoRA B and no A (A is frozen from the seed
    at every hospital), the global B is the n_k-weighted average, and nothing else travels
    down (no residual)."""
    cfg = fed_config("fl.lora_aggregation=ffa", "fl.rounds=1")
    summary = run_job(cfg, "fedavg", 42, tmp_path, resume=False)
    final = _final(tmp_path, "fedavg", 1)
    fedex_payload = trainable_state(build_model(fed_config(), 42))
    b_keys = {k for k in fedex_payload if ".lora_B." in k}
    check_declared_replies(
        train_replies, set(fedex_payload) - {k for k in fedex_payload if ".lora_A." in k}, n=3
    )
    assert b_keys and b_keys <= set(final)
    assert not any(".lora_A." in k or k.startswith("residual.") for k in final)
    states = [m.content.array_records["arrays"].to_torch_state_dict() for m in train_replies]
    n = torch.tensor(
        [float(m.content.metric_records["metrics"]["num-examples"]) for m in train_replies]
    )
    for key in b_keys:
        want = sum(wk * st[key].double() for wk, st in zip(n / n.sum(), states, strict=True))
        torch.testing.assert_close(final[key].double(), want, rtol=0, atol=1e-6)
    without_a = ArrayRecord({k: v for k, v in fedex_payload.items() if ".lora_A." not in k})
    assert summary["upload_bytes"] == array_bytes(without_a)
    assert summary["upload_bytes"] < array_bytes(ArrayRecord(fedex_payload))


def test_resume_after_crash_ends_at_the_same_adapter(fed_config, tmp_path, monkeypatch):
    # scored after the last round only (fl.eval_every=0): the curves stay consistent on resume
    cfg = fed_config("fl.lora_aggregation=fedex", "fl.server_eval=true", "fl.eval_every=0")
    saved: dict = {}
    original = strategy_module.save_checkpoint

    def keep_round_one(path, state, round_, history):
        original(path, state, round_, history)
        if round_ == 1:
            saved.setdefault("round1", path.read_bytes())

    monkeypatch.setattr(strategy_module, "save_checkpoint", keep_round_one)
    full = tmp_path / "full"
    first = run_job(cfg, "fedavg", 42, full, resume=False)
    assert {c["round"] for c in first["curves"]} == {2}
    uninterrupted = _final(full, "fedavg")
    assert any(k.startswith("residual.") for k in uninterrupted)

    # What a server killed during round 2 leaves behind: the round-1 checkpoint only.
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    (crashed / "checkpoints" / "fedavg_seed42.safetensors").write_bytes(saved["round1"])
    summary = run_job(cfg, "fedavg", 42, crashed, resume=True)
    resumed = _final(crashed, "fedavg")
    assert [r["round"] for r in summary["history"]] == [1, 2]
    assert summary["curves"] == first["curves"]
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key
    shutil.rmtree(crashed / "jobs")


def test_hospitals_calibrate_the_global_model_with_sums_only(fed_config, tmp_path):
    """The calibration the server fits from the hospitals' two query replies (sums over their
    own scans, through Flower) equals the one fitted from the same scans in one process."""
    cfg = fed_config("fl.rounds=1")
    summary = run_job(cfg, "fedavg", 42, tmp_path, resume=False)
    state, meta = load_adapter(tmp_path / "adapters" / "fedavg_seed42.safetensors")
    model = build_model(cfg, 42)
    model.load_global_state(state)
    local = calibrations_for(model, cfg, build_partition(cfg, 42).hospitals)
    federated = job_calibrations(summary)
    assert local is not None and federated is not None
    # equal up to float32 rounding (the hospitals' processes run other thread counts)
    for fed, loc in zip(federated, local, strict=True):
        np.testing.assert_allclose(fed.reference, loc.reference, atol=1e-6)
        assert fed.temperature == loc.temperature
        assert fed.recentre == loc.recentre
    assert federated[0].log_bias is None  # inductive: temperature only
    np.testing.assert_allclose(federated[1].log_bias, local[1].log_bias, atol=1e-5)
    assert federated[0].temperature != 1.0  # it was fitted, not left at its default
    # the saved adapter carries the federated calibrations for `savlt predict` / `calibrate`
    assert meta["centre_calibration"] == calibration_to_dict(federated[1])
    assert not [e for e in summary["events"] if e["event"].startswith("calibration")]


def test_feature_centring_reference_is_built_from_the_hospitals_reports(
    fed_config, tmp_path, train_replies, monkeypatch
):
    """With fl.feature_centring, each hospital reports its train features' count and sum; the
    next round's plan carries their pooled mean, onto which every hospital re-centres."""
    plans: list = []
    original = strategy_module.SavltStrategy._plan_record

    def spy(self, server_round, config):
        record = original(self, server_round, config)
        plans.append(RoundPlan.from_record(record))
        return record

    monkeypatch.setattr(strategy_module.SavltStrategy, "_plan_record", spy)
    cfg = fed_config("fl.feature_centring=true")
    run_job(cfg, "fedavg", 42, tmp_path, resume=False)
    # the first plan of a round is its training plan (evaluate's comes after aggregation)
    plans = [p for i, p in enumerate(plans) if p.round not in {q.round for q in plans[:i]}]
    assert [p.round for p in plans] == [1, 2] and all(p.feature_centring for p in plans)
    assert plans[0].reference is None  # nothing reported yet: round 1 trains uncentred
    rounds = [train_replies[:3], train_replies[3:]]
    means = []
    for replies in rounds:
        metrics = [m.content.metric_records["metrics"] for m in replies]
        assert all(m["feature-count"] == m["num-examples"] for m in metrics)
        total = np.sum([np.asarray(m["feature-sum"]) for m in metrics], axis=0)
        means.append(total / sum(m["feature-count"] for m in metrics))
    np.testing.assert_allclose(plans[1].reference, means[0], rtol=1e-12)
    # the hospitals' own means differ from the reference: the shift is not a no-op
    own = np.asarray(rounds[0][0].content.metric_records["metrics"]["feature-sum"])
    own = own / rounds[0][0].content.metric_records["metrics"]["feature-count"]
    assert np.linalg.norm(own - means[0]) > 1e-3
    _, _, history = load_checkpoint(tmp_path / "checkpoints" / "fedavg_seed42.safetensors")
    np.testing.assert_allclose(history.reference, means[1], rtol=1e-12)
