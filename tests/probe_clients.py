"""ClientApps for tests: the real handlers, plus a record of what each client held, a broken reply, or an attack.

Ray workers import this module by name (tests/ is put on PYTHONPATH by the tests that use it).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from safetensors.torch import save_file

import fedtune.client.app as real
from fedtune import messages as keys
from fedtune.protocol import parse_virtual_client

PROBE_DIR_ENV = "FEDTUNE_TEST_PROBE_DIR"



def client_of(msg: Message, context: Context) -> int:
    """The client a message is for: the virtual client it names (a simulation), else the node's partition-id."""
    virtual = parse_virtual_client(msg.content.config_records[keys.CONFIG])
    return virtual.partition if virtual is not None else int(context.node_config["partition-id"])


recording_app = ClientApp()


@recording_app.query()
def _query(msg: Message, context: Context) -> Message:
    """Answer for real, and note each delivery of the full model."""
    if keys.BACKBONE in msg.content.array_records:
        out = Path(os.environ[PROBE_DIR_ENV])
        out.mkdir(parents=True, exist_ok=True)
        with (out / f"p{client_of(msg, context)}-backbone.log").open("a") as log:
            log.write("delivered\n")
    return real.query(msg, context)


@recording_app.train()
def _train_and_record(msg: Message, context: Context) -> Message:
    """Train for real, then save the client's whole model and what it was sent."""
    reply, model = real.run_training(msg, context)
    out = Path(os.environ[PROBE_DIR_ENV])
    out.mkdir(parents=True, exist_ok=True)
    partition = client_of(msg, context)
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
# partition -> round -> what goes wrong with its train reply; partitions 3 and 4 send usable replies
# (3 with unknown metrics the server drops), so every round has 2 usable and 3 rejected.
TRAIN_BREAKAGE = {
    0: {1: "nan", 2: "list-metric"},
    1: {1: "shape", 2: "lying-header"},
    2: {1: "missing", 2: "negative-examples"},
    3: {1: "extra-metric", 2: "extra-list-metric"},
}
# The same for evaluate replies: 3 of 5 rejected each round, one with an extra metric kept.
EVALUATE_BREAKAGE = {
    0: {1: "no-examples", 2: "nan-loss"},
    1: {1: "examples--5", 2: "tensors"},
    2: {1: "list-metric", 2: "accuracy-2"},
    3: {1: "extra-metric", 2: "extra-metric"},
}


def _breakage(table: dict[int, dict[int, str]], msg: Message, context: Context) -> str | None:
    server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
    return table.get(client_of(msg, context), {}).get(server_round)


@malformed_app.query()
def _query2(msg: Message, context: Context) -> Message:
    return real.query(msg, context)


@malformed_app.train()
def _train_badly(msg: Message, context: Context) -> Message:
    reply = real.train(msg, context)
    arrays, metrics = reply.content[keys.ARRAYS], reply.content[keys.METRICS]
    key = sorted(arrays.keys())[0]
    breakage = _breakage(TRAIN_BREAKAGE, msg, context)
    if breakage == "nan":
        value = arrays[key].numpy().copy()
        value.flat[0] = np.nan
        arrays[key] = Array(value)
    elif breakage == "shape":
        arrays[key] = Array(np.zeros((3, 3), dtype=np.float32))
    elif breakage == "missing":
        del arrays[key]
    elif breakage == "list-metric":
        metrics["train_loss"] = [0.1, 0.2]
    elif breakage == "lying-header":
        # The .npy header claims 10^12 floats (4 TB) in the tensor's 40 bytes of data.
        value = arrays[key].numpy()
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
        arrays[key] = Array(dtype="float32", shape=value.shape, stype="numpy.ndarray",
                            data=header.getvalue() + b"\x00" * 40)
    elif breakage == "negative-examples":
        metrics[keys.NUM_EXAMPLES] = -5
    elif breakage == "extra-metric":
        metrics["my_extra_metric"] = 1.0
    elif breakage == "extra-list-metric":
        metrics["loss_per_class"] = [0.5] * 10
    return reply


