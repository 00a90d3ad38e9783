"""Real Flower messages for tests: the server's instructions and the replies a client could send to them."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import ErrorCode

from fedtune import messages as keys

# The metrics fedtune/client/app.py sends with a train reply, besides num-examples.
TRAIN_METRICS = {"train_loss": 0.5, "train_accuracy": 0.75}


def instruction(node: int, message_type: str = MessageType.TRAIN) -> Message:
    """What the server sends; needs the `server_identity` fixture (Flower's runtime identity)."""
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}), node, message_type)


def train_reply(
    arrays: dict[str, np.ndarray],
    num_examples: object = 10,
    *,
    node: int = 1,
    metrics: dict[str, object] | None = None,
    extra: RecordDict | None = None,
) -> Message:
    """A train reply: the arrays, and num-examples with the usual metrics (None: no MetricRecord)."""
    content = RecordDict({keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()})})
    if num_examples is not None:
        values = {keys.NUM_EXAMPLES: num_examples, **TRAIN_METRICS} if metrics is None else metrics
        content[keys.METRICS] = MetricRecord(values)
    for name, record in (extra or {}).items():
        content[name] = record
    return Message(content, reply_to=instruction(node))


def evaluate_reply(metrics: dict[str, object] | None, *, node: int = 1, extra: RecordDict | None = None) -> Message:
    content = RecordDict({} if metrics is None else {keys.METRICS: MetricRecord(metrics)})
    for name, record in (extra or {}).items():
        content[name] = record
    return Message(content, reply_to=instruction(node, MessageType.EVALUATE))


def error_reply(reason: str, *, node: int, message_type: str = MessageType.TRAIN) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=instruction(node, message_type))


def flower_reason(client_message: str) -> str:
    """The reason Flower's simulation engine reports: str(type(ex)) + ":<'" + str(ex) + "'>" (vce_api)."""
    error = ClientAppException(client_message)
    return str(type(error)) + ":<'" + str(error) + "'>"
