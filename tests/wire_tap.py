"""A grid that records every message that really leaves the server and every reply that really comes back.

Tests put it between Flower's grid and fedtune's server, below fedtune's own transport, so what it
sees is what crossed the wire whatever path sent it. It counts bytes its own way (each object of a
message's content as Flower deflates it for the SuperLink) and files them by round. Messages carry
no round number in their metadata (Flower's Message-API strategies leave group_id empty), so a
round is opened by either of two signs: the first message after evaluate messages that is not one
(a round that evaluates on clients ends with them), or a train or evaluate message whose config
names a later `server-round` (Flower's strategies write it) than the open round's. Under the
second sign alone, a round's model queries are filed with the round before it: the queries of a
round that follows one without federated evaluation. A reply goes with the round of the message
it answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects
from flwr.supercore.run import Run

from fedtune import messages as keys
from fedtune.server.transport import send_and_receive_promptly


def content_bytes(content: InflatableObject) -> int:
    """Bytes of the objects Flower pushes to the SuperLink for this content."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


@dataclass
class Tapped:
    """What crossed in one round, by kind of message: "query", "train", "evaluate", or "train:<SecAgg+ stage>"."""

    messages: Counter[str] = field(default_factory=Counter)  # messages sent
    sent_by_kind: Counter[str] = field(default_factory=Counter)  # bytes of those messages
    received_by_kind: Counter[str] = field(default_factory=Counter)  # bytes of their replies

    @property
    def sent(self) -> int:
        return sum(self.sent_by_kind.values())

    @property
    def received(self) -> int:
        return sum(self.received_by_kind.values())


def _server_round(message: Message) -> int | None:
    """The round a strategy's train or evaluate message names in its config; None for other messages."""
    config = message.content.config_records.get(keys.CONFIG)
    value = None if config is None else config.get(keys.SERVER_ROUND)
    return value if isinstance(value, int) else None


class WireTap(Grid):
    """Flower's grid, unchanged, recording what it pushes and pulls, round by round (`rounds[0]` is round 1)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.rounds: list[Tapped] = []
        self._sent_in: dict[str, tuple[Tapped, str]] = {}  # message id -> its round and kind
        self._last_type = MessageType.EVALUATE
        self._open_round: int | None = None  # the server-round of the open round, once a message named it

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        # Measured before the push, as the server's transport does (fedtune/server/transport.py says why).
        sizes = [content_bytes(message.content) for message in messages]
        ids = list(self._grid.push_messages(messages))
        pushed = set(ids)
        for message, size in zip(messages, sizes, strict=True):
            if message.metadata.message_id not in pushed:
                continue
            message_type = message.metadata.message_type
            named = _server_round(message)
            after_evaluation = self._last_type == MessageType.EVALUATE and message_type != MessageType.EVALUATE
            later = named is not None and self._open_round is not None and named > self._open_round
            if after_evaluation or later:
                self.rounds.append(Tapped())
                self._open_round = None
            self._open_round = named if named is not None else self._open_round
            self._last_type = message_type
            protocol = message.content.config_records.get(RECORD_KEY_CONFIGS)
            kind = message_type if protocol is None else message_type + ":" + str(protocol.get(Key.STAGE))
            self._sent_in[message.metadata.message_id] = (self.rounds[-1], kind)
            self.rounds[-1].messages[kind] += 1
            self.rounds[-1].sent_by_kind[kind] += size
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            if not reply.has_error():
                tapped, kind = self._sent_in[reply.metadata.reply_to_message_id]
                tapped.received_by_kind[kind] += content_bytes(reply.content)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return send_and_receive_promptly(self, messages, timeout=timeout)
