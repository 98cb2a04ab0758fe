"""Hostile participants (issue #26): a hostile server's plans, a hostile hospital's replies.

In-process, with real Flower Message, RecordDict and Context objects and the real ClientApp
(its mods included) and strategy; every hostile plan or reply is built by hand.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from client.app import simulation_node_config
from client.guard import audit_file
from client.policy import policy_for, write_policy
from savlt_model.config import Config, PrivacyConfig, load_config
from savlt_model.errors import SavltError
from savlt_model.messages import (
    ARRAYS,
    CONFIG,
    FEATURE_STATS,
    METRICS,
    RoundPlan,
    feature_stats_from,
    reason_code,
    val_stats_from,
)
from savlt_model.methods import LossTerms, get_method
from savlt_model.model.adapters import lora_scalings, trainable_state
from savlt_model.model.build import build_model
from server.accounting import privacy_spent
from server.aggregation import lora_pairs, update_norm
from server.privacy import with_privacy
from server.strategy import RoundLog, SavltStrategy, load_checkpoint
from tests.conftest import assert_no_local_text

RUN = 2626
TaskIdentity.run_id = RUN  # what Flower sets in a ClientApp process
TaskIdentity.node_id = 11
TaskIdentity.task_id = 1


def _plan(cfg: Config, **edits) -> RoundPlan:
    model = build_model(cfg, 42)
    plan = RoundPlan(
        cfg,
        "fedavg",
        42,
        1,
        1,
        2,
        model.backbone_fingerprint,
        model.anchor_fingerprint,
        get_method("fedavg").losses(cfg.methods),
    )
    return dataclasses.replace(plan, **edits)


def _record(plan: RoundPlan, config_edits: dict | None = None, **extra) -> ConfigRecord:
    """The plan's record, with its savlt-config JSON edited as a hostile server would."""
    record = plan.to_record()
    raw = json.loads(record["savlt-config"])
    for key, value in (config_edits or {}).items():
        section, name = key.rsplit(".", 1)
        node = raw
        for part in section.split("."):
            node = node[part]
        node[name] = value
    return ConfigRecord({**record, "savlt-config": json.dumps(raw), **extra})


def _send(cfg: Config, record: ConfigRecord, node: dict, kind: str = "train", ctx=None):
    """(reply, context) of the real ClientApp to one hand-built message."""
    state = trainable_state(build_model(cfg, 42))
    content = RecordDict({ARRAYS: ArrayRecord(state), CONFIG: record})
    msg = Message(content=content, dst_node_id=11, message_type=kind)
    context = ctx or Context(
        run_id=RUN, node_id=11, node_config=node, state=RecordDict(), run_config={}
    )
    return client_app(msg, context), context


@pytest.fixture
def hospital(fed_config, tmp_path):
    """(cfg, node config) of simulated hospital 0 with its own work directory."""
    cfg = fed_config("fl.rounds=1")
    node = {
        **simulation_node_config(cfg),
        "work-dir": str(tmp_path / "work"),
        "partition-id": 0,
        "num-partitions": 3,
    }
    return cfg, node


def _refused(reply: Message, code: str) -> None:
    assert reply.has_error()
    assert reply.error.reason == f"{code} run {RUN}"
    assert reason_code(reply.error.reason) == code


# --- a hostile server ---------------------------------------------------------------------


def test_a_dotdot_class_name_is_refused_before_any_file_is_touched(hospital, tmp_path):
    cfg, node = hospital
    node = {**node, "data-root": str(tmp_path / "no-such-data")}  # data read: data-error
    bad = ["normal", "../../../outside", *cfg.task.classes[2:]]
    reply, _ = _send(cfg, _record(_plan(cfg), {"task.classes": bad}), node)
    _refused(reply, "plan-invalid")
    work = Path(node["work-dir"])
    assert [p.relative_to(work).parts[0] for p in work.rglob("*") if p.is_file()] == ["audit"]
    assert not (tmp_path / "outside").exists()
    with pytest.raises(SavltError, match=r"'task.classes': '../../../outside' is not a plain"):
        load_config("configs/smoke.yaml", ["task.classes=[a, ../../../outside]"])


