"""Checks on clients' replies before aggregation: a malformed update is named, logged and left out."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from fedtune import messages as keys

log = logging.getLogger("fedtune.server")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: np.dtype


def specs_of(arrays: ArrayRecord) -> dict[str, TensorSpec]:
    """What a reply must match: the names, shapes and dtypes the server sent."""
    return {key: TensorSpec(tuple(array.shape), np.dtype(array.numpy().dtype)) for key, array in arrays.items()}


def problem_with(reply: Message, expected: Mapping[str, TensorSpec]) -> str | None:
    """Why a training reply cannot be aggregated, or None if it can."""
    content = reply.content
    if list(content.array_records) != [keys.ARRAYS]:
        return f"expected one ArrayRecord {keys.ARRAYS!r}, got {sorted(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(keys.NUM_EXAMPLES)
    if not isinstance(weight, int) or isinstance(weight, bool) or weight <= 0:
        return f"{keys.NUM_EXAMPLES!r} must be a positive integer, got {weight!r}"
    arrays = content.array_records[keys.ARRAYS]
    missing = sorted(set(expected) - set(arrays))
    if missing:
        return f"missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}"
    extra = sorted(set(arrays) - set(expected))
    if extra:
        return f"unexpected tensors {extra[:3]}{' ...' if len(extra) > 3 else ''}"
    for key, spec in expected.items():
        try:
            value = arrays[key].numpy()
        except Exception as error:  # undecodable bytes from a broken or hostile client
            return f"tensor {key!r} cannot be decoded: {error}"
        if tuple(value.shape) != spec.shape:
            return f"tensor {key!r} has shape {tuple(value.shape)}, expected {spec.shape}"
        if value.dtype != spec.dtype:
            return f"tensor {key!r} has dtype {value.dtype}, expected {spec.dtype}"
        if not np.isfinite(value).all():
            return f"tensor {key!r} holds non-finite values (NaN or inf)"
    return None


def concise_reason(reason: str) -> str:
    """The client's own error message out of the traceback text Flower and Ray wrap around it."""
    marker = "Message: "
    if marker in reason:
        tail = reason.rsplit(marker, 1)[1].strip()
        first = tail.splitlines()[0] if tail else reason
        return first.removesuffix("'>")[:500]  # Ray wraps the message in an object's repr
    lines = [line for line in reason.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "no reason given"


@dataclass
class SortedReplies:
    valid: list[Message] = field(default_factory=list)
    rejected: list[Message] = field(default_factory=list)  # malformed content
    failed: list[Message] = field(default_factory=list)  # the client reported an error
    problems: dict[int, str] = field(default_factory=dict)  # node -> why it was left out


def _unchanged(reply: Message, sent: ArrayRecord) -> bool:
    arrays = reply.content.array_records[keys.ARRAYS]
    return all(np.array_equal(arrays[key].numpy(), sent[key].numpy()) for key in sent)


def sort_replies(
    replies: Iterable[Message],
    expected: Mapping[str, TensorSpec],
    *,
    server_round: int,
    reject_unchanged: ArrayRecord | None = None,
) -> SortedReplies:
    """Valid, rejected and failed replies. With `reject_unchanged` (the arrays sent), a reply that
    returns them unchanged is rejected too: Flower's DP clipping divides by the update's norm."""
    sorted_replies = SortedReplies()
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            reason = concise_reason(reply.error.reason)
            log.warning("round %d: client %d failed: %s", server_round, node, reason)
            sorted_replies.failed.append(reply)
            sorted_replies.problems[node] = reason
            continue
        problem = problem_with(reply, expected)
        if problem is None and reject_unchanged is not None and _unchanged(reply, reject_unchanged):
            problem = "the update is empty: the tensors are exactly those sent"
        if problem is None:
            sorted_replies.valid.append(reply)
        else:
            log.warning("round %d: rejected the update of client %d: %s", server_round, node, problem)
            sorted_replies.rejected.append(reply)
            sorted_replies.problems[node] = problem
    # Floating-point sums depend on their order. Ordered by content, not by arrival or node id (a
    # restarted simulation draws new node ids), a resumed run aggregates exactly as an
    # uninterrupted one.
    sorted_replies.valid.sort(key=_content_digest)
    return sorted_replies


def _content_digest(reply: Message) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for key, array in sorted(reply.content.array_records[keys.ARRAYS].items()):
        digest.update(key.encode())
        digest.update(array.data)
    return digest.digest()
