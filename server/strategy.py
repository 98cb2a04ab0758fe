"""The SAVLT Flower strategy: FedAvg's sampling, with SAVLT's validation and aggregation.

One class serves every registered federated method (:mod:`savlt_model.methods`):
a method only changes the client weights and the loss terms sent in each round's plan.
Every update is checked before it can be averaged, and every completed round is
checkpointed atomically so that a restarted server resumes from it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import reduce
from operator import add
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from savlt_model.calibration import FeatureStats
from savlt_model.checkpoint import load_adapter, save_adapter
from savlt_model.messages import (
    ARRAYS,
    CONFIG,
    CONTROL,
    CONTROL_RESET,
    METRICS,
    STATE_BASE,
    STATE_VERSION,
    RoundPlan,
    class_sums_from,
    feature_stats_from,
    reason_code,
)
from savlt_model.methods import get_method
from savlt_model.metrics import upgrade_keys
from savlt_model.model.adapters import RESIDUAL
from savlt_model.model.backbone import fingerprint_tensors
from savlt_model.train import lr_sums
from server.aggregation import PROTOTYPES, ClientUpdate, aggregate, check_update, server_step
from server.controls import Controls
from server.downlink import Downlink

log = logging.getLogger(__name__)


@dataclass
class RoundLog:
    """Per-round history kept in the checkpoint: metrics, accepted and refused hospitals."""

    rows: list[dict] = field(default_factory=list)  # one per aggregated round
    events: list[dict] = field(default_factory=list)  # failed / rejected hospitals, skipped rounds
    evals: list[dict] = field(default_factory=list)  # server-side scores per round and centre
    # the final model's calibrations, fitted after the last round (server.calibration):
    # {"inductive": ..., "recentred": ...} as calibration_to_dict, None until then
    calibration: dict | None = None
    # fl.feature_centring: the mean of the hospitals' train features reported in the last
    # round, onto which every hospital re-centres its features in the next round
    reference: list[float] | None = None
    # what the method's server carries between rounds, by name: FedAvgM's / FedAdam's
    # moments, SCAFFOLD's c (server/controls.py); tensors of the checkpoint, not in its JSON
    server_state: dict[str, torch.Tensor] = field(default_factory=dict)
    controls: dict | None = None  # SCAFFOLD: its control epoch and counted rounds


def array_bytes(record: ArrayRecord) -> int:
    """Serialised size of an ArrayRecord's tensors: what crosses the network."""
    return sum(len(array.data) for array in record.values())


