"""Central differential privacy around :class:`SavltStrategy` (``privacy.mode``).

Flower's DP wrappers clip (server modes) and noise the hospitals' updates; in
``client-fixed`` each hospital clips its own (:mod:`client.privacy`) and the server only
checks the bound and adds the noise. This module picks the wrapper the config selects, adds
the checks they lack, and states the guarantee with its (epsilon, delta) from
:mod:`server.accounting`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from savlt_model.config import Config, check_privacy
from savlt_model.messages import ARRAYS, reason_code
from server.accounting import epsilon_text, privacy_spent
from server.aggregation import update_norm
from server.strategy import SavltStrategy

log = logging.getLogger(__name__)
# float32 rounding when a hospital adds its clipped update back onto the global payload
CLIP_TOLERANCE = 1e-4  # relative


class _CheckedNoisedRound:
    """For Flower's DP wrappers around :class:`SavltStrategy`, two things they do not do.

    They clip (or, client-side, expect clipped) each reply against the global arrays
    position by position before our checks run, so replies that do not line up are refused
    first (:meth:`refusal`); and they add the noise after
    :meth:`SavltStrategy.aggregate_train`, which under DP stores nothing
    (``noised_later``): only the noised aggregate, the one hospitals receive, is written
    to disk (:meth:`SavltStrategy.commit`), and only when it is finite.
    """

    strategy: SavltStrategy
    num_sampled_clients: int

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        inner = self.strategy
        round_ = inner.offset + server_round
        usable = []
        for msg in replies:
            node = str(msg.metadata.src_node_id)
            reason = reason_code(msg.error.reason) if msg.has_error() else self.refusal(msg)
            if reason:
                inner._event(round_, node, "failed" if msg.has_error() else "rejected", reason)
            else:
                usable.append(msg)
        if len(usable) < self.num_sampled_clients:
            log.error("round %d: central DP needs every hospital's update; round skipped", round_)
            inner.history.events.append(
                {"round": round_, "node": "-", "event": "skipped", "reason": "too few updates"}
            )
            return None, None
        arrays, metrics = super().aggregate_train(server_round, usable)  # type: ignore[misc]
        if arrays is not None and not inner.commit(arrays):
            return None, None  # a non-finite noised aggregate is neither stored nor sent
        return arrays, metrics

    def refusal(self, msg: Message) -> str | None:
        """Why a reply may not go into the DP average, or None."""
        return self.strategy.payload_mismatch(msg)


class _ServerFixedDP(_CheckedNoisedRound, DifferentialPrivacyServerSideFixedClipping):
    pass


class _ClientFixedDP(_CheckedNoisedRound, DifferentialPrivacyClientSideFixedClipping):
    """The hospitals clip; the noise is calibrated to their clip, so an update above it
    (a ClientApp without the clipping mod, or a hostile one) is refused, not averaged in."""

    clipping_norm: float

    def refusal(self, msg: Message) -> str | None:
        reason = super().refusal(msg)
        if reason:
            return reason
        norm = update_norm(msg.content[ARRAYS].to_torch_state_dict(), self.strategy.sent)
        if norm > self.clipping_norm * (1 + CLIP_TOLERANCE):
            return (
                f"update norm {norm:.4g} is above privacy.clipping_norm {self.clipping_norm:g}: "
                "the hospital did not clip (its ClientApp needs client.privacy.clipping_mod)"
            )
        return None


def privacy_statement(cfg: Config) -> str:
    """What the configured central DP does and does not guarantee, in a few honest lines."""
    p, n = cfg.privacy, cfg.fl.hospitals
    spent = privacy_spent(p, cfg.fl.rounds)
    if p.mode == "client-fixed":
        clip = (
            f"clipped to L2 norm {p.clipping_norm:g} by the hospital itself before upload "
            "(Flower's fixedclipping_mod; the server refuses an update above it)"
        )
        seen = (
            "A hospital running the mod never sends its unclipped update (an update above the "
            "norm is refused, not averaged in), but the server does see each clipped update "
            "before the noise (it is trusted to add it)"
        )
    else:
        clip = f"clipped to L2 norm {p.clipping_norm:g} on the server"
        seen = "The server sees the raw updates and the clipped ones before noise (it is trusted)"
    return (
        f"Central DP ({p.mode}): every round each of the {n} hospitals' whole updates is {clip}, "
        f"and the server adds Gaussian noise of std {p.noise_multiplier:g} x clip / {n} to their "
        f"uniform average. Per round this is the Gaussian mechanism with noise multiplier "
        f"{p.noise_multiplier:g} at hospital level for adding or removing one hospital (and "
        f"{p.noise_multiplier / 2:g} for replacing one: any change to its data). "
        f"Accounted: {epsilon_line(spent)}. {seen}; the metrics sent in clear (example and "
        "class counts, losses, val accuracy, the calibration's feature and validation sums) "
        "are not covered."
    )


def epsilon_line(spent: dict) -> str:
    """One line for a :func:`server.accounting.privacy_spent` result."""
    return (
        f"(epsilon, delta) = ({epsilon_text(spent)}, {spent['delta']:g}) after "
        f"{spent['rounds']} rounds at noise multiplier {spent['noise_multiplier']:g} "
        f"({spent['accountant']})"
    )


def with_privacy(strategy: SavltStrategy, cfg: Config, method: str) -> Strategy:
    """Wrap ``strategy`` in the central DP that ``cfg.privacy`` selects (or return it as is)."""
    p = cfg.privacy
    if p.mode == "none":
        return strategy
    check_privacy(cfg, [method])
    strategy.uniform_weights = True
    strategy.noised_later = True
    n = cfg.fl.hospitals
    print(privacy_statement(cfg))
    if p.mode == "server-fixed":
        return _ServerFixedDP(strategy, p.noise_multiplier, p.clipping_norm, n)
    return _ClientFixedDP(strategy, p.noise_multiplier, p.clipping_norm, n)
