"""Flower's simulation, in this process: for the tests of the federation's logic.

The same ServerApp, strategy, ClientApp (with its mods) and real ``Message`` /
``RecordDict`` / ``Context`` objects as ``flwr.simulation.run_simulation``; what changes is
the transport. Every message and every reply goes through Flower's wire format (protobuf
serde) as it would between processes, each virtual SuperNode keeps its own ``Context``
between messages, and a ClientApp that raises becomes an error reply with the reason
Flower's simulation backend gives it. Every reply is checked to name no path and no file
(:func:`reply_texts`; docs/security.md: no text that leaves a hospital does). The
hospitals run one after another, with no Ray start-up and no actor processes: what the
end-to-end tests (Ray, ``flwr run``, real SuperNodes) pay once per behaviour family, these
tests do not pay at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from tests.conftest import assert_no_local_text

RUN_ID = 1
SUPERLINK = 0
FIRST_NODE = 7_000_001  # virtual SuperNode ids, one per partition id


def _wire(message: Message) -> Message:
    """The message as the other side would decode it."""
    return message_from_proto(message_to_proto(message))


class InProcessGrid(Grid):
    """A Grid whose SuperNodes are ``client_app`` called in turn, in this process."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        self.contexts = {
            FIRST_NODE + i: Context(
                run_id=RUN_ID,
                node_id=FIRST_NODE + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self._run = Run.create_empty(RUN_ID)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, *args, **kwargs) -> Message:  # deprecated in Flower: not used
        raise RuntimeError("build Message(...) directly (Flower's Message API)")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise RuntimeError("InProcessGrid answers through send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise RuntimeError("InProcessGrid answers through send_and_receive only")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            meta = message.metadata.__dict__
            meta.update(_message_id=uuid.uuid4().hex, _run_id=RUN_ID, _src_node_id=SUPERLINK)
            received = _wire(message)
            try:
                reply = self.client_app(received, self.contexts[received.metadata.dst_node_id])
            except Exception as exc:  # what Flower's simulation backend sends back instead
                error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc)}:<'{exc}'>")
                reply = Message(error, reply_to=received)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            replies.append(_wire(reply))
            assert_no_local_text(reply_texts(replies[-1]))
        return replies


def reply_texts(reply: Message) -> list[str]:
    """Every text a reply carries: its error reason, its config values and its record and
    metric names (metric values are numbers: the message contract's check)."""
    if reply.has_error():
        return [reply.error.reason]
    content = reply.content
    texts = [*content.array_records, *content.metric_records, *content.config_records]
    for record in content.array_records.values():
        texts += list(record)
    for metrics in content.metric_records.values():
        texts += list(metrics)
    for config in content.config_records.values():
        texts += [str(k) for k in config] + [str(v) for v in config.values()]
    return texts


def run_in_process(
    server_app: ServerApp, client_app: ClientApp, num_supernodes: int, **_backend: object
) -> None:
    """A drop-in for ``flwr.simulation.run_simulation`` (its backend settings are moot)."""
    grid = InProcessGrid(client_app, num_supernodes)
    # the identity Flower's ServerApp runtime gives its process (Message() reads the run id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK
    server_app(grid, Context(RUN_ID, SUPERLINK, {}, RecordDict(), {}))
