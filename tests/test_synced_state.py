"""What a hospital keeps between rounds (client/synced_state.py), without Flower's runtime."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from client.synced_state import keeps_state, synced_state
from savlt_model.errors import SavltError
from savlt_model.messages import STATE_BASE, STATE_SESSION, STATE_VERSION
from savlt_model.model.adapters import fold_residuals


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _tags(version: int, base: int | None = None, session: str = "s1") -> ConfigRecord:
    tags = {STATE_SESSION: session, STATE_VERSION: version}
    return ConfigRecord(tags if base is None else {**tags, STATE_BASE: base})


PAYLOAD = {"prototypes": torch.ones(2, 3)}
TOTAL = {"residual.l.B": torch.randn(4, 2), "residual.l.A": torch.randn(2, 5)}
STEP = {"residual.l.B": torch.randn(4, 2), "residual.l.A": torch.randn(2, 5)}
ON_THE_WIRE = {k.replace("residual.", "residual-step."): v for k, v in STEP.items()}


def test_a_kept_total_plus_the_step_is_the_servers_next_total() -> None:
    ctx = _context()
    state, kept = synced_state({**PAYLOAD, **TOTAL}, _tags(1), ctx, keep=True)
    assert kept == 1 and torch.equal(state["residual.l.A"], TOTAL["residual.l.A"])
    state, kept = synced_state({**PAYLOAD, **ON_THE_WIRE}, _tags(2, base=1), ctx, keep=True)
    want = fold_residuals(TOTAL, STEP)
    assert kept == 2 and sorted(state) == sorted({**PAYLOAD, **want})
    assert all(torch.equal(state[k], want[k]) for k in want)
    # the same delta again (the server did not count the reply): served from what is kept
    again, kept = synced_state({**PAYLOAD, **ON_THE_WIRE}, _tags(2, base=1), ctx, keep=True)
    assert kept == 2 and all(torch.equal(again[k], want[k]) for k in want)
    # payload only, nothing new: the kept total
    same, _ = synced_state(PAYLOAD, _tags(2, base=2), ctx, keep=True)
    assert all(torch.equal(same[k], want[k]) for k in want)


@pytest.mark.parametrize("session, base", [("s1", 4), ("other", 1)])
def test_a_delta_that_does_not_apply_is_refused_and_forgets(session: str, base: int) -> None:
    ctx = _context()
    synced_state({**PAYLOAD, **TOTAL}, _tags(1), ctx, keep=True)
    with pytest.raises(SavltError, match="asks for the full state next round"):
        synced_state({**PAYLOAD, **ON_THE_WIRE}, _tags(base + 1, base, session), ctx, keep=True)
    assert len(ctx.state) == 0  # nothing half-kept


def test_a_stateless_hospital_keeps_nothing_and_untagged_messages_are_full() -> None:
    ctx = _context()
    state, kept = synced_state({**PAYLOAD, **TOTAL}, _tags(3), ctx, keep=False)
    assert kept == -1 and len(ctx.state) == 0 and "residual.l.B" in state
    query, kept = synced_state({**PAYLOAD, **TOTAL}, ConfigRecord({}), ctx, keep=True)
    assert kept == -1 and len(ctx.state) == 0 and query.keys() == {**PAYLOAD, **TOTAL}.keys()
    assert keeps_state({}) and not keeps_state({"keep-state": "false"})
    with pytest.raises(SavltError, match="keep-state must be true or false"):
        keeps_state({"keep-state": "maybe"})
