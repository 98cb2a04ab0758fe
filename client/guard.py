"""The outermost ClientApp mod: a refusal leaves a hospital as a code, and every reply is
written to the hospital's audit log (:mod:`client.audit`).

Flower copies a ClientApp exception's text into the reply's ``Error.reason``, which the
server stores; a hospital's error text can name its paths, file names or patients. This
mod catches every exception, logs the full text locally, and replies with a
:class:`savlt_model.messages.Reason` code and the run id only.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from client.audit import append, audit_entry, audit_file
from savlt_model.errors import SavltError
from savlt_model.messages import REFUSAL_CODE, Reason, refusal_reason

log = logging.getLogger(__name__)


class Refused(SavltError):
    """A refusal whose reason code may cross the boundary (its text may not)."""

    def __init__(self, reason: Reason, text: str) -> None:
        super().__init__(text)
        self.reason = reason


def guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the app; log what leaves; turn any exception into a reason-code reply."""
    reason: Reason | None = None
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # every exception: no text may leave
        reason = exc.reason if isinstance(exc, Refused) else Reason.INTERNAL
        log.error("refused %s (%s): %s", msg.metadata.message_type, reason.value, exc)
        log.debug("refusal traceback", exc_info=True)
        error = Error(code=REFUSAL_CODE, reason=refusal_reason(context.run_id, reason))
        reply = Message(error, reply_to=msg)
    if reply.has_error() and reason is None:  # an error a mod built: its text stays here too
        log.error("error reply %s: %s", msg.metadata.message_type, reply.error.reason)
        reason = Reason.INTERNAL
        error = Error(code=REFUSAL_CODE, reason=refusal_reason(context.run_id, reason))
        reply = Message(error, reply_to=msg)
    try:
        append(
            audit_file(dict(context.node_config)), audit_entry(msg, reply, reason, context.run_id)
        )
    except OSError as exc:  # the audit log is the hospital's; never fail the reply for it
        log.error("audit log not written: %s", exc)
    return reply
