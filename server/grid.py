"""A grid that collects replies as they arrive, not every 3 s."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

# Flower's simulation grid pulls every 0.1 s too (flwr/superlink/grid/inmemory_grid.py): a pull
# is one small request to the SuperLink on the same machine.
PULL_INTERVAL = 0.1


class PromptGrid(Grid):
    """Flower's grid, with a `send_and_receive` that looks for replies every `interval` seconds.

    On real nodes the ServerApp gets Flower's HttpGrid, whose `send_and_receive` sleeps 3 s between
    two pulls (flwr/superlink/grid/http_grid.py:412 in Flower 1.41): every exchange of messages ended
    up to 3 s after its last reply, twice a round (train, evaluate). Everything else is delegated.
    """

    def __init__(self, grid: Grid, interval: float = PULL_INTERVAL) -> None:
        self._grid = grid
        self._interval = interval

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

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull until every one has its reply or `timeout` seconds have passed
        (like Flower's: at least one pull, and `timeout=None` waits for all replies)."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            arrived = list(self._grid.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                return replies
            time.sleep(self._interval)
