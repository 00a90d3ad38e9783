"""Every client reply parsed at the edge: exactly the records a strategy expects, or why it is left out.

A reply is client content: hostile until parsed. Train replies become one ArrayRecord holding the
tensors the server sent (same names, in the server's order, same shapes and dtypes, finite) and
one MetricRecord holding the known metrics (finite numbers within their range); evaluate replies
become that MetricRecord alone. Anything else a client added is dropped, so nothing deeper (a
Flower strategy that needs the same metric keys in every reply, or pairs tensors by position)
ever sees raw client content. A reply that cannot be parsed is left out, with a log line naming
the client and the problem; it never ends the run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TypeGuard, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedtune import messages as keys
from fedtune.text import MAX_REASON, concise_reason, printable

log = logging.getLogger("fedtune.server")

MAX_METRICS = 64  # metrics in one reply: the client's handlers send 3 (6 under DP-SGD)
_MAX_NAME = 60  # characters of a client-chosen name (a metric's) shown in a log line
_MAX_NAMES_SHOWN = 3
_NPY_HEADER_BYTES = 4096  # room for a .npy header around a tensor's data (numpy writes 128 bytes or so)
_LARGEST_COUNT = 2**53  # num-examples above this is not even exact as the float Flower weights with
_COUNT_RULE = "a positive integer up to 2**53"

# The metrics fedtune/client/app.py sends.
TRAIN_LOSS = "train_loss"
TRAIN_ACCURACY = "train_accuracy"
EVALUATE_LOSS = "loss"
EVALUATE_ACCURACY = "accuracy"


class UnusableReply(ValueError):
    """A reply the server cannot use; the message says why, for a log line naming the client."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class MetricSpec:
    """What one metric must be: a number in [low, high], an integer if `integer`."""

    low: float
    high: float
    integer: bool = False

    @property
    def rule(self) -> str:
        if self.integer and self.low == 1 and self.high == _LARGEST_COUNT:
            return _COUNT_RULE
        if self.integer:
            return f"an integer in [{self.low:g}, {self.high:g}]"
        if math.isinf(self.high):
            return f"a finite number >= {self.low:g}"
        return f"a number in [{self.low:g}, {self.high:g}]"


_COUNT = MetricSpec(1, _LARGEST_COUNT, integer=True)
_LOSS = MetricSpec(0.0, math.inf)
_FRACTION = MetricSpec(0.0, 1.0)
WEIGHT_ONLY: dict[str, MetricSpec] = {keys.NUM_EXAMPLES: _COUNT}
EVALUATE_METRICS: dict[str, MetricSpec] = {
    keys.NUM_EXAMPLES: _COUNT, EVALUATE_LOSS: _LOSS, EVALUATE_ACCURACY: _FRACTION
}
# Under personalization: the client's own model's too (fedtune/client/app.py, _evaluate).
PERSONAL_EVALUATE_METRICS: dict[str, MetricSpec] = {
    **EVALUATE_METRICS, keys.PERSONAL_LOSS: _LOSS, keys.PERSONAL_ACCURACY: _FRACTION
}


def train_metric_specs(*, dp_sgd: bool) -> dict[str, MetricSpec]:
    """The metrics a train reply must hold: the weight, loss and accuracy, and DP-SGD's figures under it."""
    specs = {keys.NUM_EXAMPLES: _COUNT, TRAIN_LOSS: _LOSS, TRAIN_ACCURACY: _FRACTION}
    if dp_sgd:
        specs |= {keys.EPSILON: _LOSS, keys.NOISE_MULTIPLIER: _LOSS, keys.SAMPLE_RATE: _FRACTION}
    return specs


def specs_of(arrays: ArrayRecord) -> dict[str, TensorSpec]:
    """What a reply must match: the names, shapes and dtypes the server sent."""
    return {key: TensorSpec(tuple(array.shape), np.dtype(array.numpy().dtype)) for key, array in arrays.items()}


# --- parsing one reply ------------------------------------------------------------------------


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = [printable(name, _MAX_NAME) for name in names[:_MAX_NAMES_SHOWN]]
    return f"{shown}{' ...' if len(names) > _MAX_NAMES_SHOWN else ''}"


Record = TypeVar("Record")


def _only_record(records: Mapping[str, Record], kind: str, wanted: str | None = None) -> Record:
    if len(records) != 1 or (wanted is not None and wanted not in records):
        expected = f"one {kind} {wanted!r}" if wanted else f"one {kind}"
        found = _names(records) if wanted else str(len(records))
        raise UnusableReply(f"expected {expected}, got {found}")
    return next(iter(records.values()))


