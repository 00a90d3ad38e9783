"""The stock ClientApp with each message under cProfile: for `benchmarks/sim_overhead.py profile`.

Ray workers import this module by name (the benchmark puts benchmarks/ on PYTHONPATH). Every
train and evaluate message of round PROFILE_FROM_ROUND and later is profiled; each worker process
adds them to one profile of its own, written after each message to
$FEDTUNE_PROFILE_DIR/worker-<pid>.prof, with a line per message (round, kind, seconds) in
messages-<pid>.jsonl. cProfile slows Python-heavy code more than torch's kernels: read its
figures as shares.
"""

from __future__ import annotations

import cProfile
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fedtune.client.app as real
from fedtune import messages as keys

PROFILE_DIR_ENV = "FEDTUNE_PROFILE_DIR"
PROFILE_FROM_ROUND = 3  # rounds 1 and 2 deliver the backbone, compute features, verify files: not warm

profiled_app = ClientApp()
_profile = cProfile.Profile()


def _profiled(handle: Callable[[Message, Context], Message], msg: Message, context: Context) -> Message:
    server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
    if server_round < PROFILE_FROM_ROUND:
        return handle(msg, context)
    started = time.perf_counter()
    _profile.enable()
    try:
        return handle(msg, context)
    finally:
        _profile.disable()
        seconds = time.perf_counter() - started
        out = Path(os.environ[PROFILE_DIR_ENV])
        _profile.dump_stats(out / f"worker-{os.getpid()}.prof")
        with (out / f"messages-{os.getpid()}.jsonl").open("a") as lines:
            lines.write(json.dumps({"round": server_round, "kind": msg.metadata.message_type,
                                    "seconds": seconds}) + "\n")


@profiled_app.query()
def _query(msg: Message, context: Context) -> Message:
    return real.query(msg, context)


@profiled_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _profiled(real.train, msg, context)


@profiled_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _profiled(real.evaluate_locally, msg, context)
