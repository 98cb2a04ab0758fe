"""SCAFFOLD's server side: the control c, its epoch, and which updates it has counted.

c travels with every training message (record ``control``) and is checkpointed with the
round, so a resumed server goes on from the same c. The server computes each counted
hospital's control change itself from the update it received
(:func:`savlt_model.methods.scaffold.control_delta`: option II's change does not depend on
c_i), so no control leaves a hospital.

Counted: the accepted update of a hospital that keeps state (its reply's ``state-version``
>= 0). A hospital that keeps nothing (node config ``keep-state = false``) holds c_i = 0 every
round, so leaving it out keeps c the weighted mean of what the hospitals hold. A hospital
adds its pending change only when the next training message says the server counted that
round (``control-counted``), so an update that was rejected, lost or in a skipped round
counts on neither side.

A hospital that lost a control the server counted (a crash, a restart without its state)
trains that round with c_i = 0, says so (``control-reset``) and is aggregated as usual. c
still holds the lost control, which nobody can subtract again, so the server starts a new
control epoch: c = 0, and every hospital restarts from zero in the next round (SCAFFOLD's
own start), after which c is the exact weighted mean of the hospitals' controls again.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord

from savlt_model.messages import CONTROL_COUNTED, CONTROL_EPOCH
from savlt_model.methods.base import Tensors
from savlt_model.methods.scaffold import control_delta, server_control

log = logging.getLogger(__name__)
PREFIX = "control."  # c's tensors among the server state of a checkpoint


def _epoch() -> str:
    return secrets.token_hex(8)


@dataclass
class Controls:
    """The server's SCAFFOLD state for one job."""

    c: Tensors  # by payload key, float32
    epoch: str = field(default_factory=_epoch)
    counted: dict[str, int] = field(default_factory=dict)  # node -> last round counted in c

    @classmethod
    def start(cls, payload: Tensors) -> Controls:
        """c = 0 over the payload's tensors, a new epoch, nothing counted."""
        return cls({k: torch.zeros_like(v, dtype=torch.float32) for k, v in payload.items()})

    @classmethod
    def restore(cls, tensors: Tensors, meta: dict) -> Controls:
        """From a checkpoint's server state (:meth:`saved`)."""
        c = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        return cls(c, str(meta["epoch"]), {str(n): int(r) for n, r in meta["counted"].items()})

    def saved(self) -> tuple[Tensors, dict]:
        """(tensors, JSON metadata) for the checkpoint."""
        return {PREFIX + k: v for k, v in self.c.items()}, {
            "epoch": self.epoch,
            "counted": dict(self.counted),
        }

    def tags(self, node: str) -> dict[str, int | str]:
        """The training message's control tags for ``node``."""
        return {CONTROL_EPOCH: self.epoch, CONTROL_COUNTED: self.counted.get(node, -1)}

    def record(self) -> ArrayRecord:
        return ArrayRecord(self.c)

    def restart(self, round_: int, lost: list[str]) -> None:
        """A new epoch: c = 0, nothing counted; ``lost`` said they lost a counted control."""
        log.warning(
            "round %d: node(s) %s lost a SCAFFOLD control variate the server had counted; "
            "every control restarts from zero in the next round (new control epoch)",
            round_,
            ", ".join(lost),
        )
        fresh = Controls.start(self.c)
        self.c, self.epoch, self.counted = fresh.c, fresh.epoch, fresh.counted

    def update(
        self,
        round_: int,
        sent: Tensors,
        updates: list[tuple[str, Tensors, bool]],
        shares: list[float],
        lr_sum: dict[str, float],
    ) -> None:
        """After an aggregated round: c += sum_i p_i (c_i+ - c_i) over the counted updates.

        ``updates``: (node, uploaded state, keeps state) in aggregation order; ``shares``:
        each one's p_i.
        """
        counted = [
            (node, state, p)
            for (node, state, keeps), p in zip(updates, shares, strict=True)
            if keeps
        ]
        deltas = [control_delta(sent, state, self.c, lr_sum) for _, state, _ in counted]
        self.c = server_control(self.c, deltas, [p for _, _, p in counted])
        for node, _, _ in counted:
            self.counted[node] = round_
