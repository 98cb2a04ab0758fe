"""The message contract between the ServerApp and the hospitals' ClientApps.

Everything that crosses the network is declared here: the keys of the round configuration
the server sends, and the only metric names a hospital may send back. A reply carries the
payload tensors and these numbers: no image, path or patient identifier. The run config a
round carries is the server's view (:func:`server_view`): every hospital-local key of
:data:`savlt_model.config.HOSPITAL_LOCAL_KEYS` at its default, so the server names no path
on a hospital's disk (docs/deploy.md lists what goes each way).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum

import numpy as np
from flwr.app import MetricRecord

from savlt_model.calibration import LOG_T_GRID, FeatureStats, ValStats
from savlt_model.config import HOSPITAL_LOCAL_KEYS, Config, config_from_dict, get_key, with_key
from savlt_model.methods import LossTerms
from savlt_model.referral import CONFIDENCE_BINS, ReferralCounts

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CONTROL = "control"  # SCAFFOLD's training messages: the server's control c (an ArrayRecord)

# Metric names a training reply may hold (lists are per class, in task.classes order).
TRAIN_METRIC_KEYS = frozenset(
    {
        "num-examples",
        "train-loss",
        "train-steps",
        "class-counts",
        "val-n",
        "val-acc_multiclass",
        "val-acc_binary",
        "feature-count",  # with fl.feature_centring: the train features' count and sum
        "feature-sum",  # under the incoming global model, for the next round's reference
        # when the plan asks (class-means): per class, the sum of its train features under
        # the incoming global model (C x d, flat), zero for a class under CLASS_SUM_MIN_IMAGES
        "class-feature-sums",
        "state-version",  # the global state version the hospital keeps (-1: none)
        "control-reset",  # SCAFFOLD: 1 if it lost a control the server had counted
    }
)
# Metric names an evaluation reply may hold: the global model on the hospital's val set.
EVALUATE_METRIC_KEYS = frozenset(
    {"num-examples", "val-acc_multiclass", "val-acc_binary", "state-version"}
)

# Hospitals that keep state (server/downlink.py, client/synced_state.py). Each training or
# evaluation message tags the global state it brings with the server process's session id
# and its version (the rounds aggregated into it); a delta also names the version it
# applies to. A reply's metric of the same name says which version the hospital now keeps.
STATE_SESSION = "state-session"
STATE_VERSION = "state-version"
STATE_BASE = "state-base"

# SCAFFOLD (server/controls.py, client/controls.py): each training message tags the control
# epoch (a new one restarts every control from zero) and the last round whose update from
# this hospital the server counted into c (-1: none); the reply says whether the hospital
# had lost a control the server counted.
CONTROL_EPOCH = "control-epoch"
CONTROL_COUNTED = "control-counted"
CONTROL_RESET = "control-reset"

# The two calibration queries after the last round (server.calibration): sums over the
# hospital's own scans under the final global model, never a scan or a single feature.
FEATURE_STATS = "query.feature_stats"  # count and sum of the train + val features
CALIBRATION_STATS = "query.calibration_stats"  # validation sums, given the reference
REFERENCE = "feature-reference"  # the config key carrying the reference mean
FEATURE_STATS_KEYS = frozenset({"feature-count", "feature-sum"})
CALIBRATION_STATS_KEYS = frozenset(
    {
        "class-counts",
        "nll-plain",
        "posterior-plain",
        "nll-recentred",
        "posterior-recentred",
        "referral-count",  # validation scans per confidence bin, per temperature (G x B)
        "referral-correct",  # of which correctly classified
    }
)


def feature_stats_metrics(stats: FeatureStats) -> dict:
    return {"feature-count": stats.count, "feature-sum": stats.total.tolist()}


def feature_stats_from(metrics, dim: int) -> FeatureStats:
    """Checked :class:`FeatureStats` from a reply; ValueError says what is wrong."""
    count, total = int(metrics["feature-count"]), _finite(metrics["feature-sum"], (dim,))
    if count < 0:
        raise ValueError(f"feature-count is {count}")
    return FeatureStats(count, total)


# A class's feature sum leaves a hospital only over at least this many of its images, so no
# single scan's feature is ever sent (its row is zeros: "no evidence" for the server).
CLASS_SUM_MIN_IMAGES = 3


def class_sums_metrics(sums: np.ndarray, counts: np.ndarray) -> dict:
    """The class sums a hospital sends: rows of classes with too few images set to zero."""
    kept = np.where((counts >= CLASS_SUM_MIN_IMAGES)[:, None], sums, 0.0)
    return {"class-feature-sums": kept.ravel().tolist()}


def class_sums_from(metrics, counts: list[int], dim: int) -> np.ndarray:
    """Checked (C, d) class sums from a reply; ValueError says what is wrong.

    Each is a sum of L2-normalised features over the class's counted images, so its norm
    is at most that count, and it is zero where the count is under the minimum.
    """
    n = np.asarray(counts, dtype=np.float64)
    sums = _finite(metrics["class-feature-sums"], (len(n) * dim,)).reshape(len(n), dim)
    norms = np.linalg.norm(sums, axis=1)
    if (norms > n * (1 + 1e-4) + 1e-6).any():
        raise ValueError("a class-feature-sums row is longer than its class count allows")
    if (norms[n < CLASS_SUM_MIN_IMAGES] > 0).any():
        raise ValueError(f"class-feature-sums for a class under {CLASS_SUM_MIN_IMAGES} images")
    return sums


def val_stats_metrics(plain: ValStats, recentred: ValStats, referral: ReferralCounts) -> dict:
    return {
        "class-counts": plain.counts.tolist(),
        "nll-plain": plain.nll.tolist(),
        "posterior-plain": plain.posterior.ravel().tolist(),
        "nll-recentred": recentred.nll.tolist(),
        "posterior-recentred": recentred.posterior.ravel().tolist(),
        "referral-count": referral.count.astype(int).ravel().tolist(),
        "referral-correct": referral.correct.astype(int).ravel().tolist(),
    }


def referral_counts_from(metrics) -> ReferralCounts:
    """Checked :class:`ReferralCounts` (G x B) from a reply; ValueError says what is wrong."""
    shape = (len(LOG_T_GRID) * CONFIDENCE_BINS,)
    count = _finite(metrics["referral-count"], shape)
    correct = _finite(metrics["referral-correct"], shape)
    if (count < 0).any() or (correct < 0).any() or (correct > count).any():
        raise ValueError("referral counts are negative or correct exceeds count")
    grid = (len(LOG_T_GRID), CONFIDENCE_BINS)
    rows = count.reshape(grid).sum(axis=1)
    if (rows != rows[0]).any():  # every temperature's row counts every validation scan once
        raise ValueError("referral-count rows hold different numbers of scans")
    return ReferralCounts(count.reshape(grid), correct.reshape(grid))


def val_stats_from(metrics, n_classes: int) -> tuple[ValStats, ValStats]:
    """Checked (plain, re-centred) :class:`ValStats` from a reply; ValueError says what."""
    g = len(LOG_T_GRID)
    counts = _finite(metrics["class-counts"], (n_classes,))
    if (counts < 0).any():
        raise ValueError("class-counts has a negative count")

    def read(kind: str) -> ValStats:
        nll = _finite(metrics[f"nll-{kind}"], (g,))
        posterior = _finite(metrics[f"posterior-{kind}"], (g * n_classes,)).reshape(g, n_classes)
        # sums over the counted scans: NLL >= 0, and each scan's posterior sums to 1
        if (nll < 0).any() or (posterior < 0).any():
            raise ValueError(f"nll-{kind} or posterior-{kind} has a negative sum")
        if not np.allclose(posterior.sum(axis=1), counts.sum(), rtol=1e-4, atol=1e-3):
            raise ValueError(f"posterior-{kind} does not add up to the class counts")
        return ValStats(nll, posterior, counts)

    return read("plain"), read("recentred")


def _finite(values, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(list(values), dtype=np.float64)
    if a.shape != shape:
        raise ValueError(f"expected {shape[0]} values, got {a.size}")
    if not np.isfinite(a).all():
        raise ValueError("non-finite values")
    return a


def server_view(cfg: Config) -> Config:
    """``cfg`` as the server sends it: every hospital-local key at its default."""
    default = Config()
    for key in HOSPITAL_LOCAL_KEYS:
        cfg = with_key(cfg, key, get_key(default, key))
    return cfg


def local_keys_set(cfg: Config) -> list[str]:
    """The hospital-local keys that ``cfg`` sets to anything but their default."""
    default = Config()
    return [k for k in HOSPITAL_LOCAL_KEYS if get_key(cfg, k) != get_key(default, k)]


def run_config_hash(cfg: Config) -> str:
    """SHA-256 of the server's view of a run config (canonical JSON): what a hospital's
    policy pins when it approves one exact study (client/policy.py)."""
    text = json.dumps(server_view(cfg).to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


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
    feature_centring: bool = False  # hospitals re-centre their features (and report stats)
    reference: list[float] | None = None  # the federation's mean feature, once reported
    class_means: bool = False  # hospitals send their class feature sums (the method's ask)

    def to_record(self) -> dict:
        return {
            "savlt-config": json.dumps(server_view(self.config).to_dict()),
            "method": self.method,
            "seed": self.seed,
            "global-round": self.round,
            "local-steps": self.local_steps,
            "total-steps": self.total_steps,
            "backbone-fingerprint": self.backbone_fingerprint,
            "anchor-fingerprint": self.anchor_fingerprint,
            "prox-mu": self.loss_terms.prox_mu,
            "anchor-weight": self.loss_terms.anchor_weight,
            "feature-centring": self.feature_centring,
            "class-means": self.class_means,
            **({} if self.reference is None else {REFERENCE: list(self.reference)}),
        }

    @classmethod
    def from_record(cls, record) -> RoundPlan:
        unknown = sorted(set(record) - PLAN_KEYS)
        if unknown:  # a field no policy could have approved
            raise ValueError(f"round plan fields {unknown} are unknown (known: PLAN_KEYS)")
        return cls(
            # the hospital-local keys are the receiving hospital's to fill in and check
            config=config_from_dict(json.loads(str(record["savlt-config"])), local=False),
            method=str(record["method"]),
            seed=int(record["seed"]),
            round=int(record["global-round"]),
            local_steps=int(record["local-steps"]),
            total_steps=int(record["total-steps"]),
            backbone_fingerprint=str(record["backbone-fingerprint"]),
            anchor_fingerprint=str(record["anchor-fingerprint"]),
            loss_terms=LossTerms(float(record["prox-mu"]), float(record["anchor-weight"])),
            feature_centring=bool(record["feature-centring"]),
            reference=[float(v) for v in record[REFERENCE]] if REFERENCE in record else None,
            class_means=bool(record["class-means"]),
        )

    @property
    def start_step(self) -> int:
        return (self.round - 1) * self.local_steps


class Reason(str, Enum):
    """Why a hospital refused a message: the only words a refusal carries off its site.

    A refusal's ``Error.reason`` is ``"<code> run <run id>"`` and nothing else; the full
    text (which may name local paths or files) stays in the hospital's own log and audit
    log (client/guard.py). docs/security.md lists what each code means.
    """

    LOCAL_KEY = "local-key"  # the plan sets a hospital-local key (a path on its disk)
    PLAN_INVALID = "plan-invalid"  # malformed or unknown plan fields, bad config values
    POLICY = "policy"  # outside the hospital's run policy
    FINGERPRINT = "fingerprint"  # backbone or text anchors differ from the plan's
    MODEL_SOURCE = "model-source"  # the plan names weights the policy does not allow fetching
    STATE = "state-mismatch"  # a delta for a global state version it does not keep
    QUERY_REPEATED = "query-repeated"  # a query already answered for this run and model
    DATA = "data-error"  # its own data could not be read as the plan needs
    INTERNAL = "internal-error"  # anything else


REFUSAL_CODE = 4601  # Error.code of every refusal a hospital sends


def refusal_reason(run_id: int, reason: Reason) -> str:
    """The whole text of a refusal that leaves a hospital."""
    return f"{reason.value} run {run_id}"


def reason_code(text: str | None) -> str:
    """The reason code in a reply's Error.reason; anything else (a hostile or foreign
    hospital's free text, Flower's own errors) is stored as ``unknown``, never as sent."""
    code = str(text or "").split(" run ", 1)[0]
    return code if code in {r.value for r in Reason} else "unknown"


# Every key a round plan or query config may carry; a hospital refuses any other.
PLAN_KEYS = frozenset(
    {
        "savlt-config",
        "method",
        "seed",
        "global-round",
        "local-steps",
        "total-steps",
        "backbone-fingerprint",
        "anchor-fingerprint",
        "prox-mu",
        "anchor-weight",
        "feature-centring",
        "class-means",
        REFERENCE,
        STATE_SESSION,
        STATE_VERSION,
        STATE_BASE,
        CONTROL_EPOCH,
        CONTROL_COUNTED,
        "server-round",  # Flower's FedAvg adds it
        "clipping_norm",  # Flower's client-side DP (flwr.supercore.differential_privacy)
    }
)
