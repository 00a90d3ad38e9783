"""The default defence: each train update's norm bounded by the round's median, each client's weight capped.

An update is a reply's tensors minus the tensors the server sent. Its norm is measured twice, over
the parameters and over the BatchNorm statistics (running means and variances move on another
scale than weights: 9 to 55 x as far on the quickstart task), and each is compared with the
round's median of the same. The median is the lower one when the count is even, so with two updates a
hostile one cannot drag the bound up to itself. Both hold while fewer than half of a round's
usable updates are hostile.

- Norm: an update over `norm_ratio` x the median is left out (`reject`, the default) or scaled down
  to that norm (`clip`). Clipping keeps some of an outlier's information, but a hostile update
  still pulls with its full bounded length: two sign-flipped updates of 5 clipped to 3 x the
  median outweigh the three honest ones (benchmarks/robustness.py measures it).
- Weight: `num-examples` counts for at most `weight_ratio` x the round's median and at most
  `max_examples`, so a client claiming 10^12 examples weighs no more than a large honest one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedtune import messages as keys
from fedtune.config import ExperimentConfig, UpdateBoundConfig

log = logging.getLogger("fedtune.server")

EventKind = Literal["norm_rejected", "norm_clipped", "weight_capped"]
# A claim of at most this many times its cap is a modest one: a non-IID partition gives honest
# clients such shares (quickstart's client 9 holds 204 examples against a median of 99). Its cap
# is logged once per client and `what`, not every round; history.json counts every cap.
MODEST_CLAIM = 2


@dataclass(frozen=True)
class BoundEvent:
    """What the bound did to one client's reply, and why (a sentence for the log and the history)."""

    node: int
    kind: EventKind
    detail: str


@dataclass
class BoundedReplies:
    kept: list[Message] = field(default_factory=list)  # to aggregate, clipped or capped where needed
    rejected: list[Message] = field(default_factory=list)  # left out for their norm
    events: list[BoundEvent] = field(default_factory=list)

    def count(self, kind: EventKind) -> int:
        return sum(event.kind == kind for event in self.events)


def bound_applies(cfg: ExperimentConfig) -> bool:
    """Whether `strategy.bound` bounds this run's updates ("auto": unless the server cannot, or DP does)."""
    enabled = cfg.strategy.bound.enabled
    if enabled == "auto":
        return not (cfg.privacy.secure_aggregation.enabled or cfg.privacy.central.enabled)
    return enabled


