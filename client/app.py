"""The hospital's Flower ClientApp: trains the SAVLT adapters on local images only.

The hospital's data comes from ``node_config`` in deployment (``data-root``, ``center``,
optionally a local ``pretrained`` weights file and ``prompts`` file) and, in simulation,
from the partition-id-to-hospital mapping of :mod:`savlt_model.data.partition`. A reply
carries exactly the payload tensors and the metric names declared in
:mod:`savlt_model.messages`. The loss terms of the round's method come with the server's
plan: no per-method code here. After the last round, two queries ask for the sums the
server's calibration needs (:mod:`server.calibration`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported here)
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from savlt_model.config import Config
from savlt_model.data.partition import Hospital, Partition, build_partition
from savlt_model.data.protocol import prepare_center
from savlt_model.errors import SavltError
from savlt_model.evaluation import predict, site_calibration_stats, site_feature_stats
from savlt_model.messages import (
    ARRAYS,
    CALIBRATION_STATS_KEYS,
    CONFIG,
    EVALUATE_METRIC_KEYS,
    FEATURE_STATS_KEYS,
    METRICS,
    REFERENCE,
    TRAIN_METRIC_KEYS,
    RoundPlan,
    feature_stats_metrics,
    metric_record,
    val_stats_metrics,
)
from savlt_model.metrics import compute_metrics
from savlt_model.model.adapters import trainable_state
from savlt_model.model.build import cached_model, image_sets
from savlt_model.model.savlt import SavltModel
from savlt_model.train import train_steps

log = logging.getLogger(__name__)
app = ClientApp()
_PARTITIONS: dict[tuple[str, int], Partition] = {}


def local_config(cfg: Config, node_config: dict) -> Config:
    """Apply what legitimately lives at the hospital: its data folder, weights, prompts."""
    data, model, task = cfg.data, cfg.model, cfg.task
    if "data-root" in node_config:
        data = dataclasses.replace(
            data,
            root=str(node_config["data-root"]),
            synthetic=dataclasses.replace(data.synthetic, enabled=False),
        )
    if "pretrained" in node_config:
        model = dataclasses.replace(model, pretrained=str(node_config["pretrained"]))
    if "prompts" in node_config:
        task = dataclasses.replace(task, prompts=str(node_config["prompts"]))
    return dataclasses.replace(cfg, data=data, model=model, task=task)


def hospital_data(cfg: Config, seed: int, node_config: dict) -> tuple[int, Hospital]:
    """(hospital index, its train/val images) for this node."""
    if "data-root" in node_config:
        if "center" not in node_config:
            raise SavltError(
                "node-config: 'center' is required with 'data-root' (e.g. center=\"huaxi\")"
            )
        center = str(node_config["center"])
        part = prepare_center(cfg, Path(cfg.data.root), center, seed)
        return zlib.crc32(center.encode()) % 1000, Hospital(center, part.train, part.val)
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
        raise SavltError(
            f"hospital {hospital}: frozen backbone differs from the server's "
            f"({model.backbone_id}, fingerprint {model.backbone_fingerprint} vs "
            f"{plan.backbone_fingerprint}); use the same model.name and weights"
        )
    if model.anchor_fingerprint != plan.anchor_fingerprint:
        raise SavltError(
            f"hospital {hospital}: text anchors differ from the server's (fingerprint "
            f"{model.anchor_fingerprint} vs {plan.anchor_fingerprint}); class list "
            f"{model.classes} or prompt descriptions differ"
        )


def _model_for(
    msg: Message, context: Context
) -> tuple[RoundPlan, Config, int, Hospital, SavltModel]:
    plan = RoundPlan.from_record(msg.content[CONFIG])
    cfg = local_config(plan.config, dict(context.node_config))
    index, hospital = hospital_data(cfg, plan.seed, dict(context.node_config))
    model = cached_model(cfg, plan.seed)
    check_fingerprints(model, plan, hospital.name)
    model.load_global_state(msg.content[ARRAYS].to_torch_state_dict())
    return plan, cfg, index, hospital, model


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
    plan, cfg, index, hospital, model = _model_for(msg, context)
    seed = int(np.random.SeedSequence([plan.seed, plan.round, index]).generate_state(1)[0])
    centring: dict = {}
    shift = None
    if plan.feature_centring:  # this hospital's mean under the incoming global model
        plain = image_sets(cfg, {"t": hospital.train}, False)["t"]
        own = site_feature_stats(model, [plain], cfg.train.eval_batch_size)
        centring = feature_stats_metrics(own)
        if plan.reference is not None:
            shift = np.asarray(plan.reference) - own.mean
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
    )
    # the server computes the anchor agreement from the uploaded prototypes: not sent
    counts = np.bincount([s.label for s in hospital.train], minlength=len(model.classes))
    metrics = {
        **centring,
        "num-examples": len(hospital.train),
        "train-loss": stats.loss,
        "train-steps": stats.steps,
        "class-counts": counts.tolist(),
        **_val_metrics(model, cfg, hospital),
    }
    log.info("hospital %s round %d: loss %.4f", hospital.name, plan.round, stats.loss)
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(trainable_state(model)),
            METRICS: metric_record(metrics, TRAIN_METRIC_KEYS),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, cfg, _, hospital, model = _model_for(msg, context)
    metrics = {"num-examples": len(hospital.val), **_val_metrics(model, cfg, hospital)}
    metrics.pop("val-n")
    content = RecordDict({METRICS: metric_record(metrics, EVALUATE_METRIC_KEYS)})
    return Message(content=content, reply_to=msg)


@app.query("feature_stats")
def feature_stats(msg: Message, context: Context) -> Message:
    """Calibration, step 1: the count and sum of this hospital's train + val features."""
    _, cfg, _, hospital, model = _model_for(msg, context)
    sets = image_sets(cfg, {"train": hospital.train, "val": hospital.val}, False)
    stats = site_feature_stats(model, list(sets.values()), cfg.train.eval_batch_size)
    metrics = metric_record(feature_stats_metrics(stats), FEATURE_STATS_KEYS)
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)


@app.query("calibration_stats")
def calibration_stats(msg: Message, context: Context) -> Message:
    """Calibration, step 2: validation sums given the server's reference mean."""
    _, cfg, _, hospital, model = _model_for(msg, context)
    reference = np.asarray(msg.content[CONFIG][REFERENCE], dtype=np.float64)
    val = image_sets(cfg, {"val": hospital.val}, False)["val"]
    sums = site_calibration_stats(model, val, cfg.train.eval_batch_size, reference)
    metrics = metric_record(val_stats_metrics(*sums), CALIBRATION_STATS_KEYS)
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)