class SavltStrategy(FedAvg):
    """Aggregation of the SAVLT payload by the round plan's registered method."""

    def __init__(
        self,
        plan_for: Callable[[int], RoundPlan],
        scalings: dict[str, float],
        anchors: torch.Tensor,
        checkpoint: Path,
        start_round: int,
        history: RoundLog,
        num_hospitals: int,
        min_hospitals: int,
        client_eval: bool,
        fraction_train: float = 1.0,
        registered: dict[str, int] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=1.0 if client_eval else 0.0,
            min_train_nodes=min_hospitals,
            min_evaluate_nodes=min_hospitals if client_eval else 0,
            min_available_nodes=num_hospitals,
            arrayrecord_key=ARRAYS,
            configrecord_key=CONFIG,
        )
        self.plan_for = plan_for
        self.scalings = scalings
        self.anchors = anchors  # the server's own frozen T: agreement is computed, not reported
        self.checkpoint = checkpoint
        self.offset = start_round  # rounds completed before this process started
        self.history = history
        self.min_hospitals = min_hospitals
        self.sent: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}  # the last aggregate, as checkpointed
        self.uniform_weights = False  # central DP: its noise assumes a uniform average
        self.noised_later = False  # central DP: only the noised aggregate is stored (commit)
        # node id -> dataset size the operator registered: a FedAvg weight uses at most it
        self.registered = dict(registered or {})
        self.downlink = Downlink(start_round)  # the full state, or a delta, per hospital
        self.upload_bytes = 0
        self.download_bytes = 0  # the largest message of the round
        self.deltas = 0  # hospitals sent only the round's step in the last train round
        self.residual_layout: dict[str, int] = {"factorised": 0, "dense": 0}  # last one logged
        self.method = get_method(plan_for(start_round + 1).method)
        self.controls = (  # SCAFFOLD; made at the first round from the payload's shapes
            Controls.restore(history.server_state, history.controls)
            if self.method.controls and history.controls is not None
            else None
        )

    def _plan_record(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        plan = self.plan_for(self.offset + server_round)
        ref = self.history.reference
        if plan.feature_centring and ref is not None:
            plan = dataclasses.replace(plan, reference=ref)
        record = ConfigRecord(dict(config))
        record.update(plan.to_record())
        return record

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays.to_torch_state_dict()
        if self.method.controls and self.controls is None:
            self.controls = Controls.start(
                {k: v for k, v in self.sent.items() if not k.startswith(RESIDUAL)}
            )
        messages = super().configure_train(
            server_round, arrays, self._plan_record(server_round, config), grid
        )
        messages = self._per_hospital(messages, self.sent, self.controls)
        self.download_bytes = max((array_bytes(m.content[ARRAYS]) for m in messages), default=0)
        self.deltas = sum(STATE_BASE in m.content[CONFIG] for m in messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_evaluate(
            server_round, arrays, self._plan_record(server_round, config), grid
        )
        return self._per_hospital(messages, arrays.to_torch_state_dict())

    def _per_hospital(
        self,
        messages: Iterable[Message],
        state: dict[str, torch.Tensor],
        controls: Controls | None = None,
    ) -> list[Message]:
        """FedAvg's messages (one content for all) with each hospital's own content: the full
        ``state`` or only what it lacks (:class:`server.downlink.Downlink`), and with
        ``controls`` (SCAFFOLD training) the server's c and the hospital's control tags."""
        out, records = [], {}
        extra = {} if controls is None else {CONTROL: controls.record()}
        for msg in messages:
            node = msg.metadata.dst_node_id
            tensors, tags = self.downlink.content(str(node), state)
            kind = tuple(sorted(tensors))  # at most three variants: build each record once
            if kind not in records:
                records[kind] = ArrayRecord(tensors)
            if controls is not None:
                tags = {**tags, **controls.tags(str(node))}
            config = ConfigRecord({**dict(msg.content[CONFIG]), **tags})
            content = RecordDict({ARRAYS: records[kind], CONFIG: config, **extra})
            out.append(
                Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type)
            )
        return out

    def _note_held(self, msg: Message) -> None:
        """What a reply says the hospital keeps; a reply without it keeps nothing known."""
        node = str(msg.metadata.src_node_id)
        try:
            self.downlink.record(node, int(msg.content[METRICS][STATE_VERSION]))
        except (KeyError, TypeError, ValueError):
            self.downlink.forget(node)

    def _event(self, round_: int, node: str, kind: str, reason: str) -> None:
        log.warning("round %d: %s update from node %s: %s", round_, kind, node, reason)
        self.history.events.append({"round": round_, "node": node, "event": kind, "reason": reason})
        if kind in ("failed", "eval-failed"):
            self.downlink.forget(node)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_ = self.offset + server_round
        plan = self.plan_for(round_)
        replies = list(replies)
        errors = [m for m in replies if m.has_error()]
        valid = [m for m in replies if not m.has_error()]
        log.info("round %d: %d replies, %d failures", round_, len(valid), len(errors))
        for msg in errors:  # only a reason code is kept, never a hospital's free text
            self._event(
                round_, str(msg.metadata.src_node_id), "failed", reason_code(msg.error.reason)
            )
        updates: list[ClientUpdate] = []
        losses: list[float] = []
        features: list[FeatureStats] = []
        keeps: dict[str, bool] = {}  # SCAFFOLD: whose control update may count
        lost: list[str] = []  # SCAFFOLD: who lost a control the server had counted
        dim = self.sent[PROTOTYPES].shape[1]
        for msg in valid:
            node = str(msg.metadata.src_node_id)
            self._note_held(msg)
            try:
                record, metrics = msg.content[ARRAYS], msg.content[METRICS]
                if self.controls is not None:
                    keeps[node] = int(metrics[STATE_VERSION]) >= 0
                    if int(metrics[CONTROL_RESET]):
                        lost.append(node)
                counts = [int(v) for v in metrics["class-counts"]]
                update = ClientUpdate(
                    node=node,
                    state=record.to_torch_state_dict(),
                    num_examples=int(metrics["num-examples"]),
                    class_counts=counts,
                    class_sums=class_sums_from(metrics, counts, dim) if plan.class_means else None,
                )
                loss = float(metrics["train-loss"])
                stats = feature_stats_from(metrics, dim) if plan.feature_centring else None
            except (KeyError, TypeError, ValueError) as exc:
                self._event(round_, node, "rejected", f"malformed reply: {exc}")
                continue
            fl = plan.config.fl
            reason = check_update(update, self.sent, fl.max_update_norm, fl.lora_aggregation)
            if reason:
                self._event(round_, node, "rejected", reason)
                continue
            if node in self.registered:  # a claim above the registered size counts as it
                update.num_examples = min(update.num_examples, self.registered[node])
            self.upload_bytes = max(self.upload_bytes, array_bytes(record))
            updates.append(update)
            losses.append(loss)
            if stats is not None:
                features.append(stats)
        if lost:  # whether or not the round aggregates: c holds what nobody can subtract
            self._restart_controls(round_, lost)
        if len(updates) < self.min_hospitals:
            log.error(
                "round %d: only %d usable updates (minimum %d); the global model is unchanged",
                round_,
                len(updates),
                self.min_hospitals,
            )
            self.history.events.append(
                {"round": round_, "node": "-", "event": "skipped", "reason": "too few updates"}
            )
            return None, None
        # Replies arrive in any order and node ids are random: sort by content so that the
        # float sums (and thus a resumed or repeated run) are bit-for-bit reproducible.
        order = sorted(
            range(len(updates)), key=lambda i: fingerprint_tensors(updates[i].state.items())
        )
        updates, losses = [updates[i] for i in order], [losses[i] for i in order]
        if self.uniform_weights:
            updates = [dataclasses.replace(u, num_examples=1) for u in updates]
        cfg = plan.config
        state, step, report = aggregate(
            updates,
            self.sent,
            plan.method,
            cfg,
            self.scalings,
            self.anchors,
        )
        moments: dict[str, torch.Tensor] = {}
        if self.method.server_step is not None:  # FedAvgM, FedAdam: a step from the aggregate
            state, step, moments = server_step(
                self.sent, state, step, plan.method, cfg, self.history.server_state
            )
        if not all(bool(torch.isfinite(t).all()) for t in state.values()):
            log.error(
                "round %d: the aggregate is not finite; the global model is unchanged", round_
            )
            self.history.events.append(
                {"round": round_, "node": "-", "event": "skipped", "reason": "non-finite aggregate"}
            )
            return None, None
        if report["residual_layout"] != self.residual_layout:  # per layer: the smaller form
            self.residual_layout = report["residual_layout"]
            log.info(
                "round %d: FedEx residuals go as low-rank factors for %d LoRA layers, dense for %d",
                round_,
                self.residual_layout["factorised"],
                self.residual_layout["dense"],
            )
        total = sum(u.num_examples for u in updates)
        fedavg_share = [u.num_examples / total for u in updates]
        row = {
            "round": round_,
            "hospitals": len(updates),
            "train-loss": sum(
                loss * u.num_examples for loss, u in zip(losses, updates, strict=True)
            )
            / total,
            "lora-naive-rel-error": report["lora_naive_rel_error"],
            "upload-bytes": self.upload_bytes,
            "download-bytes": self.download_bytes,
            "downlink-deltas": self.deltas,
            # how far the method's weights moved from FedAvg's n_k / n (total variation, 0..1)
            "weight-shift": 0.5
            * sum(abs(w - f) for w, f in zip(report["weights"], fedavg_share, strict=True)),
            "weights": report["weights"],
            "fedavg-weights": fedavg_share,
            "agreement": report["agreement"],
            # per hospital and class: what the prototype rows were weighted by, the class
            # counts they came with and, when sent, the class sums' agreement
            "prototype-weights": report["prototype_weights"],
            "class-counts": [u.class_counts for u in updates],
        }
        if report["class_agreement"] is not None:
            row["class-agreement"] = report["class_agreement"]
        self.history.rows.append(row)
        if self.method.server_step is not None:
            self.history.server_state = moments
        if self.controls is not None and not lost:
            self._count_controls(round_, plan, updates, keeps, report["weights"])
        if features:  # order-free integer count; the float sum in content order (see above)
            total = reduce(add, (features[i] for i in order))
            self.history.reference = total.mean.tolist()
        self.downlink.advance(round_, step)
        if not self.noised_later:  # under DP, commit stores the noised aggregate instead
            self.state = state
            save_checkpoint(self.checkpoint, state, round_, self.history)
        return ArrayRecord(state), MetricRecord(
            {k: v for k, v in row.items() if isinstance(v, (int, float))}
        )

    def _count_controls(
        self,
        round_: int,
        plan: RoundPlan,
        updates: list[ClientUpdate],
        keeps: dict[str, bool],
        weights: list[float],
    ) -> None:
        """SCAFFOLD after an aggregated round: c from the counted updates, p_i = the FedAvg
        share x the share of hospitals in the round (server/controls.py); kept in the
        history, so the round's checkpoint holds it."""
        assert self.controls is not None
        payload = sorted(k for k in self.sent if not k.startswith(RESIDUAL))
        lr = lr_sums(plan.config, payload, plan.start_step, plan.local_steps, plan.total_steps)
        present = len(updates) / plan.config.fl.hospitals
        self.controls.update(
            round_,
            self.sent,
            [(u.node, u.state, keeps[u.node]) for u in updates],
            [w * present for w in weights],
            lr,
        )
        self.history.server_state, self.history.controls = self.controls.saved()

    def _restart_controls(self, round_: int, lost: list[str]) -> None:
        """SCAFFOLD: hospitals lost controls the server counted; a new control epoch."""
        assert self.controls is not None
        self.controls.restart(round_, lost)
        self.history.server_state, self.history.controls = self.controls.saved()
        for node in lost:
            self.history.events.append(
                {
                    "round": round_,
                    "node": node,
                    "event": "control-reset",
                    "reason": "lost its control variate; new control epoch",
                }
            )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Hospitals' scores of the global model on their val splits, kept in the round's row.

        In a deployment the server holds no images: these are the only quality numbers.
        """
        round_ = self.offset + server_round
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                node = str(msg.metadata.src_node_id)
                self._event(round_, node, "eval-failed", reason_code(msg.error.reason))
            else:
                self._note_held(msg)
        metrics = super().aggregate_evaluate(server_round, replies)
        row = self.history.rows[-1] if self.history.rows else {}
        if metrics is not None and row.get("round") == round_:
            scores = {k: v for k, v in metrics.items() if k not in ("num-examples", STATE_VERSION)}
            row.update({f"hospitals-{k}": float(v) for k, v in scores.items()})
            save_checkpoint(self.checkpoint, self.state, round_, self.history)
        return metrics

    def commit(self, arrays: ArrayRecord) -> bool:
        """Checkpoint ``arrays`` as this round's global state (a DP wrapper noised it);
        False, storing nothing, when it is not finite."""
        state = arrays.to_torch_state_dict()
        if not all(bool(torch.isfinite(t).all()) for t in state.values()):
            self.history.events.append(
                {
                    "round": self.history.rows[-1]["round"],
                    "node": "-",
                    "event": "skipped",
                    "reason": "non-finite aggregate",
                }
            )
            return False
        self.state = state
        save_checkpoint(self.checkpoint, self.state, self.history.rows[-1]["round"], self.history)
        return True

    def payload_mismatch(self, msg: Message) -> str | None:
        """Why a reply's tensors do not line up with the global ones (DP clips them by position)."""
        record = msg.content.array_records.get(ARRAYS)
        if record is None:
            return "malformed reply: no payload tensors"
        got = [(k, tuple(a.shape)) for k, a in record.items()]
        if got != [(k, tuple(t.shape)) for k, t in self.sent.items()]:
            return "payload names, order or shapes differ from the global adapter's"
        return None


SERVER_STATE = "server-state."  # the history's server state among a checkpoint's tensors


def save_checkpoint(
    path: Path, state: dict[str, torch.Tensor], round_: int, history: RoundLog
) -> None:
    """Global state + history in one atomic file: a crash leaves the previous round intact."""
    meta = {f.name: getattr(history, f.name) for f in dataclasses.fields(history)}
    carried = {SERVER_STATE + k: v for k, v in meta.pop("server_state").items()}
    save_adapter(path, {**state, **carried}, {"round": round_, **meta})


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], int, RoundLog] | None:
    if not path.is_file():
        return None
    tensors, meta = load_adapter(path)
    evals = [upgrade_keys(e) for e in meta["evals"]]  # a checkpoint from before a rename
    state = {k: v for k, v in tensors.items() if not k.startswith(SERVER_STATE)}
    carried = {k[len(SERVER_STATE) :]: v for k, v in tensors.items() if k.startswith(SERVER_STATE)}
    history = RoundLog(
        meta["rows"],
        meta["events"],
        evals,
        meta.get("calibration"),
        meta.get("reference"),
        carried,
        meta.get("controls"),
    )
    return state, int(meta["round"]), history
