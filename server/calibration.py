"""Label-free calibration of a federated model, computed where the images are.

After the last round the server asks every hospital for sums over its own scans under the
final global model, in two queries (the message contract is :mod:`savlt_model.messages`):

1. ``query.feature_stats``: the count and sum of its train + val features. Their total is
   the training reference mean that every scored centre is re-centred onto;
2. ``query.calibration_stats`` (with that reference): its validation NLL and posterior sums
   at every temperature of the grid, as scored and re-centred on its own mean, and its
   referral counts (validation scans and correct ones per confidence bin, per temperature).

The server adds them and fits temperature and class bias
(:func:`savlt_model.calibration.fit_calibrations`), the same fit the simulation's baselines
make from the same sums computed locally. No scan, feature or label leaves a hospital.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import reduce
from operator import add

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from savlt_model.calibration import CalibrationSums
from savlt_model.messages import (
    ARRAYS,
    CALIBRATION_STATS,
    CONFIG,
    FEATURE_STATS,
    METRICS,
    REFERENCE,
    feature_stats_from,
    reason_code,
    referral_counts_from,
    val_stats_from,
)

log = logging.getLogger(__name__)
# (node, event, reason) for the job's event log
EventSink = Callable[[str, str, str], None]


def _ask(
    grid: Grid, message_type: str, content: RecordDict, timeout: float, event: EventSink
) -> list[Message]:
    """Send ``content`` to every connected hospital; the replies that came back without error."""
    messages = [
        Message(content=content, dst_node_id=node, message_type=message_type)
        for node in grid.get_node_ids()
    ]
    replies = []
    for msg in grid.send_and_receive(messages, timeout=timeout):
        if msg.has_error():
            event(
                str(msg.metadata.src_node_id), "calibration-failed", reason_code(msg.error.reason)
            )
        else:
            replies.append(msg)
    return replies


def federated_calibration_sums(
    grid: Grid,
    state: dict[str, torch.Tensor],
    plan: dict,
    dim: int,
    n_classes: int,
    timeout: float,
    event: EventSink,
) -> CalibrationSums | None:
    """The hospitals' calibration sums for the global ``state``, or None when no hospital
    could give validation sums (the model is then reported uncalibrated).

    ``plan`` is the last round's plan record (it lets a hospital rebuild and check the
    model); ``event`` records a hospital that failed or sent a malformed reply.
    """
    arrays = ArrayRecord(state)

    def checked(replies: list[Message], parse: Callable) -> list:
        out = []
        for msg in replies:
            try:
                out.append(parse(msg.content[METRICS]))
            except (KeyError, TypeError, ValueError) as exc:
                event(str(msg.metadata.src_node_id), "calibration-rejected", f"malformed: {exc}")
        return out

    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(plan)})
    stats = checked(
        _ask(grid, FEATURE_STATS, content, timeout, event),
        lambda m: feature_stats_from(m, dim),
    )
    if not stats:
        return None
    reference = reduce(add, stats)
    if reference.count == 0:
        return None
    with_reference = ConfigRecord({**plan, REFERENCE: reference.mean.tolist()})
    content = RecordDict({ARRAYS: arrays, CONFIG: with_reference})
    sums = [
        s
        for s in checked(
            _ask(grid, CALIBRATION_STATS, content, timeout, event),
            lambda m: (*val_stats_from(m, n_classes), referral_counts_from(m)),
        )
        if s[0].counts.sum() > 0
    ]
    if not sums:
        return None
    log.info(
        "calibration: reference from %d scans at %d hospital(s), validation sums from %d",
        reference.count,
        len(stats),
        len(sums),
    )
    return CalibrationSums(reference, *(reduce(add, parts) for parts in zip(*sums, strict=True)))
