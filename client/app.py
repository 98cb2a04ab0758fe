"""The hospital's Flower ClientApp: trains the SAVLT adapters on local images only.

Everything local comes from the hospital's own ``node_config``: ``center`` (its centre) and
the values of the hospital-local config keys (:data:`savlt_model.config.HOSPITAL_LOCAL_KEYS`:
``data-root``, ``work-dir``, ``split-file``, ``manifest``, ``pretrained``,
``unet-checkpoint``, ``prompts``), plus an optional run ``policy`` file
(:mod:`client.policy`) and ``keep-state`` (:mod:`client.synced_state`: the hospital keeps
the global state between rounds, so only each round's change travels, and SCAFFOLD's
control variate, :mod:`client.controls`; default true). A
server message that sets a hospital-local key is refused with the code ``local-key``;
every refusal leaves as a code only (:mod:`client.guard`), its text stays in the log.
In simulation the hospital is a partition id of :mod:`savlt_model.data.partition`, and
the simulation gives its virtual SuperNodes their node config (:class:`SimulatedHospitals`).
A reply carries exactly the payload tensors and the metric names declared in
:mod:`savlt_model.messages`. The loss terms of the round's method come with the server's
plan: no per-method code here. After the last round, two queries ask for the sums the
server's calibration needs (:mod:`server.calibration`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported here)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.controls import keep_control, round_control
from client.guard import Refused, guard_mod
from client.policy import Policy, check_policy
from client.privacy import clipping_mod
from client.synced_state import keeps_state, synced_state
from savlt_model.config import (
    HOSPITAL_LOCAL_KEYS,
    Config,
    get_key,
    resolve_path,
    validate_local,
    with_key,
)
from savlt_model.data.partition import Hospital, Partition, build_partition
from savlt_model.data.protocol import DEFAULT_WORK_DIR, data_root, prepare_center
from savlt_model.errors import SavltError
from savlt_model.evaluation import (
    predict,
    site_calibration_stats,
    site_class_sums,
    site_feature_stats,
)
from savlt_model.messages import (
    ARRAYS,
    CALIBRATION_STATS_KEYS,
    CONFIG,
    CONTROL,
    CONTROL_RESET,
    EVALUATE_METRIC_KEYS,
    FEATURE_STATS_KEYS,
    METRICS,
    REFERENCE,
    STATE_VERSION,
    TRAIN_METRIC_KEYS,
    Reason,
    RoundPlan,
    class_sums_metrics,
    feature_stats_metrics,
    local_keys_set,
    metric_record,
    val_stats_metrics,
)
from savlt_model.methods import get_method
from savlt_model.metrics import compute_metrics
from savlt_model.model.adapters import trainable_state
from savlt_model.model.backbone import fingerprint_tensors
from savlt_model.model.build import cached_model, image_sets
from savlt_model.model.savlt import SavltModel
from savlt_model.train import lr_sums, train_steps

log = logging.getLogger(__name__)
# the guard is outermost: it sees exactly what leaves (after clipping) and every exception
app = ClientApp(mods=[guard_mod, clipping_mod])  # clips only when a round asks (client-fixed)
ANSWERED = "savlt.answered"  # Context.state: the calibration queries already answered
_PARTITIONS: dict[tuple[str, int], Partition] = {}


def local_config(cfg: Config, node_config: dict) -> Config:
    """The server's run config completed with this hospital's own local values.

    Refuses a config that sets any hospital-local key (the server names no path on this
    disk); every such key then comes from ``node_config`` or keeps its default, and the
    work directory defaults to ``$FLWR_HOME/savlt-work`` (the SuperNode's state directory).
    """
    sent = local_keys_set(cfg)
    if sent:
        raise SavltError(
            f"the server's run config sets the hospital-local key(s) {', '.join(sent)}; "
            "refused: this hospital's paths come only from its own node config ("
            + ", ".join(HOSPITAL_LOCAL_KEYS[k] for k in sent)
            + ")"
        )
    for key, name in HOSPITAL_LOCAL_KEYS.items():
        if name in node_config and str(node_config[name]) != "":
            cfg = with_key(cfg, key, str(node_config[name]))
    if "work-dir" not in node_config:
        home = os.environ.get("FLWR_HOME") or Path.home() / ".flwr"
        cfg = with_key(cfg, "data.work_dir", str(Path(home) / "savlt-work"))
    cfg = with_key(cfg, "data.synthetic.enabled", False)  # a hospital never generates data
    return validate_local(cfg)


def hospital_data(cfg: Config, seed: int, node_config: dict) -> tuple[int, Hospital]:
    """(hospital index, its train/val images) for this node."""
    if "center" in node_config:
        if "data-root" not in node_config:
            raise SavltError(
                "node-config: 'data-root' is required with 'center' (e.g. data-root=\"/data/DATA\")"
            )
        center = str(node_config["center"])
        part = prepare_center(cfg, data_root(cfg), center, seed)
        return zlib.crc32(center.encode()) % 1000, Hospital(center, part.train, part.val)
    if "partition-id" not in node_config:
        raise SavltError(
            "node-config: 'center' and 'data-root' are required (e.g. center=\"huaxi\")"
        )
    key = (json.dumps(cfg.to_dict(), sort_keys=True), seed)
    if key not in _PARTITIONS:  # scanning and verifying every image once per process is enough
        _PARTITIONS.clear()
        _PARTITIONS[key] = build_partition(cfg, seed)
    partition = _PARTITIONS[key]
    pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if n != len(partition.hospitals):
        raise SavltError(
            f"simulation runs {n} nodes but the {cfg.fl.partition} partition has "
            f"{len(partition.hospitals)} hospitals; set num-supernodes to fl.hospitals"
        )
    return pid, partition.hospitals[pid]


def check_fingerprints(model: SavltModel, plan: RoundPlan, hospital: str) -> None:
    """Refuse to train (or be averaged in) with a different backbone, prompts or class list."""
    if model.backbone_fingerprint != plan.backbone_fingerprint:
        raise Refused(
            Reason.FINGERPRINT,
            f"hospital {hospital}: frozen backbone differs from the server's "
            f"({model.backbone_id}, fingerprint {model.backbone_fingerprint} vs "
            f"{plan.backbone_fingerprint}); use the same model.name and weights",
        )
    if model.anchor_fingerprint != plan.anchor_fingerprint:
        raise Refused(
            Reason.FINGERPRINT,
            f"hospital {hospital}: text anchors differ from the server's (fingerprint "
            f"{model.anchor_fingerprint} vs {plan.anchor_fingerprint}); class list "
            f"{model.classes} or prompt descriptions differ",
        )


def check_model_source(cfg: Config, policy: Policy | None) -> None:
    """Never fetch weights by a name the server sent unless the policy allows that source:
    an ``hf-hub:`` model name makes open_clip contact the hub."""
    if cfg.model.name.startswith("hf-hub:") and not (policy and policy.allow_hub):
        raise Refused(
            Reason.MODEL_SOURCE,
            f"model.name {cfg.model.name!r} would be fetched from a hub; set allow_hub: true "
            "in this hospital's run policy to allow it",
        )


def answer_once(msg: Message, context: Context) -> None:
    """A calibration query is answered once per (run, query, global model): repeating one
    (with another reference mean) would let the server probe the same scans again."""
    tensors = msg.content[ARRAYS].to_torch_state_dict()
    version = fingerprint_tensors(sorted(tensors.items()))
    key = f"{msg.metadata.message_type}:{context.run_id}:{version}"
    answered = context.state.config_records.get(ANSWERED)
    done = dict(answered) if answered is not None else {}
    if key in done:
        raise Refused(Reason.QUERY_REPEATED, f"query {key} was already answered")
    done[key] = 1
    context.state[ANSWERED] = ConfigRecord(done)


@functools.cache
def _warn_without_policy(center: str) -> None:
    log.warning(
        "hospital %s has no run policy (node config 'policy'): it runs any method, backbone "
        "and number of rounds the server sends; see docs/deploy.md",
        center,
    )


def _plan(msg: Message, node_config: dict) -> tuple[RoundPlan, Config]:
    """The plan and this hospital's config from it, every field checked; nothing read yet."""
    try:
        plan = RoundPlan.from_record(msg.content[CONFIG])
    except (KeyError, TypeError, ValueError, SavltError) as exc:
        raise Refused(Reason.PLAN_INVALID, f"malformed round plan: {exc}") from exc
    sent = local_keys_set(plan.config)
    if sent:
        raise Refused(
            Reason.LOCAL_KEY, f"the server's run config sets hospital-local key(s) {sent}"
        )
    try:
        return plan, local_config(plan.config, node_config)
    except SavltError as exc:
        raise Refused(Reason.PLAN_INVALID, str(exc)) from exc


def _model_for(
    msg: Message, context: Context
) -> tuple[RoundPlan, Config, int, Hospital, SavltModel, int]:
    """The round's plan, config, hospital data and model holding the global state, and the
    state version this hospital now keeps (-1: none; :mod:`client.synced_state`).

    In this order, so that nothing is read before the plan is approved: plan, policy,
    model source, model (its fingerprints recomputed and compared with the plan's and the
    policy's), then data and the state.
    """
    node_config = dict(context.node_config)
    plan, cfg = _plan(msg, node_config)
    name = str(node_config.get("center", f"partition {node_config.get('partition-id')}"))
    policy = None
    if "policy" in node_config:
        policy = check_policy(str(node_config["policy"]), plan, name)
    elif "center" in node_config:
        _warn_without_policy(name)
    check_model_source(cfg, policy)
    model = cached_model(cfg, plan.seed)
    check_fingerprints(model, plan, name)  # the plan's strings, recomputed from its config
    try:
        index, hospital = hospital_data(cfg, plan.seed, node_config)
    except SavltError as exc:
        raise Refused(Reason.DATA, str(exc)) from exc
    tensors = msg.content[ARRAYS].to_torch_state_dict()
    try:
        state, kept = synced_state(tensors, msg.content[CONFIG], context, keeps_state(node_config))
    except SavltError as exc:
        raise Refused(Reason.STATE, str(exc)) from exc
    model.load_global_state(state)
    return plan, cfg, index, hospital, model, kept


def _val_metrics(model: SavltModel, cfg: Config, hospital: Hospital) -> dict[str, float]:
    if not hospital.val:
        return {"val-n": 0, "val-acc_multiclass": 0.0, "val-acc_binary": 0.0}
    probs, labels, _ = predict(
        model, image_sets(cfg, {"v": hospital.val}, False)["v"], cfg.train.eval_batch_size
    )
    m = compute_metrics(probs, labels, model.positive)
    return {
        "val-n": len(labels),
        "val-acc_multiclass": m["acc_multiclass"],
        "val-acc_binary": m["acc_binary"],
    }


@app.train()
def train(msg: Message, context: Context) -> Message:
    plan, cfg, index, hospital, model, kept = _model_for(msg, context)
    if get_method(plan.method).controls != (CONTROL in msg.content.array_records):
        raise Refused(
            Reason.PLAN_INVALID,
            f"method {plan.method!r} and the message disagree on SCAFFOLD control variates",
        )
    keep = keeps_state(dict(context.node_config))
    control = None
    if CONTROL in msg.content.array_records:  # SCAFFOLD (client/controls.py)
        server = msg.content[CONTROL].to_torch_state_dict()
        control = round_control(msg.content[CONFIG], server, context, keep, hospital.name)
        start = trainable_state(model)
    seed = int(np.random.SeedSequence([plan.seed, plan.round, index]).generate_state(1)[0])
    centring: dict = {}
    shift = None
    if plan.feature_centring:  # this hospital's mean under the incoming global model
        plain = image_sets(cfg, {"t": hospital.train}, False)["t"]
        own = site_feature_stats(model, [plain], cfg.train.eval_batch_size)
        centring = feature_stats_metrics(own)
        if plan.reference is not None:
            shift = np.asarray(plan.reference) - own.mean
    evidence: dict = {}
    if plan.class_means:  # its class evidence under the incoming global model: sums only
        plain = image_sets(cfg, {"t": hospital.train}, False)["t"]
        sums = site_class_sums(model, plain, cfg.train.eval_batch_size)
        evidence = class_sums_metrics(sums, np.bincount(plain.labels, minlength=len(sums)))
    stats = train_steps(
        model,
        image_sets(cfg, {"t": hospital.train}, True)["t"],
        cfg,
        plan.local_steps,
        seed,
        start_step=plan.start_step,
        total_steps=plan.total_steps,
        prox_mu=plan.loss_terms.prox_mu,
        anchor_weight=plan.loss_terms.anchor_weight,
        feature_shift=shift,
        correction=None if control is None else control.correction,
    )
    # the server computes the anchor agreement from the uploaded prototypes: not sent
    counts = np.bincount([s.label for s in hospital.train], minlength=len(model.classes))
    metrics = {
        **centring,
        **evidence,
        "num-examples": len(hospital.train),
        "train-loss": stats.loss,
        "train-steps": stats.steps,
        "class-counts": counts.tolist(),
        **_val_metrics(model, cfg, hospital),
        STATE_VERSION: kept,
        **({} if control is None else {CONTROL_RESET: int(control.reset)}),
    }
    log.info("hospital %s round %d: loss %.4f", hospital.name, plan.round, stats.loss)
    trained = trainable_state(model)
    content = RecordDict(
        {ARRAYS: ArrayRecord(trained), METRICS: metric_record(metrics, TRAIN_METRIC_KEYS)}
    )
    if control is not None:  # last: kept only if the reply could be built
        steps = (plan.start_step, plan.local_steps, plan.total_steps)
        lr = lr_sums(cfg, sorted(trained), *steps)
        keep_control(context, control, start, trained, lr, plan.round, keep)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, cfg, _, hospital, model, kept = _model_for(msg, context)
    metrics = {
        "num-examples": len(hospital.val),
        **_val_metrics(model, cfg, hospital),
        STATE_VERSION: kept,
    }
    metrics.pop("val-n")
    content = RecordDict({METRICS: metric_record(metrics, EVALUATE_METRIC_KEYS)})
    return Message(content=content, reply_to=msg)


@app.query("feature_stats")
def feature_stats(msg: Message, context: Context) -> Message:
    """Calibration, step 1: the count and sum of this hospital's train + val features."""
    _, cfg, _, hospital, model, _ = _model_for(msg, context)
    answer_once(msg, context)
    sets = image_sets(cfg, {"train": hospital.train, "val": hospital.val}, False)
    stats = site_feature_stats(model, list(sets.values()), cfg.train.eval_batch_size)
    metrics = metric_record(feature_stats_metrics(stats), FEATURE_STATS_KEYS)
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)


