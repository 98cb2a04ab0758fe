"""TEST ONLY: the hospital ClientApp with faults injected on the server's request.

Simulated hospitals run in Ray worker processes, so a fault cannot be monkeypatched into
them; it travels in the round's ConfigRecord instead. A test adds ``FAULTS_KEY`` to the
round configuration (server side, in the test process), e.g. ``"1:1:crash,2:1:nan"``: a list
of ``partition:round:kind[=argument]``. This app then misbehaves as a broken or hostile
hospital would and otherwise runs the real :func:`client.app.train` (and the real
evaluation and calibration queries).

Kinds: ``crash`` (raises), ``forget`` (a restarted hospital: what it kept between rounds is
lost, then the round runs as usual), ``nan`` (a tensor of NaN), ``keys`` (an unexpected
tensor name), ``shape`` (a tensor of the wrong shape), ``norm`` (+1000 on every tensor),
``prompts=PATH`` (the hospital's own prompts file differs from the server's), ``outlier`` (a
hospital gaming text-anchored weights: it reports an anchor agreement of 1.0 in its
metrics, uploads its prototypes equal to the text anchors, the best agreement an upload can
earn, and adds +10 to every other tensor).

With ``RECORD_KEY`` set to a folder, each hospital that trained writes there the fingerprint
of the frozen weights its model held (base + FedEx residuals: the merged global model) as
``p<partition>-r<round>.txt``, so a test can compare the hospitals' models.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client.app import calibration_stats as real_calibration_stats
from client.app import evaluate as real_evaluate
from client.app import feature_stats as real_feature_stats
from client.app import local_config
from client.app import train as real_train
from client.guard import guard_mod
from savlt_model.messages import ARRAYS, CONFIG, METRICS, RoundPlan
from savlt_model.model.adapters import residual_targets
from savlt_model.model.backbone import fingerprint_tensors
from savlt_model.model.build import cached_model

FAULTS_KEY = "test-faults"
RECORD_KEY = "test-record-dir"
app = ClientApp(mods=[guard_mod])  # as the real app: refusals leave as reason codes


def _strip(msg: Message) -> str | None:
    """Remove this test app's keys from the plan (a real hospital refuses unknown fields);
    the record folder, if one was asked for."""
    config = msg.content[CONFIG]
    record = str(config[RECORD_KEY]) if RECORD_KEY in config else None
    for key in (FAULTS_KEY, RECORD_KEY):
        if key in config:
            del config[key]
    return record


def _fault_for(msg: Message, context: Context) -> tuple[str, str]:
    """(kind, argument) for this hospital and round, or ("", "")."""
    config = msg.content[CONFIG]
    spec = str(config[FAULTS_KEY]) if FAULTS_KEY in config else ""
    pid, round_ = int(context.node_config["partition-id"]), int(config["global-round"])
    for item in filter(None, spec.split(",")):
        p, r, kind = item.split(":", 2)
        if int(p) == pid and int(r) == round_:
            name, _, arg = kind.partition("=")
            return name, arg
    return "", ""


def _outlier(msg: Message, context: Context, reply: Message) -> Message:
    plan = RoundPlan.from_record(msg.content[CONFIG])
    cfg = local_config(plan.config, dict(context.node_config))
    anchors = cached_model(cfg, plan.seed).anchors.detach().cpu()  # built by the real train
    state = reply.content[ARRAYS].to_torch_state_dict()
    state = {k: anchors.clone() if k == "prototypes" else v + 10.0 for k, v in state.items()}
    reply.content[ARRAYS] = ArrayRecord(state)
    reply.content[METRICS]["anchor-agreement"] = [1.0] * len(anchors)
    return reply


def _record_weights(msg: Message, context: Context, folder: str) -> None:
    plan = RoundPlan.from_record(msg.content[CONFIG])
    model = cached_model(local_config(plan.config, dict(context.node_config)), plan.seed)
    weights = {k: w.detach() for k, (w, _) in residual_targets(model).items()}
    pid = int(context.node_config["partition-id"])
    path = Path(folder) / f"p{pid}-r{plan.round}.txt"
    path.write_text(fingerprint_tensors(weights.items()))


def _tamper(reply: Message, kind: str) -> Message:
    state = reply.content[ARRAYS].to_torch_state_dict()
    first = sorted(state)[0]
    if kind == "nan":
        state[first] = torch.full_like(state[first], float("nan"))
    elif kind == "keys":
        state["smuggled.weight"] = torch.zeros(3)
    elif kind == "shape":
        state[first] = torch.zeros(*state[first].shape, 2)
    elif kind == "norm":
        state = {k: v + 1000.0 for k, v in state.items()}
    reply.content[ARRAYS] = ArrayRecord(state)
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    kind, arg = _fault_for(msg, context)
    record = _strip(msg)
    if kind == "crash":
        raise RuntimeError("injected crash: this hospital went down mid-round")
    if kind == "forget":
        for key in list(context.state):
            del context.state[key]
    if kind == "prompts":
        context = copy.copy(context)
        context.node_config = {**context.node_config, "prompts": arg}
    reply = real_train(msg, context)
    if record is not None:
        _record_weights(msg, context, record)
    if kind == "outlier":
        return _outlier(msg, context, reply)
    return _tamper(reply, kind) if kind in ("nan", "keys", "shape", "norm") else reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _strip(msg)
    return real_evaluate(msg, context)


@app.query("feature_stats")
def feature_stats(msg: Message, context: Context) -> Message:
    _strip(msg)
    return real_feature_stats(msg, context)


@app.query("calibration_stats")
def calibration_stats(msg: Message, context: Context) -> Message:
    _strip(msg)
    return real_calibration_stats(msg, context)
