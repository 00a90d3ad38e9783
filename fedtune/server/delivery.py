"""Getting messages to clients: the full model only to nodes that lack it (or lost it)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune import messages as keys
from fedtune.protocol import MAX_REASON_CHARS, parse_query_answer, says_model_missing
from fedtune.server.transport import Transport, payload_bytes
from fedtune.text import concise_reason

log = logging.getLogger("fedtune.server")

# Times one node is sent the full model in one run: the first delivery and two more after the
# node said it lost it. A node that keeps losing it (a broken disk, a cache cap below the model's
# size, or a client asking on purpose) is not sent it again, and fails its rounds until it is fixed.
MAX_DELIVERIES = 3


def _addressed_again(message: Message) -> Message:
    """A fresh copy of a message already sent (Flower gives each message one id, at its first push)."""
    return Message(content=message.content, dst_node_id=message.metadata.dst_node_id,
                   message_type=message.metadata.message_type, group_id=message.metadata.group_id)


@dataclass
class ModelDelivery:
    """Makes sure each node holds the full model before it trains, sending it once, and again if lost.

    Before a node's first message of a run, the server asks whether it already caches the model
    (by content hash) from an earlier run; only if not is the backbone sent, in a message of its
    own. Train and evaluate messages then carry only what trains: exactly one ArrayRecord, which
    is what Flower's mods (client-side clipping, SecAgg+) require. A node that answers a train or
    evaluate message with "model not cached" (deleted, or found damaged) is sent the model again
    and then its message again, within the same round, up to MAX_DELIVERIES times per run.
    Every message goes through `grid`; the run's Transport (fedtune/server/transport.py) counts its bytes.
    """

    model_hash: str
    backbone: ArrayRecord
    timeout: float
    # Virtual clients of a simulation (fedtune/server/transport.py, VirtualClients): they share their
    # machine's cache, which `warm_up` fills before round 1; a client's first message is then sent
    # without asking, and the backbone counted as real nodes would have received it (Traffic).
    presumed: bool = False
    new_to_clients: bool = True  # whether the virtual clients' machine lacked the model (warm_up)
    holders: set[int] = field(default_factory=set)
    deliveries: dict[int, int] = field(default_factory=dict)  # node -> times the backbone was sent
    # node -> the partition-id it gave in its answer to the query: a label for log lines, trusted for nothing else
    partitions: dict[int, int] = field(default_factory=dict)

    def name_of(self, node: int) -> str:
        """How log lines name a node: `client 3 (node 123456…)`, or `node 1234567890123` before it answered
        (a virtual client: `client 3`)."""
        if self.presumed:  # a virtual client: its node id is its partition
            return f"client {node}"
        partition = self.partitions.get(node)
        if partition is None:
            return f"node {node}"
        digits = str(node)
        return f"client {partition} (node {digits if len(digits) <= 8 else digits[:6] + '…'})"

    def forget(self, nodes: Iterable[int]) -> None:
        """These nodes may no longer hold the model: ask them again before their next message."""
        self.holders.difference_update(nodes)

    def _query(self, grid: Grid, nodes: list[int], content: RecordDict, what: str) -> None:
        """Send `content` as a QUERY to each node; those answering HAS_MODEL=1 become holders."""
        queries = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("%s did not %s: %s", self.name_of(node), what, concise_reason(reply.error.reason))
                continue
            answer = parse_query_answer(reply)
            if answer.partition is not None:
                self.partitions[node] = answer.partition
            for problem in answer.problems:
                log.warning("%s answered the model query with a malformed reply: %s", self.name_of(node), problem)
            if answer.has_model:
                self.holders.add(node)

    @staticmethod
    def ping(transport: Transport, clients: list[int]) -> list[str]:
        """Ask these clients to answer, without waiting: the first message a simulation's worker
        handles makes it import fedtune and torch (seconds), which then overlaps the server's own
        start. The query names no model (the server may not have built it yet)."""
        pings = [Message(content=RecordDict({keys.CONFIG: ConfigRecord({})}), message_type=MessageType.QUERY,
                         dst_node_id=client) for client in clients]
        return list(transport.push_messages(pings))

    def warm_up(self, transport: Transport, clients: list[int], *, pinged: list[str]) -> None:
        """Before round 1 of a simulation: the workers have answered their `ping`, and this machine's
        shared cache gets the model, once.

        The clients are asked whether they hold the model. If some do not, the backbone goes to the
        first of them alone, then the others are asked again: on one machine they now find it.
        Those that still lack it (workers on other machines of a Ray cluster) are sent it.
        """
        for reply in transport.receive(pinged, timeout=self.timeout):
            if reply.has_error():
                log.warning("%s did not answer the warm-up: %s", self.name_of(reply.metadata.src_node_id),
                            concise_reason(reply.error.reason))
        question = self._question()
        self._query(transport, clients, question, "answer the model query")
        lacking = [c for c in clients if c not in self.holders]
        if lacking:
            self._deliver(transport, lacking[:1], seeding=True)
            self._query(transport, lacking[1:], question, "answer the model query")
            self._deliver(transport, [c for c in lacking[1:] if c not in self.holders], seeding=True)
        # As real nodes would be: a model new to this machine is sent once to each client, with its
        # first message; a model cached by an earlier run is not sent again.
        self.new_to_clients = bool(lacking)
        self.holders.clear()

    def ensure_models(self, grid: Grid, nodes: list[int]) -> None:
        """Ask newcomers whether they cache the model; send it to those that do not.

        Virtual clients (`presumed`) are not asked: they share the machine's copy.
        """
        newcomers = [n for n in nodes if n not in self.holders]
        if not newcomers:
            return
        if self.presumed:
            self.holders.update(newcomers)
            if self.new_to_clients and isinstance(grid, Transport):
                grid.traffic.backbone_presumed += len(newcomers) * self.backbone_bytes
            return
        self._ask_and_deliver(grid, newcomers)

    def _question(self) -> RecordDict:
        """The model query: does the node hold the model with this hash?"""
        return RecordDict({keys.CONFIG: ConfigRecord({keys.MODEL_HASH: self.model_hash})})

    @cached_property
    def backbone_bytes(self) -> int:
        """Of one delivery: the full model's objects, as Transport counts them in sent_backbone."""
        return payload_bytes(self.backbone)

    def _ask_and_deliver(self, grid: Grid, newcomers: list[int]) -> None:
        self._query(grid, newcomers, self._question(), "answer the model query")
        lacking = []
        for node in (n for n in newcomers if n not in self.holders):
            if self.deliveries.get(node, 0) >= MAX_DELIVERIES:
                log.warning("%s still lacks the model after %d deliveries in this run; it is not sent again, so "
                            "this client fails its rounds until its cache is fixed", self.name_of(node),
                            self.deliveries[node])
            else:
                lacking.append(node)
        self._deliver(grid, lacking)

    def _deliver(self, grid: Grid, nodes: list[int], *, seeding: bool = False) -> None:
        """Send the backbone to these nodes. `seeding`: into a simulation's shared cache, which real
        nodes would not have been sent (Traffic.backbone_seeded)."""
        if not nodes:
            return
        delivery = RecordDict({**self._question(), keys.BACKBONE: self.backbone})
        for node in nodes:
            self.deliveries[node] = self.deliveries.get(node, 0) + 1
        if seeding and isinstance(grid, Transport):
            grid.traffic.backbone_seeded += len(nodes) * self.backbone_bytes
        self._query(grid, nodes, delivery, "store the model")

    def send_and_receive(self, grid: Grid, messages: Iterable[Message]) -> list[Message]:
        """Each message's reply (or none, past the timeout); nodes that lost the model get it and their
        message again once, and their second reply replaces the first. A round with a re-send can take
        up to twice the timeout."""
        messages = list(messages)
        self.ensure_models(grid, [m.metadata.dst_node_id for m in messages])
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        lost = {r.metadata.src_node_id: r.error.reason or "" for r in replies if says_model_missing(r)}
        if not lost:
            return replies
        for node, reason in lost.items():
            log.warning("%s lost the model (%s); sending it again", self.name_of(node), reason[:MAX_REASON_CHARS])
        self.forget(lost)
        self._ask_and_deliver(grid, list(lost))
        again = [_addressed_again(m) for m in messages if m.metadata.dst_node_id in lost.keys() & self.holders]
        if not again:
            return replies
        second = {r.metadata.src_node_id: r for r in grid.send_and_receive(again, timeout=self.timeout)}
        return [second.get(r.metadata.src_node_id, r) if r.metadata.src_node_id in lost else r for r in replies]