@app.query("calibration_stats")
def calibration_stats(msg: Message, context: Context) -> Message:
    """Calibration, step 2: validation sums and referral counts given the server's reference."""
    _, cfg, _, hospital, model, _ = _model_for(msg, context)
    answer_once(msg, context)
    reference = np.asarray(msg.content[CONFIG][REFERENCE], dtype=np.float64)
    val = image_sets(cfg, {"val": hospital.val}, False)["val"]
    sums = site_calibration_stats(model, val, cfg.train.eval_batch_size, reference)
    metrics = metric_record(val_stats_metrics(*sums), CALIBRATION_STATS_KEYS)
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)


class SimulatedHospitals(ClientApp):
    """``app`` on Flower's virtual SuperNodes, with ``node_config`` added to theirs.

    A simulated node's own node config holds only ``partition-id`` and ``num-partitions``;
    whoever runs the simulation is also its hospitals' operator, so the simulation gives
    them here what ``--node-config`` gives a real SuperNode (:func:`simulation_node_config`).
    The ClientApp itself reads its local values from the node config only, in both cases.
    ``per_partition`` adds one hospital's own keys (e.g. its ``policy``) by partition id.
    """

    def __init__(
        self, app: ClientApp, node_config: dict, per_partition: dict[int, dict] | None = None
    ) -> None:
        super().__init__()
        self.app = app
        self.node_config = dict(node_config)
        self.per_partition = dict(per_partition or {})

    def __call__(self, message: Message, context: Context) -> Message:
        context = copy.copy(context)  # the node's state is shared; its node config is not
        own = self.per_partition.get(int(context.node_config["partition-id"]), {})
        context.node_config = {**self.node_config, **own, **context.node_config}
        return self.app(message, context)


def simulation_node_config(cfg: Config) -> dict[str, str]:
    """The node config of every simulated hospital: the simulation's own values of the
    hospital-local keys (the work directory resolved, so all nodes share the server's)."""
    out = {}
    for key, name in HOSPITAL_LOCAL_KEYS.items():
        value = get_key(cfg, key)
        if value is not None:
            out[name] = str(value)
    out["work-dir"] = str(resolve_path(cfg.data.work_dir or DEFAULT_WORK_DIR))
    return out