def test_a_plan_whose_config_does_not_match_its_fingerprints_is_refused(hospital, tmp_path):
    """The policy approves the fingerprints the plan announces; the config sent with them
    builds other anchors: the recomputation refuses it before the (missing) data is read."""
    cfg, node = hospital
    policy = write_policy(tmp_path / "policy.yaml", policy_for(cfg))
    node = {**node, "policy": str(policy), "data-root": str(tmp_path / "no-such-data")}
    swapped = [cfg.task.classes[1], cfg.task.classes[0], *cfg.task.classes[2:]]
    record = _record(_plan(cfg), {"task.classes": swapped, "task.positive": cfg.task.positive})
    reply, _ = _send(cfg, record, node)
    _refused(reply, "policy")  # the policy's class list pins the order too
    policy = write_policy(tmp_path / "p2.yaml", dataclasses.replace(policy_for(cfg), classes=None))
    reply, _ = _send(cfg, record, {**node, "policy": str(policy)})
    _refused(reply, "fingerprint")


def test_a_hub_model_name_is_not_fetched_unless_the_policy_allows_it(hospital, tmp_path):
    cfg, node = hospital
    record = _record(_plan(cfg), {"model.name": "hf-hub:attacker/model"})
    reply, _ = _send(cfg, record, node)
    _refused(reply, "model-source")
    policy = policy_for(cfg, fingerprints=(record["backbone-fingerprint"], "a"))
    assert not policy.allow_hub  # a study on a local backbone
    path = write_policy(
        tmp_path / "policy.yaml",
        dataclasses.replace(policy, anchor_fingerprint=record["anchor-fingerprint"]),
    )
    reply, _ = _send(cfg, record, {**node, "policy": str(path)})
    _refused(reply, "model-source")  # approved otherwise: the source is still refused


def test_unknown_plan_fields_and_unapproved_seeds_or_loss_weights_are_refused(hospital, tmp_path):
    cfg, node = hospital
    reply, _ = _send(cfg, _record(_plan(cfg), **{"exfiltrate": "glob:*"}), node)
    _refused(reply, "plan-invalid")
    node = {**node, "policy": str(write_policy(tmp_path / "p.yaml", policy_for(cfg)))}
    for plan in (
        _plan(cfg, seed=7),
        _plan(cfg, loss_terms=LossTerms(prox_mu=5.0)),
        _plan(cfg, loss_terms=LossTerms(anchor_weight=float("nan"))),
    ):
        reply, _ = _send(cfg, _record(plan), node)
        _refused(reply, "policy")


@pytest.mark.parametrize(
    "pattern",
    [
        r"^(?P<patient>nobody)_",  # misses every image
        r"^cancer/huaxi_0000",  # crafted: matches one file name and fails on the next
    ],
)
def test_a_server_patient_pattern_leaks_no_file_name(hospital, pattern, caplog):
    cfg, node = hospital
    with caplog.at_level(logging.ERROR, logger="client.guard"):
        reply, _ = _send(cfg, _record(_plan(cfg), {"data.patient_pattern": pattern}), node)
    _refused(reply, "data-error")
    assert "does not match image" in caplog.text  # the full text stays in the local log
    entries = [json.loads(line) for line in audit_file(node).read_text().splitlines()]
    assert entries[-1]["reason"] == "data-error" and not entries[-1]["tensors"]
    assert_no_local_text([reply.error.reason, json.dumps(entries)], [cfg.data.root])


def test_a_calibration_query_is_answered_once_per_run_and_model(hospital):
    cfg, node = hospital
    record = _record(_plan(cfg))
    first, ctx = _send(cfg, record, node, FEATURE_STATS)
    assert not first.has_error()
    assert int(first.content[METRICS]["feature-count"]) > 0
    again, _ = _send(cfg, record, node, FEATURE_STATS, ctx=ctx)
    _refused(again, "query-repeated")
    entries = [json.loads(line) for line in audit_file(node).read_text().splitlines()]
    assert [e["reason"] for e in entries] == [None, "query-repeated"]


