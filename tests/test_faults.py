"""Faults in a federated run, through the real strategy and ClientApp: one end-to-end Ray run
(a hospital down mid-round), the rest in process (tests/inprocess.py).

Hospitals misbehave through :mod:`tests.faulty_clientapp` (faults travel in the round's
ConfigRecord). A server killed mid-run and resumed is covered by
``tests/test_federated.py::test_resume_after_crash_ends_at_the_same_adapter``; SuperNode
authentication and teardown by ``tests/test_deploy.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flwr.simulation
import numpy as np
import pytest
import torch

from client.app import SimulatedHospitals, check_fingerprints, simulation_node_config
from savlt_model.checkpoint import load_adapter
from savlt_model.config import PROJECT_ROOT, load_config, with_key
from savlt_model.errors import SavltError
from savlt_model.messages import RoundPlan
from savlt_model.methods import LossTerms
from savlt_model.model.backbone import load_backbone
from savlt_model.model.savlt import SavltModel
from server import strategy as strategy_module
from server.aggregation import client_weights, prototype_agreement
from server.federation import FederatedJob
from simulation.runner import server_app_for
from tests.conftest import assert_no_local_text
from tests.faulty_clientapp import FAULTS_KEY, RECORD_KEY
from tests.faulty_clientapp import app as faulty_app

pytestmark = pytest.mark.slow


def _run(
    cfg,
    out,
    faults: str,
    monkeypatch,
    method: str = "fedavg",
    record: Path | None = None,
    per_partition: dict[int, dict] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """One job whose hospitals misbehave as ``faults`` says; (summary, final adapter).
    ``record``: the hospitals write their merged weights' fingerprints there."""
    original = strategy_module.SavltStrategy._plan_record

    def with_faults(self, server_round, config):
        record_ = original(self, server_round, config)
        record_[FAULTS_KEY] = faults
        if record is not None:
            record_[RECORD_KEY] = str(record)
        return record_

    monkeypatch.setattr(strategy_module.SavltStrategy, "_plan_record", with_faults)
    job = FederatedJob(cfg, method, 42, out)
    flwr.simulation.run_simulation(
        server_app=server_app_for(job),
        client_app=SimulatedHospitals(faulty_app, simulation_node_config(cfg), per_partition),
        num_supernodes=cfg.fl.hospitals,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    state, _ = load_adapter(out / "adapters" / f"{method}_seed42.safetensors")
    return json.loads(job.result_file.read_text()), state


@pytest.mark.ray
def test_hospital_down_mid_round_then_rejoins(fed_config, tmp_path, monkeypatch):
    cfg = fed_config("fl.min_hospitals=2")
    summary, state = _run(cfg, tmp_path, "1:1:crash", monkeypatch)
    assert [r["hospitals"] for r in summary["history"]] == [2, 3]  # rejoined in round 2
    (event,) = summary["events"]
    assert event["round"] == 1 and event["event"] == "failed"
    assert event["reason"] == "internal-error" and event["node"].isdigit()  # no crash text
    assert all(bool(t.isfinite().all()) for t in state.values())


@pytest.mark.usefixtures("in_process")
def test_kept_state_restarted_and_stateless_hospitals_hold_the_same_model(
    fed_config, tmp_path, monkeypatch
):
    """FedEx, 3 rounds. Hospital 0 keeps the global state but restarts before round 2 and
    loses it; hospital 1 keeps it; hospital 2 keeps nothing (keep-state = false).

    Round 2: 0 and 1 are sent only the round's step; 0 refuses it (it keeps nothing), fails
    the round and is sent the full state in round 3. In every round, every hospital that
    trained held the same merged weights bit for bit, whatever it was sent.
    """
    cfg = fed_config("fl.lora_aggregation=fedex", "fl.rounds=3", "fl.min_hospitals=2")
    record = tmp_path / "weights"
    record.mkdir()
    summary, _ = _run(
        cfg,
        tmp_path / "run",
        "0:2:forget",
        monkeypatch,
        record=record,
        per_partition={2: {"keep-state": "false"}},
    )
    rows = summary["history"]
    assert [r["hospitals"] for r in rows] == [3, 2, 3]
    assert [r["downlink-deltas"] for r in rows] == [0, 2, 1]
    (event,) = summary["events"]
    assert event["round"] == 2 and event["event"] == "failed"
    assert event["reason"] == "state-mismatch"
    prints = {f.stem: f.read_text() for f in record.iterdir()}
    assert sorted(prints) == [
        "p0-r1",
        "p0-r3",
        "p1-r1",
        "p1-r2",
        "p1-r3",
        "p2-r1",
        "p2-r2",
        "p2-r3",
    ]
    for round_ in (1, 2, 3):
        assert len({v for k, v in prints.items() if k.endswith(f"-r{round_}")}) == 1, round_
    # round 1's residual is zero (B starts at zero, so one step leaves every A unchanged);
    # round 2's is not: the kept total changed and was replayed exactly
    assert prints["p1-r2"] != prints["p1-r3"]


@pytest.mark.usefixtures("in_process")
def test_bad_updates_are_rejected_and_never_averaged(fed_config, tmp_path, monkeypatch, caplog):
    """Rejected updates leave the adapter of a run where those hospitals were down."""
    cfg = fed_config("fl.min_hospitals=1", "fl.max_update_norm=100")
    bad = {(2, 1): "nan", (1, 1): "keys", (2, 2): "shape", (1, 2): "norm"}
    spec = ",".join(f"{p}:{r}:{k}" for (p, r), k in bad.items())
    summary, state = _run(cfg, tmp_path / "bad", spec, monkeypatch)
    assert [e["event"] for e in summary["events"]] == ["rejected"] * 4
    text = " ".join(e["reason"] for e in summary["events"])
    assert "non-finite" in text and "keys differ" in text and "exceeds the bound" in text
    assert "has shape" in text
    for e in summary["events"]:  # the log names the node
        assert f"update from node {e['node']}" in caplog.text
    assert [r["hospitals"] for r in summary["history"]] == [1, 1]

    crash = ",".join(f"{p}:{r}:crash" for p, r in bad)
    _, without = _run(cfg, tmp_path / "down", crash, monkeypatch)
    assert state.keys() == without.keys()
    # Equal up to float rounding: a Ray actor's round-2 training can differ in the 7th digit
    # between runs (measured: 8e-8 at most); a NaN, +1000 or stray tensor would be far off.
    for key in state:
        assert torch.allclose(state[key], without[key], rtol=1e-4, atol=1e-6), key


@pytest.mark.usefixtures("in_process")
def test_mismatched_prompts_are_refused_with_the_reason(fed_config, tmp_path, monkeypatch):
    prompts = tmp_path / "other_prompts.yaml"
    original = (PROJECT_ROOT / "configs/prompts/cervical_oct.yaml").read_text()
    prompts.write_text(original.replace("irregular tumour nests", "irregular tumor nests"))
    assert prompts.read_text() != original
    cfg = fed_config("fl.rounds=1", "fl.min_hospitals=2")
    summary, _ = _run(cfg, tmp_path / "run", f"0:1:prompts={prompts}", monkeypatch)
    (event,) = summary["events"]
    assert event["event"] == "failed"
    assert event["reason"] == "fingerprint"  # the prompts file's path stays at the hospital
    assert_no_local_text([event["reason"]], [prompts])
    assert summary["history"][0]["hospitals"] == 2


def test_backbone_and_class_list_mismatches_are_named():
    """The same check the prompts test exercises through Flower, for the other two causes."""
    cfg = load_config(None, ["model.lora.last_n_blocks=1"])
    server = SavltModel(cfg, load_backbone("savlt-tiny"))
    fp = (server.backbone_fingerprint, server.anchor_fingerprint)
    plan = RoundPlan(cfg, "fedavg", 42, 1, 1, 1, *fp, LossTerms())
    check_fingerprints(server, plan, "same")  # identical set-up: accepted
    other_weights = SavltModel(cfg, load_backbone("savlt-tiny", init_seed=7))
    with pytest.raises(SavltError, match="frozen backbone differs"):
        check_fingerprints(other_weights, plan, "h1")
    four = dataclasses.replace(
        cfg, task=dataclasses.replace(cfg.task, classes=cfg.task.classes[:4])
    )
    fewer_classes = SavltModel(four, load_backbone("savlt-tiny"))
    with pytest.raises(SavltError, match="class list"):
        check_fingerprints(fewer_classes, plan, "h2")


@pytest.mark.usefixtures("in_process")
def test_a_gaming_hospital_gets_what_its_upload_earns_and_no_more_than_the_cap(
    fed_config, tmp_path, monkeypatch, train_replies
):
    """Hospital 0 reports agreement 1.0, uploads P = T and shifts every other tensor by +10.

    The server ignores the reported number, computes a_kc from the upload (1.0: the best an
    upload can earn), and the cap (default 2) holds its share at twice its FedAvg share;
    measured on the aggregate itself, the outlier's pull is exactly that capped share.
    """
    calls: list[tuple] = []
    real = strategy_module.aggregate

    def spy(*args):
        state, step, report = real(*args)
        calls.append((args, state, report))
        return state, step, report

    monkeypatch.setattr(strategy_module, "aggregate", spy)
    # no update bound: this checks that the weight cap, not the norm bound, stops the outlier
    cfg = fed_config(
        "fl.rounds=1", "methods.text_anchored.anchor_lambda=20", "fl.max_update_norm=0"
    )
    summary, final = _run(cfg, tmp_path, "0:1:outlier", monkeypatch, "text-anchored")
    assert summary["events"] == []
    (((updates, _, _, run_cfg, _, anchors), state, report),) = calls
    lied = [m for m in train_replies if "anchor-agreement" in m.content.metric_records["metrics"]]
    assert len(lied) == 1 and list(lied[0].content["metrics"]["anchor-agreement"]) == [1.0] * 5
    agreement = np.stack([prototype_agreement(u.state["prototypes"], anchors) for u in updates])
    (j,) = np.flatnonzero(agreement.min(axis=1) > 1 - 1e-6)  # the outlier's upload: a_kc = 1
    assert agreement[np.arange(3) != j].max() < 0.9  # honest uploads earn less

    shared, _ = client_weights(updates, "text-anchored", run_cfg, anchors)
    np.testing.assert_array_equal(report["weights"], shared)  # from uploads only
    n = np.array([u.num_examples for u in updates], dtype=float)
    uncapped, _ = client_weights(
        updates,
        "text-anchored",
        with_key(run_cfg, "methods.text_anchored.max_weight_ratio", np.inf),
        anchors,
    )
    assert uncapped[j] > 0.99  # what the upload alone would buy with lambda = 20
    assert shared[j] == pytest.approx(2 * n[j] / n.sum(), rel=1e-12)

    key = "roi_pool.query"  # a shared tensor: the aggregate's pull toward the outlier
    x = torch.stack([u.state[key].double() for u in updates])
    others = torch.from_numpy(np.delete(shared, j) / np.delete(shared, j).sum())
    honest = (others[:, None] * torch.cat([x[:j], x[j + 1 :]])).sum(0)
    pull = final[key].double() - honest
    share = float(pull @ (x[j] - honest) / (x[j] - honest).square().sum())
    assert share == pytest.approx(shared[j], abs=1e-6)
    assert share <= 2 * n[j] / n.sum() + 1e-6
    assert torch.equal(final[key], state[key])

    (row,) = summary["history"]  # the round's log carries what the weighting saw and gave
    assert row["weights"] == shared.tolist()
    np.testing.assert_allclose(row["agreement"], agreement, rtol=0, atol=1e-12)
    np.testing.assert_allclose(row["fedavg-weights"], n / n.sum(), rtol=1e-12)
    assert row["weight-shift"] == pytest.approx(shared[j] - n[j] / n.sum(), rel=1e-9)
