"""The client's side of SecAgg+: fedtune's own train handler behind Flower's `secaggplus_mod`.

Flower 1.41 implements SecAgg+ only for the legacy FitIns/FitRes message layout ("fitins.parameters",
"fitres.num_examples", ...): `secaggplus_mod` reads the trained tensors out of a legacy FitRes, masks
them and sends only the masked vector. fedtune's handler speaks the new layout ("arrays", "config",
"metrics"), so `secure_aggregation_mod` translates in both directions around it.

What travels is the update (trained tensor minus the tensor the server sent), not the tensor: the
protocol clips every weighted value to [-clipping_range, clipping_range] and quantises it in steps
of 2 clipping_range / quantization_range. Updates are small, so a small clipping_range (a fine
step) fits them where whole weights would need a large one. The server adds the averaged update
back to the tensors it sent (server/secure_aggregation.py).

This module is also the single definition of the extra entries the server puts into the legacy
FitIns config, so both sides agree on them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, NDArray, Scalar, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedtune import messages as keys
from fedtune.config import MAX_SECAGG_SCALE
from fedtune.protocol import MAX_SETTINGS_CHARS, RefusedMessage, excerpt, parse_number

# Entries of the legacy FitIns config. Legacy configs hold scalars only (Flower's compat layer
# rejects lists when it decodes them), and the legacy tensors are a bare list, so fedtune's config
# travels as JSON and the tensor names as an explicit, ordered JSON list.
FEDTUNE_CONFIG = "fedtune.secagg.config"
ARRAY_KEYS = "fedtune.secagg.array-keys"
CLIPPING_RANGE = "fedtune.secagg.clipping-range"
MAX_WEIGHT = "fedtune.secagg.max-weight"

# Bounds of what a client accepts in those entries (fedtune/protocol.py bounds the rest).
_MAX_CONFIG_CHARS = 4 * MAX_SETTINGS_CHARS  # the train config, client settings inside, escaped once more

# Legacy layout record names (Flower's compat functions write and read these).
_FITINS_PARAMETERS = "fitins.parameters"
_FITINS_CONFIG = "fitins.config"


def encode_fit_config(
    config: ConfigRecord, array_keys: Sequence[str], *, clipping_range: float, max_weight: float
) -> dict[str, Scalar]:
    """The legacy FitIns config that carries fedtune's train config and the tensor order."""
    try:
        fedtune_config = json.dumps(dict(config))
    except TypeError as err:  # bytes values: fedtune never sends any, but say so if one appears
        raise TypeError(f"a train config entry cannot travel under secure aggregation: {err}") from err
    return {
        FEDTUNE_CONFIG: fedtune_config,
        ARRAY_KEYS: json.dumps(list(array_keys)),
        CLIPPING_RANGE: float(clipping_range),
        MAX_WEIGHT: float(max_weight),
    }


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


def _json_entry(fit_config: ConfigRecord, key: str, *, max_chars: int) -> object:
    """A JSON text entry of the legacy FitIns config, bounded before it is parsed."""
    text = fit_config.get(key)
    if not isinstance(text, str):
        raise RefusedMessage(key, f"must be a JSON string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise RefusedMessage(key, f"is {len(text)} characters long, more than {max_chars}")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:  # RecursionError: nested too deep
        raise RefusedMessage(key, f"not valid JSON ({type(error).__name__})") from None


def _parse_fit_config(fit_config: ConfigRecord) -> tuple[ConfigRecord, list[str], float, float]:
    """fedtune's train config, the tensor names, the clipping range and the maximum weight, checked."""
    entries = _json_entry(fit_config, FEDTUNE_CONFIG, max_chars=_MAX_CONFIG_CHARS)
    if not isinstance(entries, dict):
        raise RefusedMessage(FEDTUNE_CONFIG, f"must hold a JSON object, got {type(entries).__name__}")
    try:
        config = ConfigRecord(entries)  # Flower's own check of the value types
    except (TypeError, ValueError) as error:
        raise RefusedMessage(FEDTUNE_CONFIG, excerpt(str(error))) from None
    names = _json_entry(fit_config, ARRAY_KEYS, max_chars=_MAX_CONFIG_CHARS)
    if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise RefusedMessage(ARRAY_KEYS, "must hold a JSON list of tensor names")
    if len(set(names)) != len(names):
        raise RefusedMessage(ARRAY_KEYS, "names a tensor twice")
    clipping_range = parse_number(fit_config.get(CLIPPING_RANGE), CLIPPING_RANGE, low=0.0, high=MAX_SECAGG_SCALE,
                                  low_inclusive=False)
    max_weight = parse_number(fit_config.get(MAX_WEIGHT), MAX_WEIGHT, low=0.0, high=MAX_SECAGG_SCALE,
                              low_inclusive=False)
    return config, names, clipping_range, max_weight


def _train_in_legacy_layout(msg: Message, context: Context, train: ClientAppCallable) -> Message:
    """Legacy FitIns in, fedtune's train handler, legacy FitRes (holding the update) out."""
    fit_config = msg.content.config_records[_FITINS_CONFIG]
    config, names, clipping_range, max_weight = _parse_fit_config(fit_config)
    sent = [bytes_to_ndarray(array.data) for array in msg.content.array_records[_FITINS_PARAMETERS].values()]
    if len(sent) != len(names):
        raise ValueError(f"secure aggregation: received {len(sent)} tensors but {len(names)} tensor names")
    request = RecordDict({
        keys.ARRAYS: ArrayRecord({name: Array(array) for name, array in zip(names, sent, strict=True)}),
        keys.CONFIG: config,
    })
    # Same metadata as the protocol message, so the handler's reply is addressed as usual;
    # secaggplus_mod builds the message that actually leaves this node.
    reply = train(Message(content=request, metadata=copy.copy(msg.metadata)), context)
    if reply.has_error():
        raise RuntimeError(reply.error.reason)

    trained = reply.content.array_records.get(keys.ARRAYS)
    metrics = reply.content.metric_records.get(keys.METRICS)
    if trained is None or metrics is None or keys.NUM_EXAMPLES not in metrics:
        raise ValueError(
            f"secure aggregation: the train reply needs an ArrayRecord {keys.ARRAYS!r} and a MetricRecord "
            f"{keys.METRICS!r} with {keys.NUM_EXAMPLES!r}; it has {sorted(reply.content.keys())}"
        )
    num_examples = int(metrics[keys.NUM_EXAMPLES])
    updates = _updates(trained, names, sent)
    _check_fits_protocol(updates, names, num_examples, clipping_range=clipping_range, max_weight=max_weight)
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