def decode_tensor(key: str, array: Array, spec: TensorSpec) -> np.ndarray:
    """The tensor, after its declared and encoded shape and dtype match the spec (before any allocation)."""
    shape = tuple(array.shape)
    if shape != spec.shape:
        raise UnusableReply(f"tensor {key!r} has shape {shape}, expected {spec.shape}")
    size = math.prod(spec.shape) * spec.dtype.itemsize
    if len(array.data) > size + _NPY_HEADER_BYTES:
        raise UnusableReply(f"tensor {key!r} carries {len(array.data)} bytes, expected about {size}")
    try:
        # numpy allocates what the .npy header declares before it reads the data: read the
        # header first, and load only what matches.
        stream = io.BytesIO(array.data)
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            encoded_shape, _, encoded_dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            encoded_shape, _, encoded_dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version} is not supported")
        if encoded_dtype != spec.dtype:
            raise UnusableReply(f"tensor {key!r} has dtype {encoded_dtype}, expected {spec.dtype}")
        if tuple(encoded_shape) != spec.shape:
            raise UnusableReply(f"tensor {key!r} has shape {tuple(encoded_shape)}, expected {spec.shape}")
        value = np.load(io.BytesIO(array.data), allow_pickle=False)
    except UnusableReply:
        raise
    except Exception as error:  # undecodable bytes from a broken or hostile client
        raise UnusableReply(f"tensor {key!r} cannot be decoded: {printable(str(error), MAX_REASON)}") from None
    if not np.isfinite(value).all():
        raise UnusableReply(f"tensor {key!r} holds non-finite values (NaN or inf)")
    if key.endswith("running_var") and (value < 0).any():
        raise UnusableReply(f"tensor {key!r} holds negative values: it is a BatchNorm running variance")
    return value


def _parse_arrays(record: ArrayRecord, expected: Mapping[str, TensorSpec]) -> dict[str, np.ndarray]:
    missing = set(expected) - set(record)
    if missing:
        raise UnusableReply(f"missing tensors {_names(missing)}")
    extra = set(record) - set(expected)
    if extra:
        raise UnusableReply(f"unexpected tensors {_names(extra)}")
    # In the server's order: Krum and Bulyan pair the tensors of different replies by position.
    return {key: decode_tensor(key, record[key], spec) for key, spec in expected.items()}


def _shown(value: object) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)} values"
    return repr(value)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_metric_values(
    values: Mapping[str, object], specs: Mapping[str, MetricSpec]
) -> tuple[dict[str, int | float], dict[str, int | float], list[str]]:
    """(the known metrics, checked; the unknown ones that are finite numbers; the names of the rest).

    UnusableReply when a known metric is missing or out of its range, or there are too many.
    """
    if len(values) > MAX_METRICS:
        raise UnusableReply(f"its MetricRecord holds {len(values)} metrics, more than {MAX_METRICS}")
    known: dict[str, int | float] = {}
    for name, spec in specs.items():
        if name not in values:
            raise UnusableReply(f"metric {name!r} is missing")
        value = values[name]
        if (
            not _is_number(value)
            or (spec.integer and not isinstance(value, int))
            or not spec.low <= value <= spec.high
        ):
            raise UnusableReply(f"metric {name!r} must be {spec.rule}, got {_shown(value)}")
        known[name] = value
    unknown = {name: value for name, value in values.items() if name not in specs}
    numbers = {name: value for name, value in unknown.items() if _is_number(value)}
    return known, numbers, sorted(set(unknown) - set(numbers))


def _parse_metrics(record: MetricRecord, specs: Mapping[str, MetricSpec]) -> tuple[MetricRecord, list[str]]:
    """The known metrics, checked; and the names of those dropped as unknown."""
    known, unknown_numbers, others = parse_metric_values(record, specs)
    return MetricRecord(dict(known)), sorted([*unknown_numbers, *others])


def parse_train_content(
    content: RecordDict, expected: Mapping[str, TensorSpec], metrics: Mapping[str, MetricSpec]
) -> tuple[RecordDict, list[str]]:
    """A train reply's content as the strategy expects it, and the unknown metrics dropped; or UnusableReply."""
    arrays = _only_record(content.array_records, "ArrayRecord", keys.ARRAYS)
    record = _only_record(content.metric_records, "MetricRecord")
    parsed_metrics, ignored = _parse_metrics(record, metrics)
    tensors = _parse_arrays(arrays, expected)
    parsed = RecordDict({keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in tensors.items()}),
                         keys.METRICS: parsed_metrics})
    return parsed, ignored


