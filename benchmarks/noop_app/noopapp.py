"""No-op ServerApp and ClientApp: rounds of one train message per node, answered at once.

The ServerApp writes its own timestamps per round to the `results` file, so that round times do
not include starting processes or submitting the run. All times are time.time() on one machine.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# fedtune's ClientApp imports torch, so this one does too: a node that starts a process per
# message pays for the import here as it would with the real app.
import torch  # noqa: F401
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()
NODE_WAIT = 120.0  # seconds the ServerApp waits for the nodes to connect


@client.train()
def train(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({"handled-at": time.time(), "pid": os.getpid()})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _write(path: Path, record: dict[str, object]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(path)  # readers never see half a file


def play_rounds(
    grid: Grid, node_ids: list[int], rounds: int, *, after_round: Callable[[list[dict[str, Any]]], None] | None = None
) -> list[dict[str, Any]]:
    """`rounds` rounds of one train message per node; each round's timings, in order.

    Also benchmarks/sim_floor.py's stock-Flower round, in Flower's simulation engine.
    """
    played: list[dict[str, Any]] = []
    for server_round in range(1, rounds + 1):
        messages = [
            Message(RecordDict({"config": ConfigRecord({"round": server_round})}), dst_node_id=node,
                    message_type=MessageType.TRAIN, group_id=str(server_round))
            for node in node_ids
        ]
        sent = time.time()
        replies = list(grid.send_and_receive(messages, timeout=300))
        done = time.time()
        handled = [r.content["metrics"] for r in replies if not r.has_error()]
        played.append({
            "round": server_round,
            "seconds": done - sent,
            "replies": len(handled),
            "errors": [r.error.reason for r in replies if r.has_error()],
            # server push -> ClientApp handles it; ClientApp replied -> the server has all replies
            "dispatch": [float(m["handled-at"]) - sent for m in handled],
            "return": [done - float(m["handled-at"]) for m in handled],
            "pids": [int(m["pid"]) for m in handled],
        })
        if after_round is not None:
            after_round(played)
    return played


def wait_for_nodes(grid: Grid, nodes: int) -> list[int]:
    """The ids of `nodes` connected nodes, sorted; RuntimeError after NODE_WAIT seconds without them."""
    deadline = time.monotonic() + NODE_WAIT
    while len(node_ids := sorted(grid.get_node_ids())) < nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(node_ids)} of {nodes} nodes connected within {NODE_WAIT:.0f} s")
        time.sleep(0.1)
    return node_ids


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds, nodes, results = int(cfg["rounds"]), int(cfg["nodes"]), Path(str(cfg["results"]))
    if cfg["grid"] == "prompt":
        from fedtune.server.transport import Transport  # fedtune's, from the environment the SuperLink runs in

        grid = Transport(grid)
    record: dict[str, Any] = {"started": time.time(), "grid": cfg["grid"], "rounds": []}
    node_ids = wait_for_nodes(grid, nodes)

    def save(played: list[dict[str, Any]]) -> None:
        record["rounds"] = played
        _write(results, record)

    play_rounds(grid, node_ids, rounds, after_round=save)
    record["finished"] = time.time()
    _write(results, record)