def test_the_audit_log_matches_what_was_sent(hospital):
    cfg, node = hospital
    reply, _ = _send(cfg, _record(_plan(cfg)), node)
    assert not reply.has_error()
    (entry,) = [json.loads(line) for line in audit_file(node).read_text().splitlines()]
    sent = reply.content[ARRAYS]
    assert entry["tensors"] == [
        {"name": k, "shape": list(a.shape), "bytes": len(a.data)} for k, a in sent.items()
    ]
    assert entry["metrics"] == {k: v for k, v in reply.content[METRICS].items()}
    assert entry["run"] == RUN and entry["message"] == "train" and entry["round"] == 1
    assert_no_local_text([json.dumps(entry)], [cfg.data.root, node["work-dir"]])


# --- a hostile hospital ------------------------------------------------------------------


def _strategy(cfg: Config, tmp_path: Path, registered: dict | None = None) -> SavltStrategy:
    model = build_model(cfg, 42)
    strategy = SavltStrategy(
        plan_for=lambda r: _plan(cfg),
        scalings=lora_scalings(model),
        anchors=model.anchors.detach().cpu(),
        checkpoint=tmp_path / "ckpt.safetensors",
        start_round=0,
        history=RoundLog(),
        num_hospitals=3,
        min_hospitals=1,
        client_eval=False,
        registered=registered,
    )
    strategy.sent = trainable_state(model)
    return strategy


def _reply(state: dict, node: int, n: int, counts: list[int]) -> Message:
    out = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    metrics = MetricRecord(
        {"num-examples": n, "class-counts": counts, "train-loss": 1.0, "state-version": -1}
    )
    reply = Message(RecordDict({ARRAYS: ArrayRecord(state), METRICS: metrics}), reply_to=out)
    return reply


def _honest(sent: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sent.items()}


