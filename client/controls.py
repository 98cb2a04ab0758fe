"""SCAFFOLD's hospital side: its control variate c_i, kept in Flower's ``Context.state``.

Each training message of a SCAFFOLD round brings the server's c (record ``control``), the
control epoch and the last round whose update from this hospital the server counted
(:mod:`server.controls`). The hospital keeps c_i and its pending change c_i+ - c_i of the
round it last trained in, and adds that change only once a message says the server counted
that round, so both sides always count the same updates. A hospital that keeps no state
(node config ``keep-state = false``) trains with c_i = 0 every round (the server counts
none of its changes); one that lost a control the server counted (a crash or a restart
without its state) trains this round with c_i = 0, says so in its log and in its reply
(``control-reset``), and keeps nothing until the server has started a new epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from savlt_model.errors import SavltError
from savlt_model.messages import CONTROL_COUNTED, CONTROL_EPOCH
from savlt_model.methods.base import Tensors
from savlt_model.methods.scaffold import control_delta

log = logging.getLogger(__name__)
KEPT_CONTROL = "savlt.control"  # Context.state: c_i ("own.<key>") and the pending change
KEPT_CONTROL_TAGS = "savlt.control-tags"  # its epoch and the round of the pending change
OWN, PENDING = "own.", "pending."


@dataclass
class RoundControl:
    """What a SCAFFOLD round trains with."""

    epoch: str
    server: Tensors  # c
    own: Tensors  # c_i
    reset: bool  # lost a control the server had counted

    @property
    def correction(self) -> Tensors:
        """c - c_i, what every local step subtracts at its learning rate."""
        return {k: self.server[k] - self.own[k] for k in self.server}


def _forget(context: Context) -> None:
    for key in (KEPT_CONTROL, KEPT_CONTROL_TAGS):
        if key in context.state:
            del context.state[key]


def round_control(
    config: ConfigRecord, server: Tensors, context: Context, keep: bool, name: str
) -> RoundControl:
    """c and c_i for this round, from the message's ``config`` tags and the server's c, and
    what this hospital kept."""
    try:
        epoch, counted = str(config[CONTROL_EPOCH]), int(config[CONTROL_COUNTED])
    except (KeyError, TypeError, ValueError) as exc:
        raise SavltError(f"SCAFFOLD round without its control tags: {exc}") from exc
    state = context.state
    tags = dict(state[KEPT_CONTROL_TAGS]) if KEPT_CONTROL_TAGS in state else None
    if not keep or tags is None or tags["epoch"] != epoch:
        zero = {k: torch.zeros_like(v) for k, v in server.items()}
        reset = counted >= 0  # the server counted an update of ours whose control is gone
        if reset:
            log.warning(
                "hospital %s lost its SCAFFOLD control variate (restarted without its state, "
                "or keep-state false): it resets it to zero and trains this round with c_i = 0",
                name,
            )
        elif not keep:
            log.info("hospital %s keeps no state: its SCAFFOLD control variate is zero", name)
        return RoundControl(epoch, server, zero, reset)
    kept = state[KEPT_CONTROL].to_torch_state_dict()
    own = {k[len(OWN) :]: v for k, v in kept.items() if k.startswith(OWN)}
    if counted >= 0 and int(tags["pending-round"]) == counted:
        own = {k: (v.double() + kept[PENDING + k].double()).float() for k, v in own.items()}
    if sorted(own) != sorted(server):
        raise SavltError("the kept SCAFFOLD control does not match the server's tensors")
    return RoundControl(epoch, server, own, reset=False)


def keep_control(
    context: Context,
    control: RoundControl,
    start: Tensors,
    trained: Tensors,
    lr_sum: dict[str, float],
    round_: int,
    keep: bool,
) -> None:
    """Keep c_i and this round's pending change (x - y_i) / L - c, unless this hospital
    keeps no state or has just lost its control (it waits for the server's new epoch)."""
    if not keep or control.reset:
        _forget(context)
        return
    delta = control_delta(start, trained, control.server, lr_sum)
    tensors = {OWN + k: v for k, v in control.own.items()}
    tensors.update({PENDING + k: v for k, v in delta.items()})  # float64: the server's bits
    context.state[KEPT_CONTROL] = ArrayRecord(tensors)
    context.state[KEPT_CONTROL_TAGS] = ConfigRecord(
        {"epoch": control.epoch, "pending-round": round_}
    )
