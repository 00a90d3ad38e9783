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
    """Makes sure each node holds the full model before it trains, sending it at most once.

    Before a node's first message of a run, the server asks whether it already caches the model
    (by content hash) from an earlier run; only if not is the backbone sent, in a message of its
    own. Train and evaluate messages then carry only what trains: exactly one ArrayRecord, which
    is what Flower's mods (client-side clipping, SecAgg+) require.
    """

    model_hash: str
    backbone: ArrayRecord
    timeout: float
    holders: set[int] = field(default_factory=set)
    deliveries: dict[int, int] = field(default_factory=dict)  # node -> times the backbone was sent
    _backbone_bytes: int | None = None

    def name_of(self, node: int) -> str:
        """How log lines and the history name a client."""
        return f"node {node}"

    def _query(self, grid: Grid, nodes: list[int], content: RecordDict, traffic: Traffic, what: str) -> None:
        """Send `content` as a QUERY to each node; those answering HAS_MODEL=1 become holders."""
        queries = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        traffic.sent += payload_bytes(content) * len(queries)
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            if reply.has_error():
                node, reason = reply.metadata.src_node_id, concise_reason(reply.error.reason)
                log.warning("client %d did not %s: %s", node, what, reason)
                continue
            traffic.received += payload_bytes(reply.content)
            metrics = reply.content.metric_records.get(keys.METRICS)
            if metrics is not None and metrics.get(keys.HAS_MODEL) == 1:
                self.holders.add(reply.metadata.src_node_id)

    def ensure_models(self, grid: Grid, nodes: list[int], traffic: Traffic) -> None:
        """Ask newcomers whether they cache the model; send it to those that do not."""
        newcomers = [n for n in nodes if n not in self.holders]
        if not newcomers:
            return
        question = RecordDict({keys.CONFIG: ConfigRecord({keys.MODEL_HASH: self.model_hash})})
        self._query(grid, newcomers, question, traffic, "answer the model query")
        lacking = [n for n in newcomers if n not in self.holders]
        if not lacking:
            return
        delivery = RecordDict({**question, keys.BACKBONE: self.backbone})
        if self._backbone_bytes is None:
            self._backbone_bytes = payload_bytes(RecordDict({keys.BACKBONE: self.backbone}))
        for node in lacking:
            self.deliveries[node] = self.deliveries.get(node, 0) + 1
        traffic.sent_backbone += self._backbone_bytes * len(lacking)
        self._query(grid, lacking, delivery, traffic, "store the model")

    def send_and_receive(self, grid: Grid, messages: Iterable[Message], traffic: Traffic) -> list[Message]:
        messages = list(messages)
        self.ensure_models(grid, [m.metadata.dst_node_id for m in messages], traffic)
        size_of: dict[int, int] = {}  # the strategy shares one content object between messages
        for message in messages:
            if id(message.content) not in size_of:
                size_of[id(message.content)] = payload_bytes(message.content)
            traffic.sent += size_of[id(message.content)]
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        traffic.received += sum(payload_bytes(r.content) for r in replies if not r.has_error())
        return replies
