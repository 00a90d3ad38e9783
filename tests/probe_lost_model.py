"""A ClientApp whose node loses its cached model mid-run: the real handlers, plus a disk that forgets.

Ray workers import this module by name (tests/ is put on PYTHONPATH by the test that uses it).
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fedtune.client.app as real
from fedtune import messages as keys
from fedtune.client.task import NodeIdentity, in_simulation
from fedtune.protocol import parse_virtual_client

PROBE_DIR_ENV = "FEDTUNE_TEST_PROBE_DIR"
LOSES_MODEL = (1, 2)  # (partition, round): this node's cached model is deleted before it trains

lost_model_app = ClientApp()


@lost_model_app.query()
def _query(msg: Message, context: Context) -> Message:
    return real.query(msg, context)


@lost_model_app.train()
def _train(msg: Message, context: Context) -> Message:
    """Delete the cached model once, at LOSES_MODEL; train for real; note what happened."""
    virtual = parse_virtual_client(msg.content.config_records[keys.CONFIG])  # the client this node plays
    node = NodeIdentity.from_node_config(dict(context.node_config)).playing(virtual)
    server_round = msg.content[keys.CONFIG][keys.SERVER_ROUND]
    out = Path(os.environ[PROBE_DIR_ENV])
    out.mkdir(parents=True, exist_ok=True)
    lost = out / "deleted"
    if (node.partition_id, server_round) == LOSES_MODEL and not lost.exists():
        for path in (node.cache_root / "models").glob("*.safetensors"):
            path.unlink()
        lost.write_text(str(node.cache_root))
    reply = real.train(msg, context)
    outcome = f"error: {reply.error.reason}" if reply.has_error() else "trained"
    with (out / f"p{node.partition_id}.log").open("a") as log:
        log.write(f"round {server_round} simulated={in_simulation()} {outcome}\n")
    return reply


@lost_model_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate_locally(msg, context)