def test_a_claimed_million_examples_weighs_as_the_registered_size(fed_config, tmp_path):
    cfg = fed_config()
    c = len(cfg.task.classes)
    strategy = _strategy(cfg, tmp_path, registered={"1": 30, "2": 30, "3": 30})
    replies = [
        _reply(_honest(strategy.sent, k), k, n, [n // c] * (c - 1) + [n - (n // c) * (c - 1)])
        for k, n in ((1, 10**6), (2, 30), (3, 30))
    ]
    strategy.aggregate_train(1, replies)
    row = strategy.history.rows[-1]
    assert row["fedavg-weights"] == pytest.approx([1 / 3] * 3)  # not 0.9999


def test_the_operator_registers_dataset_sizes_in_the_run_config():
    from server.app import registered_examples

    assert registered_examples("12=40; 7=35") == {"12": 40, "7": 35}
    assert registered_examples("") == {}
    with pytest.raises(ValueError, match="'registered-examples': '12=lots' must be NODE_ID=N"):
        registered_examples("12=lots")


def test_scaled_and_huge_lora_updates_are_refused_and_everything_stays_finite(fed_config, tmp_path):
    cfg = fed_config()
    assert cfg.fl.max_update_norm == 15.0  # the default bound
    strategy = _strategy(cfg, tmp_path)
    sent = strategy.sent
    honest = _honest(sent, 1)
    scaled = {k: sent[k] + 100 * (honest[k] - sent[k]) for k in sent}
    huge = dict(_honest(sent, 2))
    for _, a_key, b_key in lora_pairs(sorted(sent)):
        huge[a_key] = torch.full_like(sent[a_key], 1e25)
        huge[b_key] = torch.full_like(sent[b_key], 1e25)
    assert update_norm(honest, sent) < 15 < update_norm(scaled, sent)
    counts = [5] * len(cfg.task.classes)
    arrays, _ = strategy.aggregate_train(
        1,
        [_reply(honest, 1, 20, counts), _reply(scaled, 2, 20, counts), _reply(huge, 3, 20, counts)],
    )
    events = strategy.history.events
    assert [(e["node"], e["event"]) for e in events] == [("2", "rejected"), ("3", "rejected")]
    assert all("exceeds the bound 15" in e["reason"] for e in events)
    state = arrays.to_torch_state_dict()
    assert all(torch.equal(state[k], honest[k]) for k in sent)  # the one honest update
    model = build_model(cfg, 42)
    model.load_global_state(state)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    stored, round_, _ = load_checkpoint(strategy.checkpoint)
    assert round_ == 1 and all(bool(torch.isfinite(t).all()) for t in stored.values())


def test_an_update_of_another_aggregation_kind_is_refused(fed_config, tmp_path):
    cfg = fed_config("fl.lora_aggregation=ffa")
    strategy = _strategy(cfg, tmp_path)
    naive = trainable_state(build_model(fed_config("fl.lora_aggregation=naive"), 42))
    assert lora_pairs(sorted(naive)) and not lora_pairs(sorted(strategy.sent))
    counts = [5] * len(cfg.task.classes)
    strategy.aggregate_train(1, [_reply(naive, 4, 20, counts)])
    (event,) = strategy.history.events[:1]
    assert event["event"] == "rejected"
    assert event["reason"] == "the update's LoRA aggregation kind is not the run's ffa"


def test_calibration_replies_that_are_not_finite_or_do_not_add_up_are_refused():
    good = {"feature-count": 4, "feature-sum": [1.0, 2.0]}
    assert feature_stats_from(good, 2).count == 4
    with pytest.raises(ValueError, match="non-finite"):
        feature_stats_from({**good, "feature-sum": [float("nan"), 1.0]}, 2)
    with pytest.raises(ValueError, match="expected 2 values"):
        feature_stats_from({**good, "feature-sum": [1.0]}, 2)
    from savlt_model.calibration import LOG_T_GRID

    g, c = len(LOG_T_GRID), 2
    sums = {
        "class-counts": [3, 1],
        "nll-plain": [1.0] * g,
        "posterior-plain": [2.0, 2.0] * g,  # each grid row sums to the 4 counted scans
        "nll-recentred": [1.0] * g,
        "posterior-recentred": [3.0, 1.0] * g,
    }
    plain, _ = val_stats_from(sums, c)
    assert plain.counts.sum() == 4
    with pytest.raises(ValueError, match="non-finite"):
        val_stats_from({**sums, "nll-plain": [float("nan")] * g}, c)
    with pytest.raises(ValueError, match="does not add up"):
        val_stats_from({**sums, "posterior-plain": [200.0, 0.0] * g}, c)
    with pytest.raises(ValueError, match="negative"):
        val_stats_from({**sums, "nll-recentred": [-1.0] * g}, c)


# --- central DP --------------------------------------------------------------------------


def _hand_epsilon(z: float, rounds: int, delta: float) -> float:
    """The Gaussian mechanism's RDP R a / (2 z^2), converted as Opacus does (Balle et al.)."""
    a = np.linspace(1.01, 256, 400_000)
    rdp = rounds * a / (2 * z * z)
    return float(np.min(rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)))


def test_both_dp_relations_are_reported_against_hand_computed_values():
    spent = privacy_spent(PrivacyConfig("server-fixed", 1.0, delta=1e-5), 1)
    assert spent["epsilon"] == pytest.approx(_hand_epsilon(1.0, 1, 1e-5), rel=1e-3)
    assert spent["epsilon"] == pytest.approx(4.73, abs=0.01)  # add/remove-one
    # replace-one: sensitivity 2 C / n, the mechanism at z / 2
    assert spent["epsilon_replace_one"] == pytest.approx(_hand_epsilon(0.5, 1, 1e-5), rel=1e-3)
    assert spent["epsilon_replace_one"] == pytest.approx(10.7, abs=0.05)


def test_server_adaptive_is_refused_at_config_load_with_one_line(capsys, tmp_path):
    from tools.cli import main

    with pytest.raises(SavltError) as info:
        load_config("configs/smoke.yaml", ["privacy.mode=server-adaptive"])
    assert "\n" not in str(info.value) and "'privacy.mode'" in str(info.value)
    args = ["--set", "privacy.mode=server-adaptive", "--out", str(tmp_path / "p.yaml")]
    code = main(["policy", "--config", "configs/smoke.yaml", *args])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "server-adaptive is not supported" in err


def test_only_the_noised_aggregate_is_stored(fed_config, tmp_path):
    dp = ["privacy.mode=server-fixed", "privacy.noise_multiplier=1.0", "fl.methods=[fedavg]"]
    cfg = fed_config(*dp, "fl.lora_aggregation=naive")
    strategy = _strategy(cfg, tmp_path)
    wrapper = with_privacy(strategy, cfg, "fedavg")
    wrapper.num_sampled_clients = 3  # what configure_train sets
    wrapper.current_arrays = ArrayRecord(strategy.sent)
    counts = [5] * len(cfg.task.classes)
    replies = [_reply(_honest(strategy.sent, k), k, 20, counts) for k in (1, 2, 3)]
    plain = {
        k: sum(r.content[ARRAYS].to_torch_state_dict()[k] for r in replies) / 3
        for k in strategy.sent
    }
    arrays, _ = wrapper.aggregate_train(1, replies)
    noised = arrays.to_torch_state_dict()
    stored, _, _ = load_checkpoint(strategy.checkpoint)
    assert all(torch.equal(stored[k], noised[k]) for k in noised)
    assert not all(torch.allclose(stored[k], plain[k], atol=1e-4) for k in plain)


# --- what a reader and a hospital can see ------------------------------------------------


def test_transductive_records_are_marked_in_results_and_the_report():
    from reporting.results import TRANSDUCTIVE, make_record, summarize
    from savlt_model.metrics import METRIC_KEYS

    metrics = dict.fromkeys(METRIC_KEYS, 50.0)
    plain = make_record("fedavg", "huaxi", 42, 16, metrics)
    adapted = make_record("fedavg+cal", "huaxi", 42, 16, metrics, calibration=TRANSDUCTIVE)
    assert plain["transductive"] is False and adapted["transductive"] is True
    rows = {r["method"]: r["transductive"] for r in summarize([plain, adapted])}
    assert rows == {"fedavg": False, "fedavg+cal": True}


def test_savlt_audit_summarises_what_left(hospital, capsys):
    from tools.cli import main

    cfg, node = hospital
    reply, _ = _send(cfg, _record(_plan(cfg)), node)
    _send(cfg, _record(_plan(cfg), **{"exfiltrate": 1}), node)
    path = audit_file(node)
    assert main(["audit", str(path)]) == 0
    out = capsys.readouterr().out
    total = sum(len(a.data) for a in reply.content[ARRAYS].values())
    assert "2 replies in 1 run(s) [2626]" in out
    assert "sent: train x1" in out and "refused: plan-invalid x1" in out
    assert f"tensor bytes sent: {total} ({len(reply.content[ARRAYS])} names" in out
    assert "num-examples" in out
    assert main(["audit", str(path.with_name("missing.jsonl"))]) == 2


def test_every_row_of_the_attack_table_names_a_real_test():
    from savlt_model.config import PROJECT_ROOT

    text = (PROJECT_ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    section = text[text.index("## Attacks and what stops them") :]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    assert len(rows) >= 14
    named = [re.search(r"`(tests/[\w/]+\.py)::(\w+)`", row) for row in rows]
    assert sum(m is not None for m in named) >= 14
    for m in filter(None, named):
        source = (PROJECT_ROOT / m.group(1)).read_text(encoding="utf-8")
        assert f"def {m.group(2)}(" in source, m.group(0)
    assert sum("residual" in row for row in rows) >= 3
