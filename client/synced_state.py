"""The global state a hospital keeps between rounds, so only each round's step travels.

The server sends a hospital that reported keeping the previous version only the payload
and the round's FedEx residual step (:mod:`server.downlink`); the hospital folds the step
into the residual totals it kept in Flower's ``Context.state``
(:func:`savlt_model.model.adapters.fold_residuals`: the server's bits exactly). A delta
for the version already kept (the server did not count the last reply: a skipped or timed
out round) is served from what is kept; one that does not apply to it (another server
session, another version, nothing kept after a restart) is refused: the hospital fails
that round, and the server, told nothing is kept, sends the full state next round. A node
config ``keep-state = false`` keeps nothing (the full state every round: less memory, more
traffic).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from savlt_model.errors import SavltError
from savlt_model.messages import STATE_BASE, STATE_SESSION, STATE_VERSION
from savlt_model.model.adapters import RESIDUAL, RESIDUAL_STEP, fold_residuals

KEPT_RESIDUALS = "savlt.residuals"  # Context.state keys
KEPT_VERSION = "savlt.version"
NOT_KEPT = -1


def keeps_state(node_config: dict) -> bool:
    """Whether this hospital keeps the global state (node config ``keep-state``)."""
    value = str(node_config.get("keep-state", "true")).lower()
    if value not in ("true", "false"):
        raise SavltError(f"node-config: keep-state must be true or false, got {value!r}")
    return value == "true"


def _forget(state: RecordDict) -> None:
    for key in (KEPT_RESIDUALS, KEPT_VERSION):
        if key in state:
            del state[key]


def synced_state(
    tensors: dict[str, torch.Tensor], config: ConfigRecord, context: Context, keep: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """(the full global state a message stands for, the version now kept or -1).

    A message without version tags (a calibration query) is a full state and leaves what is
    kept untouched.
    """
    if STATE_VERSION not in config:
        return tensors, NOT_KEPT
    state = context.state
    session, version = str(config[STATE_SESSION]), int(config[STATE_VERSION])
    payload = {k: v for k, v in tensors.items() if not k.startswith((RESIDUAL, RESIDUAL_STEP))}
    if STATE_BASE in config:
        base = int(config[STATE_BASE])
        kept = (
            dict(state[KEPT_VERSION]) if KEPT_VERSION in state else {"session": "", "version": -1}
        )
        held = state[KEPT_RESIDUALS].to_torch_state_dict() if KEPT_RESIDUALS in state else {}
        if (kept["session"], kept["version"]) == (session, version):
            residuals = held  # already kept: the server did not count its last reply
        elif (kept["session"], kept["version"]) == (session, base):
            step = {
                RESIDUAL + k[len(RESIDUAL_STEP) :]: v
                for k, v in tensors.items()
                if k.startswith(RESIDUAL_STEP)
            }
            residuals = fold_residuals(held, step)
        else:
            _forget(state)
            raise SavltError(
                f"the server sent the changes since global state version {base} (session "
                f"{session}), but this hospital keeps version {kept['version']} (session "
                f"{kept['session'] or 'none'}); it asks for the full state next round"
            )
    else:
        residuals = {k: v for k, v in tensors.items() if k.startswith(RESIDUAL)}
    if not keep:
        _forget(state)
        return {**payload, **residuals}, NOT_KEPT
    state[KEPT_RESIDUALS] = ArrayRecord(residuals)
    state[KEPT_VERSION] = ConfigRecord({"session": session, "version": version})
    return {**payload, **residuals}, version
