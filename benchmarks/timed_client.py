"""The stock ClientApp with its steps timed: for `benchmarks/sim_overhead.py profile`.

Ray workers import this module by name (the benchmark puts benchmarks/ on PYTHONPATH). Importing
it wraps the steps fedtune/client/app.py calls (restoring the model, loading the local data,
reading cached features, training, evaluating, taking the reply's tensors) in timers of the
process's CPU time, which other work on the machine does not inflate; only fedtune's own
functions are wrapped, and only in the processes of this benchmark. Each train and evaluate
message of round PROFILE_FROM_ROUND and later adds a line to
$FEDTUNE_PROFILE_DIR/messages-<pid>.jsonl: its round, kind, CPU and wall seconds, and the CPU
seconds of each step.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fedtune.client.app as real
from fedtune import messages as keys

PROFILE_DIR_ENV = "FEDTUNE_PROFILE_DIR"
PROFILE_FROM_ROUND = 3  # rounds 1 and 2 deliver the backbone, compute features, verify files: not warm
# step -> the name fedtune/client/app.py calls it by
STEPS = {
    "restore the model": "restored_model",  # a context manager (resident model); before: restore_model, a function
    "load the local data": "local_data",
    "read cached features": "model_inputs",
    "train": "train_one_round",
    "evaluate": "evaluate",
    "take the reply's tensors": "trainable_state_dict",
}
_spent: dict[str, float] = {}


def _timed(step: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            _spent[step] = _spent.get(step, 0.0) + time.process_time() - started
    return timed


def _timed_context(step: str, factory: Callable[..., Any]) -> Callable[..., Any]:
    @contextmanager
    @wraps(factory)
    def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        started = time.process_time()
        with factory(*args, **kwargs) as value:
            _spent[step] = _spent.get(step, 0.0) + time.process_time() - started
            yield value
            started = time.process_time()
        _spent[step] += time.process_time() - started  # putting it back
    return timed


for _step, _name in STEPS.items():
    if _name == "restored_model" and not hasattr(real, _name):
        real.restore_model = _timed(_step, real.restore_model)  # type: ignore[attr-defined]  # fedtune before
    elif _name == "restored_model":
        setattr(real, _name, _timed_context(_step, getattr(real, _name)))
    else:
        setattr(real, _name, _timed(_step, getattr(real, _name)))

timed_app = ClientApp()


def _measured(handle: Callable[[Message, Context], Message], msg: Message, context: Context) -> Message:
    server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
    _spent.clear()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        return handle(msg, context)
    finally:
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if server_round >= PROFILE_FROM_ROUND:
            line = {"round": server_round, "kind": msg.metadata.message_type, "cpu": cpu, "wall": wall,
                    "steps": dict(_spent)}
            with (Path(os.environ[PROFILE_DIR_ENV]) / f"messages-{os.getpid()}.jsonl").open("a") as lines:
                lines.write(json.dumps(line) + "\n")


@timed_app.query()
def _query(msg: Message, context: Context) -> Message:
    return real.query(msg, context)


@timed_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _measured(real.train, msg, context)


@timed_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _measured(real.evaluate_locally, msg, context)
