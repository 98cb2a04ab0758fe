"""What each hospital is sent: the whole global state, or only what changed since it synced.

The FedEx residuals are running totals, resent whole they grow every round. A hospital
that keeps its totals between rounds (:mod:`client.synced_state`) needs only the round's
step, which it folds in itself (:func:`savlt_model.model.adapters.fold_residuals`, the
same bits as the server's total). The payload (adapters, prototypes) is replaced every
round, so it always travels whole.

The server trusts nothing it has not been told: a hospital's version is the one its last
reply reported keeping, forgotten when it fails. Whoever is not known to hold the previous
version (a new or restarted hospital, a stateless one, anyone after a server restart: the
session id changes) gets the full state once. A delta names the version it applies to,
so a hospital that lost its state refuses it, fails that round and is sent the full state
in the next.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from savlt_model.messages import STATE_BASE, STATE_SESSION, STATE_VERSION
from savlt_model.model.adapters import RESIDUAL, RESIDUAL_STEP


@dataclass
class Downlink:
    """The server's side of the stateful downlink, for one server process."""

    version: int  # rounds aggregated into the current global state
    session: str = field(default_factory=lambda: secrets.token_hex(8))
    step: dict[str, torch.Tensor] | None = None  # the residual step from version - 1
    held: dict[str, int] = field(default_factory=dict)  # node -> version it reported keeping

    def advance(self, version: int, step: dict[str, torch.Tensor]) -> None:
        """A round was aggregated: ``step`` turned the previous totals into the new ones."""
        self.version, self.step = version, step

    def record(self, node: str, version: int) -> None:
        """A hospital's reply said which version it keeps (-1: none)."""
        if version < 0:
            self.held.pop(node, None)
        else:
            self.held[node] = version

    def forget(self, node: str) -> None:
        """A hospital failed: whatever it kept is unknown, so it gets the full state next."""
        self.held.pop(node, None)

    def content(
        self, node: str, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, int | str]]:
        """(tensors, config tags) for ``node``, given the full global ``state``."""
        payload = {k: v for k, v in state.items() if not k.startswith(RESIDUAL)}
        tags: dict[str, int | str] = {STATE_SESSION: self.session, STATE_VERSION: self.version}
        held = self.held.get(node)
        if held == self.version:  # already holds it (e.g. evaluated last round): nothing new
            return payload, {**tags, STATE_BASE: held}
        if held == self.version - 1 and self.step is not None:
            step = {RESIDUAL_STEP + k[len(RESIDUAL) :]: v for k, v in self.step.items()}
            return {**payload, **step}, {**tags, STATE_BASE: held}
        return dict(state), tags
