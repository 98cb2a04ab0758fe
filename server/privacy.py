"""Central differential privacy around :class:`SavltStrategy` (``privacy.mode``).

Flower's DP wrappers clip and noise the hospitals' updates; this module picks the wrapper
the config selects, adds the checks they lack, and states the guarantee with its
(epsilon, delta) from :mod:`server.accounting`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from savlt_model.config import Config, check_privacy
from server.accounting import privacy_spent
from server.strategy import SavltStrategy

log = logging.getLogger(__name__)


class _CheckedNoisedRound:
    """For Flower's DP wrappers around :class:`SavltStrategy`, two things they do not do.

    They clip each reply against the global arrays position by position before our checks
    run, so replies that do not line up are refused first; and they add the noise after
    :meth:`SavltStrategy.aggregate_train` checkpointed the round, so the noised aggregate,
    the one hospitals receive, is checkpointed again (else the final adapter has no noise).
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
            reason = msg.error.reason if msg.has_error() else inner.payload_mismatch(msg)
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
        if arrays is not None:
            inner.commit(arrays)
        return arrays, metrics


class _ServerFixedDP(_CheckedNoisedRound, DifferentialPrivacyServerSideFixedClipping):
    pass


class _ServerAdaptiveDP(_CheckedNoisedRound, DifferentialPrivacyServerSideAdaptiveClipping):
    pass


def privacy_statement(cfg: Config) -> str:
    """What the configured central DP does and does not guarantee, in a few honest lines."""
    p, n = cfg.privacy, cfg.fl.hospitals
    spent = privacy_spent(p, cfg.fl.rounds)
    clip = (
        f"clipped to L2 norm {p.clipping_norm:g}"
        if p.mode == "server-fixed"
        else f"clipped to an adaptive L2 norm (start {p.clipping_norm:g}, tracking the "
        f"{p.target_clipped_quantile:g} quantile of update norms, itself noised)"
    )
    return (
        f"Central DP ({p.mode}): every round each of the {n} hospitals' whole updates is {clip} "
        f"on the server, and Gaussian noise of std {p.noise_multiplier:g} x clip / {n} is added "
        f"to their uniform average. Per round this is the Gaussian mechanism with noise "
        f"multiplier {p.noise_multiplier:g} at hospital level (any change to one hospital's "
        f"data, so also to any one image). Accounted: {epsilon_line(spent)}. "
        "The server sees the clipped updates before noise (it is trusted), and the metrics "
        "sent in clear (example and class counts, losses, val accuracy, the calibration's "
        "feature and validation sums) are not covered."
    )


def epsilon_line(spent: dict) -> str:
    """One line for a :func:`server.accounting.privacy_spent` result."""
    eps = "unbounded" if spent["epsilon"] is None else f"{spent['epsilon']:.3g}"
    return (
        f"(epsilon, delta) = ({eps}, {spent['delta']:g}) after "
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
    n = cfg.fl.hospitals
    print(privacy_statement(cfg))
    if p.mode == "server-fixed":
        return _ServerFixedDP(strategy, p.noise_multiplier, p.clipping_norm, n)
    return _ServerAdaptiveDP(
        strategy, p.noise_multiplier, n, p.clipping_norm, p.target_clipped_quantile, p.clip_norm_lr
    )
