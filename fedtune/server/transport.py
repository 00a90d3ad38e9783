"""The server's one way to its nodes: every message of every path goes through it, and its bytes are counted.

`run_federation` wraps Flower's grid in a `Transport` once, and hands the transport, never the bare
grid, to everything that sends: the strategy's train and evaluate messages, the model query and
delivery (fedtune/server/delivery.py), and Flower's own SecAgg+ workflow (fedtune/server/secure_aggregation.py),
which takes the grid it is given and calls its `send_and_receive` for each of its four stages. So
the byte counts in a round's record include the protocol's key exchange, shares and masked vectors.
Flower is not patched: a Grid subclass handed to Flower's code is its supported extension point.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.run import Run
from flwr.superlink.grid import InMemoryGrid

from fedtune import messages as keys

# Flower's simulation grid pulls every 0.1 s too (flwr/superlink/grid/inmemory_grid.py): a pull
# is one small request to the SuperLink on the same machine.
PULL_INTERVAL = 0.1
# In `fedtune simulate` the grid is Flower's InMemoryGrid: a pull is a look-up of the round's
# message ids in memory, under a lock, so replies are looked for every 10 ms. (The simulation
# engine still hands messages to the virtual clients on its own 0.1 s tick:
# flwr/server/superlink/fleet/vce/vce_api.py, add_messages_to_queue.)
IN_MEMORY_PULL_INTERVAL = 0.01


def payload_bytes(content: RecordDict | ArrayRecord) -> int:
    """Bytes of a message's content (or of one record of it) as Flower serialises it for the wire
    (its objects, deflated)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def _sizes(content: RecordDict) -> tuple[int, int]:
    """payload_bytes(content), and how many of them are the full model (fedtune's BACKBONE record), in one pass."""
    sizes = {object_id: len(obj.deflate()) for object_id, obj in get_all_nested_objects(content).items()}
    backbone = content.array_records.get(keys.BACKBONE)
    # Object ids are cached once computed: this second walk deflates nothing again.
    backbone_bytes = 0 if backbone is None else sum(sizes[i] for i in get_all_nested_objects(backbone))
    return sum(sizes.values()), backbone_bytes


@dataclass
class Traffic:
    """Bytes of message content that crossed between the server and its nodes, counted per message.

    A message sent to n nodes counts n times: each node receives it. Replies count their content;
    an error reply carries none.
    """

    sent: int = 0
    received: int = 0
    sent_backbone: int = 0  # of `sent`: the full model delivered to nodes that lacked it
    # Virtual clients of a simulation share their machine's copy of the full model
    # (fedtune/server/delivery.py): what real nodes would have been sent instead.
    backbone_presumed: int = 0  # not sent: the full model, once for each client on its first message
    backbone_seeded: int = 0  # of `sent_backbone`: into the shared cache, which real nodes would not get

    @property
    def backbone_on_nodes(self) -> int:
        """The full model's bytes as real nodes would have received them."""
        return self.sent_backbone - self.backbone_seeded + self.backbone_presumed

    @property
    def sent_on_nodes(self) -> int:
        """Bytes sent as real nodes would have received them."""
        return self.sent - self.backbone_seeded + self.backbone_presumed


