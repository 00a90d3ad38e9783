"""Getting messages to clients: the full model only to nodes that lack it, and every byte counted."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedtune import messages as keys
from strategies.validation import concise_reason

log = logging.getLogger("fedtune.server")


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it for the wire."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0
    sent_backbone: int = 0


@dataclass
class ModelDelivery:
    """Sends each node the full model at most once, then only what trains.

    Before a node's first message of a run, the server asks whether it already caches the model
    (by content hash) from an earlier run; only if not does the backbone ride along. A node
    that replied successfully to a message that carried it holds it from then on.
    """

    model_hash: str
    backbone: ArrayRecord
    timeout: float
    holders: set[int] = field(default_factory=set)
    deliveries: dict[int, int] = field(default_factory=dict)  # node -> times the backbone was sent
    _backbone_bytes: int | None = None

    def _ask_who_has_it(self, grid: Grid, nodes: list[int], traffic: Traffic) -> None:
        question = RecordDict({keys.CONFIG: ConfigRecord({keys.MODEL_HASH: self.model_hash})})
        queries = [Message(content=question, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        traffic.sent += payload_bytes(question) * len(queries)
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            if reply.has_error():
                node, reason = reply.metadata.src_node_id, concise_reason(reply.error.reason)
                log.warning("client %d did not answer the model query: %s", node, reason)
                continue
            traffic.received += payload_bytes(reply.content)
            metrics = reply.content.metric_records.get(keys.METRICS)
            if metrics is not None and metrics.get(keys.HAS_MODEL) == 1:
                self.holders.add(reply.metadata.src_node_id)

    def send_and_receive(self, grid: Grid, messages: Iterable[Message], traffic: Traffic) -> list[Message]:
        messages = list(messages)
        newcomers = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self.holders]
        if newcomers:
            self._ask_who_has_it(grid, newcomers, traffic)
        outgoing, carried_backbone = [], set()
        size_of: dict[int, int] = {}
        for message in messages:
            node = message.metadata.dst_node_id
            content = message.content
            if node not in self.holders:
                # A RecordDict of its own: the strategy shares one content object between messages.
                content = RecordDict({**content, keys.BACKBONE: self.backbone})
                message = Message(content=content, message_type=message.metadata.message_type, dst_node_id=node)
                carried_backbone.add(node)
                self.deliveries[node] = self.deliveries.get(node, 0) + 1
                if self._backbone_bytes is None:
                    self._backbone_bytes = payload_bytes(RecordDict({keys.BACKBONE: self.backbone}))
                traffic.sent_backbone += self._backbone_bytes
            if id(content) not in size_of:
                size_of[id(content)] = payload_bytes(content)
            traffic.sent += size_of[id(content)]
            outgoing.append(message)
        replies = list(grid.send_and_receive(outgoing, timeout=self.timeout))
        for reply in replies:
            if reply.has_error():
                continue
            traffic.received += payload_bytes(reply.content)
            if reply.metadata.src_node_id in carried_backbone:
                self.holders.add(reply.metadata.src_node_id)
        return replies