def lower_median(values: Sequence[float]) -> float:
    """The middle value; of the two middle ones, the lower."""
    return sorted(values)[(len(values) - 1) // 2]


class UpdateBound:
    """Applies `strategy.bound` to a round's parsed replies."""

    def __init__(self, cfg: UpdateBoundConfig, *, buffer_keys: frozenset[str]) -> None:
        self.cfg = cfg
        self.buffer_keys = buffer_keys
        self._modest_caps_logged: set[tuple[int, str]] = set()  # (node, what)

    def apply(
        self, replies: list[Message], sent: ArrayRecord, *, server_round: int, name_of: Callable[[int], str]
    ) -> BoundedReplies:
        """Norms first, then weights: a rejected update's claimed size does not move the median weight."""
        result = self._bound_norms(replies, sent, server_round=server_round, name_of=name_of)
        result.events += self.cap_weights(result.kept, what="update", server_round=server_round, name_of=name_of)
        return result

    def _bound_norms(
        self, replies: list[Message], sent: ArrayRecord, *, server_round: int, name_of: Callable[[int], str]
    ) -> BoundedReplies:
        ratio = self.cfg.norm_ratio
        if ratio is None or not replies:
            return BoundedReplies(kept=list(replies))
        origin = {key: array.numpy().astype(np.float64) for key, array in sent.items()}
        groups = {
            "parameter": [key for key in origin if key not in self.buffer_keys],
            "statistics": [key for key in origin if key in self.buffer_keys],
        }
        norms = {
            group: [_update_norm(reply, origin, names) for reply in replies]
            for group, names in groups.items() if names
        }
        medians = {group: lower_median(values) for group, values in norms.items()}
        result = BoundedReplies()
        for index, reply in enumerate(replies):
            node = reply.metadata.src_node_id
            over = [
                (group, norms[group][index], medians[group])
                for group in norms
                if medians[group] > 0 and norms[group][index] > ratio * medians[group]
            ]
            if not over:
                result.kept.append(reply)
                continue
            why = "; ".join(
                f"its {group} update's norm {norm:.4g} is {norm / median:.3g} x the round's median ({median:.4g})"
                for group, norm, median in over
            )
            if self.cfg.norm_action == "reject":
                detail = f"{why}, over strategy.bound.norm_ratio = {ratio:g}"
                log.warning("round %d: rejected the update of %s: %s", server_round, name_of(node), detail)
                result.rejected.append(reply)
                result.events.append(BoundEvent(node, "norm_rejected", detail))
                continue
            for group, norm, median in over:
                _scale_update(reply, origin, groups[group], factor=ratio * median / norm)
            detail = f"{why}: scaled down to {ratio:g} x the median (strategy.bound.norm_ratio)"
            log.warning("round %d: clipped the update of %s: %s", server_round, name_of(node), detail)
            result.kept.append(reply)
            result.events.append(BoundEvent(node, "norm_clipped", detail))
        return result

    def cap_weights(
        self, replies: list[Message], *, what: str, server_round: int, name_of: Callable[[int], str]
    ) -> list[BoundEvent]:
        """Caps each reply's num-examples in place, to weight_ratio x the round's median and max_examples."""
        caps: list[tuple[int, str]] = []
        if self.cfg.max_examples is not None:
            caps.append((self.cfg.max_examples, f"strategy.bound.max_examples = {self.cfg.max_examples}"))
        if self.cfg.weight_ratio is not None and replies:
            median = lower_median([_num_examples(reply) for reply in replies])
            cap = max(1, math.floor(self.cfg.weight_ratio * median))
            caps.append((cap, f"strategy.bound.weight_ratio = {self.cfg.weight_ratio:g} x the round's median {median}"))
        if not caps:
            return []
        cap, rule = min(caps)
        events = []
        for reply in replies:
            claimed = _num_examples(reply)
            if claimed > cap:
                node = reply.metadata.src_node_id
                next(iter(reply.content.metric_records.values()))[keys.NUM_EXAMPLES] = cap
                detail = f"num-examples {claimed} counts as {cap} ({rule})"
                events.append(BoundEvent(node, "weight_capped", detail))
                if claimed > MODEST_CLAIM * cap:
                    log.warning("round %d: capped the weight of the %s of %s: %s",
                                server_round, what, name_of(node), detail)
                elif (node, what) not in self._modest_caps_logged:
                    self._modest_caps_logged.add((node, what))
                    log.info("round %d: capped the weight of the %s of %s: %s; a cap this modest is logged once "
                             "per client (history.json counts each)", server_round, what, name_of(node), detail)
        return events


def _num_examples(reply: Message) -> int:
    return int(next(iter(reply.content.metric_records.values()))[keys.NUM_EXAMPLES])  # type: ignore[arg-type]


def _update_norm(reply: Message, origin: dict[str, np.ndarray], names: list[str]) -> float:
    arrays = reply.content.array_records[keys.ARRAYS]
    total = 0.0
    for key in names:
        delta = np.subtract(arrays[key].numpy(), origin[key], dtype=np.float64).ravel()
        total += float(np.dot(delta, delta))
    return math.sqrt(total)


def _scale_update(reply: Message, origin: dict[str, np.ndarray], names: list[str], *, factor: float) -> None:
    arrays = reply.content.array_records[keys.ARRAYS]
    for key in names:
        value = arrays[key].numpy()
        scaled = origin[key] + (value.astype(np.float64) - origin[key]) * factor
        arrays[key] = Array(scaled.astype(value.dtype))