@malformed_app.evaluate()
def _evaluate2(msg: Message, context: Context) -> Message:
    reply = real.evaluate_locally(msg, context)
    metrics = reply.content[keys.METRICS]
    breakage = _breakage(EVALUATE_BREAKAGE, msg, context)
    if breakage == "no-examples":
        del metrics[keys.NUM_EXAMPLES]
    elif breakage == "examples--5":
        metrics[keys.NUM_EXAMPLES] = -5
    elif breakage == "list-metric":
        metrics["accuracy"] = [0.9, 0.8]
    elif breakage == "nan-loss":
        metrics["loss"] = float("nan")
    elif breakage == "tensors":
        reply.content["arrays"] = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    elif breakage == "accuracy-2":
        metrics["accuracy"] = 2.0
    elif breakage == "extra-metric":
        metrics["f1"] = 0.5
    return reply


# --- attackers --------------------------------------------------------------------------------

# Which partitions attack, and how: "0:scaled,1:lie". The variable is read by the Ray workers, which
# inherit the environment of the test that starts the simulation.
ATTACKS_ENV = "FEDTUNE_TEST_ATTACKS"
ATTACKS = ("scaled", "sign-flip", "noise", "lie", "lie-poison", "absent")
LIED_EXAMPLES = 10**12


def _attack_of(msg: Message, context: Context) -> str | None:
    plan = dict(item.split(":") for item in os.environ.get(ATTACKS_ENV, "").split(",") if item)
    return plan.get(str(client_of(msg, context)))


def corrupt(update: dict[str, np.ndarray], attack: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The attacker's update from the honest one it trained: what each named attack sends instead."""
    if attack == "scaled":
        return {key: value * 1e6 for key, value in update.items()}
    if attack == "sign-flip":
        return {key: value * -10 for key, value in update.items()}
    if attack == "noise":
        return {key: rng.normal(scale=1.0, size=value.shape) for key, value in update.items()}
    if attack == "lie":
        # Its own trained update, claimed to come from 10^12 examples: with FedAvg's weights the
        # global model becomes this one client's, fitted to its skewed partition.
        return update
    if attack == "lie-poison":
        # A poisoned update no larger than an honest one, in a random direction, claimed to come
        # from 10^12 examples. Within the norm bound: the weight cap limits it, only a robust
        # strategy keeps it out.
        noise = {key: rng.normal(size=value.shape) for key, value in update.items()}
        honest = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in update.values()))
        length = math.sqrt(sum(float((v ** 2).sum()) for v in noise.values()))
        return {key: value * (honest / length) for key, value in noise.items()}
    raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")


attack_app = ClientApp()


@attack_app.query()
def _query3(msg: Message, context: Context) -> Message:
    return real.query(msg, context)


@attack_app.train()
def _train_then_attack(msg: Message, context: Context) -> Message:
    """Train for real; an attacker then replaces its update (or, "absent", takes no part)."""
    attack = _attack_of(msg, context)
    if attack == "absent":
        raise RuntimeError("absent: this partition sits the run out")
    reply = real.train(msg, context)
    if attack is None:
        return reply
    sent, arrays = msg.content[keys.ARRAYS], reply.content[keys.ARRAYS]
    update = {key: arrays[key].numpy().astype(np.float64) - sent[key].numpy() for key in arrays.keys()}
    server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
    rng = np.random.default_rng(1000 * client_of(msg, context) + server_round)
    for key, delta in corrupt(update, attack, rng).items():
        arrays[key] = Array((sent[key].numpy() + delta).astype(sent[key].numpy().dtype))
    if attack.startswith("lie"):
        reply.content[keys.METRICS][keys.NUM_EXAMPLES] = LIED_EXAMPLES
    return reply


@attack_app.evaluate()
def _evaluate3(msg: Message, context: Context) -> Message:
    if _attack_of(msg, context) == "absent":
        raise RuntimeError("absent: this partition sits the run out")
    return real.evaluate_locally(msg, context)
