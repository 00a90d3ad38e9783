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

Central DP (the train config carries a clipping norm): Flower's fixedclipping_mod, further down the
ClientApp's mods (fedtune/client/app.py), clips the trained tensors' update to that norm, and the
update masked here is that clipped update with weight 1 (every client counts the same: the
sensitivity of the sum is then the clipping norm, what the server's noise is calibrated to).

A reply of the train handler that is an error (a refusal at the privacy budget, a malformed
message, a model missing from the cache) goes back as that error reply, its reason intact, so that
the server can tell a refusal from a failure; to SecAgg+ the client has dropped out, and the others'
shares remove its masks. A client learns the round's train config, and so whether it would pass
its privacy budget, only at the 'collect masked vectors' stage: Flower's setup stage carries the
protocol's settings alone (flwr/server/workflow/secure_aggregation/secaggplus_workflow.py:364),
so that is where it refuses.

`fedtune select` under SecAgg+ rides the same legacy exchange: its train config is a statistics
query (fedtune/statistics_protocol.py), and the "update" is the client's feature statistics scaled
into [-1, 1] by the query's public bounds (fedtune/client/statistics.py, secure_statistics), with
weight 1, so that the server learns only their sum.
"""

from __future__ import annotations

import copy
import math

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, NDArray, Scalar, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedtune import messages as keys
from fedtune.client.cache import ModelNotCached
from fedtune.client.statistics import secure_statistics
from fedtune.protocol import (
    RefusedMessage,
    SecureFitConfig,
    error_reply,
    parse_clipping_norm,
    parse_secure_fit_config,
)
from fedtune.statistics_protocol import parse_statistics_query

# Legacy layout record names (Flower's compat functions write and read these).
_FITINS_PARAMETERS = "fitins.parameters"
_FITINS_CONFIG = "fitins.config"


class _HandlerDeclined(Exception):
    """The train handler answered with an error reply; `reason` is its reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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

    try:
        return secaggplus_mod(msg, context, train_in_legacy_layout)
    except _HandlerDeclined as declined:
        # secaggplus_mod cannot pass an error reply on (it reads the reply's content:
        # flwr/client/mod/secure_aggregation/secaggplus_mod.py:167-169), so it travels up as an
        # exception and goes back as the handler's own error reply.
        return error_reply(msg, declined.reason)


def _train_in_legacy_layout(msg: Message, context: Context, train: ClientAppCallable) -> Message:
    """Legacy FitIns in, fedtune's train handler, legacy FitRes (holding the update) out."""
    fit_config = parse_secure_fit_config(msg.content.config_records[_FITINS_CONFIG])
    names = fit_config.array_keys
    sent = [bytes_to_ndarray(array.data) for array in msg.content.array_records[_FITINS_PARAMETERS].values()]
    if len(sent) != len(names):
        raise ValueError(f"secure aggregation: received {len(sent)} tensors but {len(names)} tensor names")
    if keys.STATISTICS_SETTINGS in fit_config.config:
        return _statistics_in_legacy_layout(msg, context, fit_config, sent)
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
        raise _HandlerDeclined(reply.error.reason or "no reason given")

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
    weight = num_examples
    if KEY_CLIPPING_NORM in fit_config.config:  # central DP: clipped by Flower's fixedclipping_mod
        _clip_to_norm(updates, parse_clipping_norm(fit_config.config[KEY_CLIPPING_NORM]))
        weight = 1
    _check_fits_protocol(updates, names, weight, clipping_range=fit_config.clipping_range,
                         max_weight=fit_config.max_weight)
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(updates),
        num_examples=weight,  # SecAgg+'s weight, and the train metrics' (averaged uniformly under central DP)
        metrics=_legacy_metrics(metrics),
    )
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _statistics_in_legacy_layout(msg: Message, context: Context, fit_config: SecureFitConfig,
                                 sent: list[NDArray]) -> Message:
    """`fedtune select` under SecAgg+: the masked "update" is this client's feature statistics, scaled
    into [-1, 1] by the query's public bounds (fedtune/client/statistics.py), with weight 1: the
    server learns only their sum over the clients."""
    try:
        query = parse_statistics_query(RecordDict({keys.CONFIG: fit_config.config}))
        vectors = secure_statistics(query, context)
    except RefusedMessage as error:
        raise _HandlerDeclined(f"{keys.REFUSED}: {error}") from None
    except ModelNotCached as error:
        raise _HandlerDeclined(f"{keys.MODEL_MISSING}: {error}") from None
    names = fit_config.array_keys
    shapes = [np.atleast_1d(value).shape for value in vectors.values()]
    if names != list(vectors) or [array.shape for array in sent] != shapes:
        raise _HandlerDeclined(f"{keys.REFUSED}: {keys.SECAGG_ARRAY_KEYS}: the tensors sent are not the statistics' "
                               "parts, in their order and shapes")
    updates = [np.atleast_1d(vectors[name]) for name in names]
    _check_fits_protocol(updates, names, 1, clipping_range=fit_config.clipping_range, max_weight=fit_config.max_weight)
    fitres = FitRes(status=Status(code=Code.OK, message="Success"), parameters=ndarrays_to_parameters(updates),
                    num_examples=1, metrics={})
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


def _clip_to_norm(updates: list[NDArray], clipping_norm: float) -> None:
    """The updates scaled, in place, so that their L2 norm over all tensors is at most `clipping_norm`.

    Flower's fixedclipping_mod clipped the update in the tensors' float32 and added it back to the
    tensors sent; taken apart again in float64 its norm can exceed the clipping norm by float32
    rounding. Clipped once more here, the update that is masked has the norm the noise is
    calibrated to. A coordinate can then exceed the norm only by float64 rounding: cut to it, as
    that lowers the norm, SecAgg+ never has to clip it (clipping_range covers the norm).
    """
    norm = math.sqrt(sum(float(np.square(update).sum()) for update in updates))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    for update in updates:
        update *= scale
        np.clip(update, -clipping_norm, clipping_norm, out=update)


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