def parse_evaluate_content(content: RecordDict, metrics: Mapping[str, MetricSpec] = EVALUATE_METRICS
                           ) -> tuple[RecordDict, list[str]]:
    """An evaluate reply's content as the strategy expects it, and the unknown metrics dropped; or UnusableReply."""
    if content.array_records:
        raise UnusableReply(f"an evaluate reply carries no tensors, got {_names(content.array_records)}")
    record = _only_record(content.metric_records, "MetricRecord")
    parsed_metrics, ignored = _parse_metrics(record, metrics)
    return RecordDict({keys.METRICS: parsed_metrics}), ignored


# --- sorting a round's replies ----------------------------------------------------------------


@dataclass
class SortedReplies:
    valid: list[Message] = field(default_factory=list)  # their content replaced by the parsed records
    rejected: list[Message] = field(default_factory=list)  # malformed content
    failed: list[Message] = field(default_factory=list)  # the client reported an error
    problems: dict[int, str] = field(default_factory=dict)  # node -> why it was left out


def _sort(
    replies: Iterable[Message],
    parse: Callable[[RecordDict], tuple[RecordDict, list[str]]],
    *,
    what: str,
    server_round: int,
    name_of: Callable[[int], str],
) -> SortedReplies:
    result = SortedReplies()
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            reason = concise_reason(reply.error.reason)
            log.warning("round %d: %s failed its %s: %s", server_round, name_of(node), what, reason)
            result.failed.append(reply)
            result.problems[node] = reason
            continue
        try:
            reply.content, ignored = parse(reply.content)
        except UnusableReply as problem:
            log.warning("round %d: rejected the %s reply of %s: %s", server_round, what, name_of(node), problem)
            result.rejected.append(reply)
            result.problems[node] = str(problem)
            continue
        if ignored:
            log.warning("round %d: ignored unknown metrics %s in the %s reply of %s",
                        server_round, _names(ignored), what, name_of(node))
        result.valid.append(reply)
    return result


def check_train_replies(
    replies: Iterable[Message],
    expected: Mapping[str, TensorSpec],
    *,
    metrics: Mapping[str, MetricSpec],
    server_round: int,
    name_of: Callable[[int], str],
    reject_unchanged: ArrayRecord | None = None,
) -> SortedReplies:
    """Valid (parsed), rejected and failed train replies. With `reject_unchanged` (the arrays sent), a
    reply that returns them unchanged is rejected too: Flower's DP clipping divides by the update's norm."""
    sent = {key: array.numpy() for key, array in reject_unchanged.items()} if reject_unchanged is not None else None

    def parse(content: RecordDict) -> tuple[RecordDict, list[str]]:
        parsed, ignored = parse_train_content(content, expected, metrics)
        returned = parsed.array_records[keys.ARRAYS]
        if sent is not None and all(np.array_equal(returned[k].numpy(), v) for k, v in sent.items()):
            raise UnusableReply("the update is empty: the tensors are exactly those sent")
        return parsed, ignored

    result = _sort(replies, parse, what="train", server_round=server_round, name_of=name_of)
    # Floating-point sums depend on their order. Ordered by content, not by arrival or node id (a
    # restarted simulation draws new node ids), a resumed run aggregates exactly as an
    # uninterrupted one.
    result.valid.sort(key=_content_digest)
    return result


def check_evaluate_replies(
    replies: Iterable[Message], *, server_round: int, name_of: Callable[[int], str],
    metrics: Mapping[str, MetricSpec] = EVALUATE_METRICS,
) -> SortedReplies:
    """Valid (parsed), rejected and failed evaluate replies (`metrics`: what each must hold)."""
    result = _sort(replies, partial(parse_evaluate_content, metrics=metrics), what="evaluate",
                   server_round=server_round, name_of=name_of)
    # Ordered by content too: the weighted averages of the metrics then do not depend on which
    # reply arrived first (they differed in their last bit from run to run).
    result.valid.sort(key=_metrics_digest)
    return result


def _metrics_digest(reply: Message) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for name, record in sorted(reply.content.metric_records.items()):
        digest.update(name.encode())
        digest.update(repr(sorted(record.items())).encode())
    return digest.digest()


def _content_digest(reply: Message) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for key, array in sorted(reply.content.array_records[keys.ARRAYS].items()):
        digest.update(key.encode())
        digest.update(array.data)
    return digest.digest()
