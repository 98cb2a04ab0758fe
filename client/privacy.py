"""Client-side clipping for ``privacy.mode: client-fixed`` (Flower's ``fixedclipping_mod``).

The hospital clips its own update (its payload minus the global payload it received) to
the norm the server's round asks for, before the reply leaves it, so no unclipped update
reaches the server, which adds the Gaussian noise (:mod:`server.privacy`).
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from savlt_model.messages import CONFIG


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``fixedclipping_mod`` on the training rounds whose config carries a clipping norm.

    Flower's mod answers every other message (evaluation, the calibration queries, a
    round without DP) with an error, so those go straight to the ClientApp.
    """
    config = msg.content.config_records.get(CONFIG)
    if msg.metadata.message_type == MessageType.TRAIN and config and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
