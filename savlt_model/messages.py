"""The message contract between the ServerApp and the hospitals' ClientApps.

Everything that crosses the network is declared here: the keys of the round configuration
the server sends, and the only metric names a hospital may send back. A reply carries the
payload tensors and these numbers: no image, path or patient identifier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import MetricRecord

from savlt_model.config import Config, config_from_dict
from savlt_model.methods import LossTerms

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Metric names a training reply may hold (lists are per class, in task.classes order).
TRAIN_METRIC_KEYS = frozenset(
    {
        "num-examples",
        "train-loss",
        "train-steps",
        "class-counts",
        "val-n",
        "val-acc_5class",
        "val-acc_binary",
    }
)
# Metric names an evaluation reply may hold: the global model on the hospital's val set.
EVALUATE_METRIC_KEYS = frozenset({"num-examples", "val-acc_5class", "val-acc_binary"})


def metric_record(metrics: dict, declared: frozenset[str]) -> MetricRecord:
    """The only way a hospital builds its reply metrics: undeclared names never leave it."""
    undeclared = sorted(set(metrics) - declared)
    if undeclared:
        raise ValueError(f"metrics {undeclared} are not declared in savlt_model.messages")
    return MetricRecord(metrics)


@dataclass
class RoundPlan:
    """What the server tells every hospital about this round (one ConfigRecord)."""

    config: Config
    method: str
    seed: int
    round: int  # absolute round number, 1-based (survives a resume)
    local_steps: int
    total_steps: int  # the cosine schedule spans every round's local steps
    backbone_fingerprint: str
    anchor_fingerprint: str
    loss_terms: LossTerms  # what the method adds to the hospital's loss (from its registry entry)

    def to_record(self) -> dict:
        return {
            "savlt-config": json.dumps(self.config.to_dict()),
            "method": self.method,
            "seed": self.seed,
            "global-round": self.round,
            "local-steps": self.local_steps,
            "total-steps": self.total_steps,
            "backbone-fingerprint": self.backbone_fingerprint,
            "anchor-fingerprint": self.anchor_fingerprint,
            "prox-mu": self.loss_terms.prox_mu,
            "anchor-weight": self.loss_terms.anchor_weight,
        }

    @classmethod
    def from_record(cls, record) -> RoundPlan:
        return cls(
            config=config_from_dict(json.loads(str(record["savlt-config"]))),
            method=str(record["method"]),
            seed=int(record["seed"]),
            round=int(record["global-round"]),
            local_steps=int(record["local-steps"]),
            total_steps=int(record["total-steps"]),
            backbone_fingerprint=str(record["backbone-fingerprint"]),
            anchor_fingerprint=str(record["anchor-fingerprint"]),
            loss_terms=LossTerms(float(record["prox-mu"]), float(record["anchor-weight"])),
        )

    @property
    def start_step(self) -> int:
        return (self.round - 1) * self.local_steps