class ForwardingGrid(Grid):
    """A Grid around another that forwards every call to it: a subclass overrides what it watches.
    A Grid around the one Flower hands over is Flower's supported extension point."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class Transport(ForwardingGrid):
    """Flower's grid, metering every message and reply, pulling replies promptly, without nodes that left the run.

    - Metering: `push_messages` counts each message Flower accepted, `pull_messages` each reply, into
      `traffic`; `start_count()` begins a fresh count (one per round). Every other method of Flower's
      Grid that sends (`send_and_receive`) goes through these two.
    - Prompt replies: on real nodes the ServerApp gets Flower's HttpGrid, whose `send_and_receive`
      sleeps 3 s between two pulls (flwr/superlink/grid/http_grid.py:412 in Flower 1.41): every
      exchange ended up to 3 s after its last reply. Here replies are looked for every `interval` s
      (by default 0.1 s, and 10 ms on the simulation's in-memory grid).
    - Sampling: `get_node_ids` leaves out the nodes in `departed` (clients that left the run at
      their privacy budget), so a strategy never samples them; `connected_node_ids` lists them all.
    - Virtual clients (`virtual_clients=N`, simulations only): see `VirtualClients`. The strategy,
      the delivery, the round and the checkpoint then see clients 0..N-1 as their node ids.
    """

    def __init__(self, grid: Grid, *, interval: float | None = None, virtual_clients: int | None = None) -> None:
        super().__init__(grid)
        if interval is None:
            interval = IN_MEMORY_PULL_INTERVAL if isinstance(grid, InMemoryGrid) else PULL_INTERVAL
        self._interval = interval
        self.traffic = Traffic()
        self.departed: set[int] = set()
        self.virtual = None if virtual_clients is None else VirtualClients(virtual_clients)

    def start_count(self) -> Traffic:
        """A fresh count of everything that crosses from now on (the previous count is kept by whoever holds it)."""
        self.traffic = Traffic()
        return self.traffic

    def connected_node_ids(self) -> list[int]:
        """Every node connected to the SuperLink (every virtual client), those that left the run included."""
        if self.virtual is not None:
            return list(range(self.virtual.clients))
        return list(self._grid.get_node_ids())

    def get_node_ids(self) -> list[int]:
        # Sorted: Flower samples from this list with `random`, so a resumed run (same random state,
        # same node ids) samples the same clients as an uninterrupted one would.
        if self.virtual is not None:
            return [client for client in range(self.virtual.clients) if client not in self.departed]
        return sorted(node for node in self._grid.get_node_ids() if node not in self.departed)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        # Measured before the push: once pushed, Flower's simulation engine pickles the same objects
        # for Ray in another thread, and measuring writes into them (an object id is cached in the
        # object's __dict__ when first computed): "dictionary changed size during iteration".
        size_of: dict[int, tuple[int, int]] = {}  # Flower's strategies share one content object between messages
        for message in messages:
            if id(message.content) not in size_of:
                size_of[id(message.content)] = _sizes(message.content)
        if self.virtual is not None:
            pushed = self.virtual.push(self._grid, messages)
            sent = [message for message, message_id in zip(messages, pushed, strict=True) if message_id]
            ids = [message_id for message_id in pushed if message_id]
        else:
            ids = list(self._grid.push_messages(messages))
            accepted = set(ids)  # Flower gives each message its id as it accepts it; one it refused is not sent
            sent = [message for message in messages if message.metadata.message_id in accepted]
        for message in sent:
            total, backbone_bytes = size_of[id(message.content)]
            self.traffic.sent += total
            self.traffic.sent_backbone += backbone_bytes
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        if self.virtual is not None:
            self.virtual.name_senders(replies)
        for reply in replies:
            if not reply.has_error():
                self.traffic.received += payload_bytes(reply.content)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return send_and_receive_promptly(self, messages, timeout=timeout, interval=self._interval)

    def receive(self, message_ids: Iterable[str], *, timeout: float | None) -> list[Message]:
        """The replies to messages pushed earlier (`push_messages`), as `send_and_receive` waits for them."""
        return receive_promptly(self, message_ids, timeout=timeout, interval=self._interval)


def send_and_receive_promptly(
    grid: Grid, messages: Iterable[Message], *, timeout: float | None, interval: float = PULL_INTERVAL
) -> list[Message]:
    """Push `messages` through `grid`, then pull every `interval` s until each has its reply or `timeout`
    seconds have passed (like Flower's: at least one pull, and `timeout=None` waits for all replies)."""
    return receive_promptly(grid, grid.push_messages(messages), timeout=timeout, interval=interval)


def receive_promptly(
    grid: Grid, message_ids: Iterable[str], *, timeout: float | None, interval: float = PULL_INTERVAL
) -> list[Message]:
    """The replies to messages already pushed, pulled every `interval` s as `send_and_receive_promptly` does."""
    pending = set(message_ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while True:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            return replies
        time.sleep(interval)


class VirtualClients:
    """Clients 0..N-1 of a simulation, played by a pool of Flower's simulation nodes.

    Flower's simulation engine gives every virtual client a node of its own, and its message
    dispatcher visits every node every 0.1 s (flwr/server/superlink/fleet/vce/vce_api.py,
    add_messages_to_queue): at 100,000 clients a visit takes seconds, whatever the clients sampled.
    Here the simulation starts only as many nodes as clients take part in one exchange
    (fedtune/simulation.py), and each message names the client its node plays for it, in its
    config (messages.VIRTUAL_PARTITION and VIRTUAL_CLIENTS; the node takes that client's partition and
    keeps its state under that client's name: fedtune/client/task.py, NodeIdentity.playing). So a
    round costs what its sampled clients do, not what the federation has.

    The strategy addresses client c as node id c; `push` sends each message to a node of the pool
    (one each, while there are more nodes than messages), and `name_senders` gives each reply the
    client it came from. Flower's Metadata has no setter for the sender, so its attribute is set as
    Flower's own engine sets a reply's message id (flwr/server/superlink/fleet/vce/vce_api.py:165).
    """

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self._client_of: dict[str, int] = {}  # message id -> the client its reply comes from

    def push(self, grid: Grid, messages: list[Message]) -> list[str]:
        """Send each message to a node of the pool, naming its client; the message ids, in order
        (an empty string for one Flower refused)."""
        pool = sorted(grid.get_node_ids())
        if not pool:
            raise RuntimeError("the simulation has no nodes to play its virtual clients")
        played = []
        for index, message in enumerate(messages):
            client = message.metadata.dst_node_id
            if not 0 <= client < self.clients:
                raise ValueError(f"node id {client} is not one of the {self.clients} virtual clients")
            config = message.content.config_records.get(keys.CONFIG)
            if config is None:
                raise ValueError(f"a {message.metadata.message_type} message without a {keys.CONFIG!r} record "
                                 "cannot name its virtual client")
            # In the config, not a record of its own: Flower's mods expect one config record
            # (flwr/clientapp/mod/centraldp_mods.py, fixedclipping_mod). The other records are
            # shared with the strategy's message, not copied.
            named = ConfigRecord({**config, keys.VIRTUAL_PARTITION: client, keys.VIRTUAL_CLIENTS: self.clients})
            content = RecordDict({**message.content, keys.CONFIG: named})
            played.append(Message(content=content, dst_node_id=pool[index % len(pool)],
                                  message_type=message.metadata.message_type, group_id=message.metadata.group_id,
                                  ttl=message.metadata.ttl))
        accepted = set(grid.push_messages(played))
        ids = []
        for message, original in zip(played, messages, strict=True):
            message_id = message.metadata.message_id
            if message_id in accepted:
                self._client_of[message_id] = original.metadata.dst_node_id
                ids.append(message_id)
            else:
                ids.append("")
        return ids

    def name_senders(self, replies: list[Message]) -> None:
        """Each reply's sender becomes the client its node played."""
        for reply in replies:
            client = self._client_of.pop(reply.metadata.reply_to_message_id, None)
            if client is not None:
                reply.metadata.__dict__["_src_node_id"] = client
