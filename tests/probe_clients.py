"""ClientApps for tests: the real handlers, plus a record of what each client held, or a broken reply.

Ray workers import this module by name (tests/ is put on PYTHONPATH by the tests that use it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp
from safetensors.torch import save_file

import client.app as real
from fedtune import messages as keys

PROBE_DIR_ENV = "FEDTUNE_TEST_PROBE_DIR"

recording_app = ClientApp()


@recording_app.query()
def _query(msg: Message, context: Context) -> Message:
    """Answer for real, and note each delivery of the full model."""
    if keys.BACKBONE in msg.content.array_records:
        out = Path(os.environ[PROBE_DIR_ENV])
        out.mkdir(parents=True, exist_ok=True)
        with (out / f"p{int(context.node_config['partition-id'])}-backbone.log").open("a") as log:
            log.write("delivered\n")
    return real.query(msg, context)


@recording_app.train()
def _train_and_record(msg: Message, context: Context) -> Message:
    """Train for real, then save the client's whole model and what it was sent."""
    reply, model = real.run_training(msg, context)
    out = Path(os.environ[PROBE_DIR_ENV])
    out.mkdir(parents=True, exist_ok=True)
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
    stem = out / f"p{partition}-r{server_round}"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{stem}.safetensors")
    stem.with_suffix(".json").write_text(json.dumps({
        "received_keys": sorted(msg.content[keys.ARRAYS].keys()),
        "sent_keys": sorted(reply.content[keys.ARRAYS].keys()),
        "got_backbone": keys.BACKBONE in msg.content.array_records,
        "stages": list(msg.content[keys.CONFIG][keys.TRAINABLE_STAGES]),
    }))
    return reply


@recording_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate_locally(msg, context)


malformed_app = ClientApp()
# partition -> what goes wrong with its update; the others reply correctly.
BREAKAGE = {0: "nan", 1: "shape", 2: "missing"}


@malformed_app.query()
def _query2(msg: Message, context: Context) -> Message:
    return real.query(msg, context)


@malformed_app.train()
def _train_badly(msg: Message, context: Context) -> Message:
    reply = real.train(msg, context)
    arrays = reply.content[keys.ARRAYS]
    key = sorted(arrays.keys())[0]
    breakage = BREAKAGE.get(int(context.node_config["partition-id"]))
    if breakage == "nan":
        value = arrays[key].numpy().copy()
        value.flat[0] = np.nan
        arrays[key] = Array(value)
    elif breakage == "shape":
        arrays[key] = Array(np.zeros((3, 3), dtype=np.float32))
    elif breakage == "missing":
        del arrays[key]
    return reply


@malformed_app.evaluate()
def _evaluate2(msg: Message, context: Context) -> Message:
    return real.evaluate_locally(msg, context)
