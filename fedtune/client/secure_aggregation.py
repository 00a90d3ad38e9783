"""The client's side of SecAgg+: fedtune's own train handler behind Flower's `secaggplus_mod`.

Flower 1.41 implements SecAgg+ only for the legacy FitIns/FitRes message layout ("fitins.parameters",
"fitres.num_examples", ...): `secaggplus_mod` reads the trained tensors out of a legacy FitRes, masks
them and sends only the masked vector. fedtune's handler speaks the new layout ("arrays", "config",
"metrics"), so `secure_aggregation_mod` translates in both directions around it.

What travels is the update (trained tensor minus the tensor the server sent), not the tensor: the
protocol clips every weighted value to [-clipping_range, clipping_range] and quantises it in steps
of 2 clipping_range / quantization_range. Updates are small, so a small clipping_range (a fine
step) fits them where whole weights would need a large one. The server adds the averaged update
back to the tensors it sent (fedtune/server/secure_aggregation.py).

fedtune's own entries of the legacy FitIns config (its train config, the tensors' order, the
bounds) are written by the server and parsed here with fedtune/protocol.py, which both sides share.
"""

from __future__ import annotations

import copy

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, NDArray, Scalar, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedtune import messages as keys
from fedtune.protocol import parse_secure_fit_config

# Legacy layout record names (Flower's compat functions write and read these).
_FITINS_PARAMETERS = "fitins.parameters"
_FITINS_CONFIG = "fitins.config"


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Runs SecAgg+ train messages through `secaggplus_mod` and fedtune's train handler.

    Only train messages that carry SecAgg+ records take this path; everything else (queries,
    evaluation, fedtune's ordinary train messages) passes through untouched. `secaggplus_mod`
    cannot simply be installed as it is: it treats every train message as part of the protocol
    and fails on ordinary ones.
    """
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def train_in_legacy_layout(legacy_msg: Message, ctx: Context) -> Message:
        return _train_in_legacy_layout(legacy_msg, ctx, call_next)

    return secaggplus_mod(msg, context, train_in_legacy_layout)


def _train_in_legacy_layout(msg: Message, context: Context, train: ClientAppCallable) -> Message:
    """Legacy FitIns in, fedtune's train handler, legacy FitRes (holding the update) out."""
    fit_config = parse_secure_fit_config(msg.content.config_records[_FITINS_CONFIG])
    names = fit_config.array_keys
    sent = [bytes_to_ndarray(array.data) for array in msg.content.array_records[_FITINS_PARAMETERS].values()]
    if len(sent) != len(names):
        raise ValueError(f"secure aggregation: received {len(sent)} tensors but {len(names)} tensor names")
    request = RecordDict({
        keys.ARRAYS: ArrayRecord({name: Array(array) for name, array in zip(names, sent, strict=True)}),
        keys.CONFIG: fit_config.config,
    })
    # Same metadata as the protocol message, so the handler's reply is addressed as usual;
    # secaggplus_mod builds the message that actually leaves this node.
    # `metadata=` is in the implementation's signature, not in its overloads (flwr/app/message/message.py,
    # lines 133-144; Flower's own make_message does the same, line 453).
    reply = train(Message(content=request, metadata=copy.copy(msg.metadata)), context)  # type: ignore[call-overload]
    if reply.has_error():
        raise RuntimeError(reply.error.reason)

    trained = reply.content.array_records.get(keys.ARRAYS)
    metrics = reply.content.metric_records.get(keys.METRICS)
    if trained is None or metrics is None or keys.NUM_EXAMPLES not in metrics:
        raise ValueError(
            f"secure aggregation: the train reply needs an ArrayRecord {keys.ARRAYS!r} and a MetricRecord "
            f"{keys.METRICS!r} with {keys.NUM_EXAMPLES!r}; it has {sorted(reply.content.keys())}"
        )
    num_examples = metrics[keys.NUM_EXAMPLES]
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
        raise ValueError(f"secure aggregation: num-examples must be a positive integer, got {num_examples!r}")
    updates = _updates(trained, names, sent)
    _check_fits_protocol(updates, names, num_examples, clipping_range=fit_config.clipping_range,
                         max_weight=fit_config.max_weight)
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(updates),
        num_examples=num_examples,
        metrics=_legacy_metrics(metrics),
    )
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _updates(trained: ArrayRecord, names: list[str], sent: list[NDArray]) -> list[NDArray]:
    """Trained minus sent, per tensor, in the server's order (0-d tensors as shape (1,)).

    The server cannot check masked updates, so malformed ones are refused here.
    """
    if set(trained.keys()) != set(names):
        missing, extra = sorted(set(names) - set(trained.keys())), sorted(set(trained.keys()) - set(names))
        raise ValueError(f"secure aggregation: the trained tensors differ from those sent "
                         f"(missing {missing}, unexpected {extra})")
    updates = []
    for name, before in zip(names, sent, strict=True):
        after = trained[name].numpy()
        if after.shape != before.shape:
            raise ValueError(f"secure aggregation: {name} has shape {after.shape}, the server sent {before.shape}")
        # At least 1-d: SecAggPlusWorkflow finishes unmasking with in-place operations that do
        # nothing to 0-d tensors (numpy turns them into scalars), which would come back wrong.
        update = np.atleast_1d(after.astype(np.float64) - before.astype(np.float64))
        if not np.isfinite(update).all():
            raise ValueError(f"secure aggregation: the update of {name} is not finite")
        updates.append(update)
    return updates


def _check_fits_protocol(
    updates: list[NDArray], names: list[str], num_examples: int, *, clipping_range: float, max_weight: float
) -> None:
    """Refuse what SecAgg+ would silently corrupt.

    secaggplus_mod multiplies the update by num_examples / max_weight, clips it to
    [-clipping_range, clipping_range] and quantises it: a weight above max_weight can overflow
    the modular sum, and a clipped value biases the average without anyone noticing.
    """
    if num_examples > max_weight:
        raise ValueError(
            f"secure aggregation: this client trained on {num_examples} examples, more than "
            f"privacy.secure_aggregation.max_weight={max_weight:g}; raise max_weight"
        )
    scale = num_examples / max_weight
    for name, update in zip(names, updates, strict=True):
        largest = float(np.abs(update).max(initial=0.0)) * scale
        if largest > clipping_range:
            raise ValueError(
                f"secure aggregation: the weighted update of {name} reaches {largest:.4g}, beyond "
                f"privacy.secure_aggregation.clipping_range={clipping_range:g}, and would be clipped; "
                f"raise clipping_range (or lower max_weight)"
            )


def _legacy_metrics(metrics: MetricRecord) -> dict[str, Scalar]:
    """Legacy FitRes metrics hold scalars only: the server's compat layer rejects lists."""
    out: dict[str, Scalar] = {}
    for name, value in metrics.items():
        if not isinstance(value, int | float):
            raise TypeError(f"secure aggregation: metric {name!r} must be an int or a float, got {value!r}")
        out[name] = value
    return out
