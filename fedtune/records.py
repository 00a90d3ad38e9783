"""What a round produced: its record, the totals of a run's records, and a record read back from history.json.

The files these records go into are fedtune/report.py's; what a person sees of them, fedtune/console.py's.
"""

from __future__ import annotations

import math
import statistics
import types
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from fedtune.text import printable


@dataclass
class RoundRecord:
    """What happened in one round; round 0 is the central evaluation before any training."""

    round: int
    trainable_blocks: str  # e.g. "0", "1", "all"
    clients_sampled: int
    clients_ok: int  # replies aggregated
    clients_rejected: int  # malformed replies left out
    clients_failed: int  # replies carrying an error, or missing
    # Bytes as real nodes receive and send them. A simulation's virtual clients share one copy of
    # the full model per machine (fedtune/server/delivery.py): there bytes_sent and
    # bytes_sent_backbone count the model once for each client, as real nodes would receive it,
    # and bytes_backbone_serialised what the server actually sent of it.
    bytes_sent: int  # server -> clients, this round (train + evaluate messages, model queries and deliveries)
    bytes_received: int  # clients -> server
    bytes_sent_backbone: int  # the part of bytes_sent that was full-model deliveries
    train_loss: float | None  # aggregated from clients
    train_accuracy: float | None
    federated_loss: float | None  # clients' local validation splits, aggregated
    federated_accuracy: float | None
    central_loss: float | None  # the server's held-out set
    central_accuracy: float | None
    seconds: float
    # strategy.bound's work on the round's train updates (each also logged with the client's name)
    updates_rejected_norm: int = 0  # left out: norm over the bound
    updates_clipped: int = 0  # scaled down to the norm bound
    weights_capped: int = 0  # num-examples capped
    # clients sent an evaluate message: 0 when the round had no federated evaluation (federation.evaluation);
    # None in rows written before fedtune recorded it
    evaluations_sampled: int | None = None
    evaluations_rejected: int = 0  # malformed evaluate replies left out
    # The full model's bytes the server serialised and sent this round: bytes_sent_backbone on real
    # nodes; in a simulation, one copy per machine in its first round (the warm-up). None in rows
    # written before fedtune recorded it.
    bytes_backbone_serialised: int | None = None
    evaluations_failed: int = 0  # evaluate replies carrying an error, or missing
    extra: dict[str, float] = field(default_factory=dict)  # anything else, e.g. per-strategy metrics
    # client -> what was wrong with its replies this round and what the server did (history.json only)
    client_problems: dict[str, str] = field(default_factory=dict)
    # Each client's accuracy on its own validation split, for the global model, in the rounds with a
    # federated evaluation (client -> accuracy; history.json only). federated_accuracy weights the
    # clients by their examples; the three columns below count every client once, so a client the
    # global model fails shows however small it is.
    client_accuracy: dict[str, float] = field(default_factory=dict)
    clients_accuracy_mean: float | None = None
    clients_accuracy_median: float | None = None
    clients_accuracy_worst10: float | None = None  # the mean of the worst 10% of clients (at least one)
    # Under personalization: each client's own model (the global one with its personal tensors) on its
    # validation split, and the same three columns of it.
    client_personal_accuracy: dict[str, float] = field(default_factory=dict)
    clients_personal_accuracy_mean: float | None = None
    clients_personal_accuracy_median: float | None = None
    clients_personal_accuracy_worst10: float | None = None


# The record's one-value fields, in declaration order: history.csv's fixed leading columns (extra
# keys follow, sorted), so no extra key may take one of these names.
RECORD_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in fields(RoundRecord)
    if f.name not in ("extra", "client_problems", "client_accuracy", "client_personal_accuracy")
)
# The share of the clients whose mean accuracy is clients_accuracy_worst10.
WORST_SHARE = 0.1


@dataclass(frozen=True)
class ClientSpread:
    """How the clients' accuracies spread, each client counted once; NaN for no clients."""

    mean: float = math.nan
    median: float = math.nan
    worst10: float = math.nan  # the mean of the lowest ceil(WORST_SHARE x clients), at least one

    @classmethod
    def of(cls, accuracies: Iterable[float]) -> ClientSpread:
        values = sorted(accuracies)
        if not values:
            return cls()
        worst = values[: max(1, math.ceil(round(WORST_SHARE * len(values), 9)))]
        return cls(mean=statistics.fmean(values), median=statistics.median(values), worst10=statistics.fmean(worst))

    def columns(self, prefix: str = "clients_accuracy") -> dict[str, float | None]:
        """The three as RoundRecord's history columns `<prefix>_mean` ...: None (an empty cell) for no clients."""
        values = {"mean": self.mean, "median": self.median, "worst10": self.worst10}
        return {f"{prefix}_{name}": None if math.isnan(value) else value for name, value in values.items()}
# Per-round counts of replies left out or bounded, totalled in the summary.
_COUNTED = ("clients_rejected", "clients_failed", "updates_rejected_norm", "updates_clipped", "weights_capped",
            "evaluations_rejected", "evaluations_failed")
# What record_from_dict checks a history.json row against.
_FIELD_TYPES: dict[str, Any] = get_type_hints(RoundRecord)
_ANNOTATIONS = {f.name: str(f.type) for f in fields(RoundRecord)}
_REQUIRED = [f.name for f in fields(RoundRecord) if f.default is MISSING and f.default_factory is MISSING]


def summarize_history(records: list[RoundRecord]) -> dict[str, Any]:
    """Totals and best round of a history; the start of a run's summary.json."""
    # Central accuracy is the comparable number across runs; runs without a server-side test set
    # fall back to the clients' validation splits.
    metric = "central_accuracy"
    if all(r.central_accuracy is None for r in records):
        metric = "federated_accuracy"
    scored = [r for r in records if getattr(r, metric) is not None]
    best = max(scored, key=lambda r: getattr(r, metric), default=None)
    last = records[-1] if records else None
    return {
        "rounds_completed": max((r.round for r in records), default=0),
        "best_metric": metric,
        "best_round": best.round if best else None,
        "best_value": getattr(best, metric) if best else None,
        "final_central_accuracy": last.central_accuracy if last else None,
        "final_federated_accuracy": last.federated_accuracy if last else None,
        "bytes_sent_total": sum(r.bytes_sent for r in records),
        "bytes_received_total": sum(r.bytes_received for r in records),
        "bytes_sent_backbone_total": sum(r.bytes_sent_backbone for r in records),
        "seconds_total": sum(r.seconds for r in records),
        **{f"{name}_total": sum(getattr(r, name) for r in records) for name in _COUNTED},
        "problems_by_client": _problems_by_client(records),
        "final_clients_accuracy": _final_spread(records),
        "final_clients_personal_accuracy": _final_spread(records, personal=True),
    }


def _final_spread(records: list[RoundRecord], *, personal: bool = False) -> dict[str, Any] | None:
    """The last federated evaluation's per-client accuracies (of the global model, or of each client's own):
    their spread, and the worst client."""
    def of(record: RoundRecord) -> dict[str, float]:
        return record.client_personal_accuracy if personal else record.client_accuracy

    last = next((r for r in reversed(records) if of(r)), None)
    if last is None:
        return None
    accuracy = of(last)
    spread = ClientSpread.of(accuracy.values())
    worst = min(accuracy, key=lambda name: (accuracy[name], name))
    return {"round": last.round, "clients": len(accuracy), "mean": spread.mean, "median": spread.median,
            "worst10": spread.worst10, "worst_client": worst, "worst_client_accuracy": accuracy[worst]}


def _problems_by_client(records: list[RoundRecord]) -> dict[str, dict[str, Any]]:
    """Each client whose replies were ever left out, clipped or capped: in how many rounds, and the last reason."""
    by_client: dict[str, dict[str, Any]] = {}
    for record in records:
        for client, problem in record.client_problems.items():
            seen = by_client.setdefault(client, {"rounds": 0})
            seen.update(rounds=seen["rounds"] + 1, last_round=record.round, last_problem=problem)
    return dict(sorted(by_client.items()))


def record_from_dict(row: object) -> RoundRecord:
    """A record from its JSON form (a history.json row); ValueError naming the field if the row is not one.

    A resumed run continues the history it reads back, and its summary adds these numbers up: a
    field of the wrong kind would otherwise surface rounds later, far from the file that held it.
    """
    if not isinstance(row, dict):
        raise ValueError(f"a round is a JSON object, not {type(row).__name__}")
    unknown = sorted(printable(str(name), 40) for name in row if name not in _FIELD_TYPES)
    if unknown:
        raise ValueError(f"unknown round fields {unknown[:5]}")
    missing = [name for name in _REQUIRED if name not in row]
    if missing:
        raise ValueError(f"round fields missing: {missing}")
    for name, value in row.items():
        if not _fits(value, _FIELD_TYPES[name]):
            raise ValueError(f"round field {name!r} holds {type(value).__name__} {printable(str(value), 40)!r}, "
                             f"not {_ANNOTATIONS[name]}")
    return RoundRecord(**row)


def _fits(value: object, kind: Any) -> bool:
    """Whether a JSON value has the form of a field typed `kind`: an int is a float too, a bool is neither."""
    if isinstance(value, bool):
        return False
    if kind in (int, float, str):
        return isinstance(value, int | float) if kind is float else isinstance(value, kind)
    if kind is type(None):
        return value is None
    if get_origin(kind) in (Union, types.UnionType):
        return any(_fits(value, option) for option in get_args(kind))
    if get_origin(kind) is dict:
        key_kind, value_kind = get_args(kind)
        return isinstance(value, dict) and all(_fits(k, key_kind) and _fits(v, value_kind) for k, v in value.items())
    raise TypeError(f"RoundRecord has a field of a type record_from_dict does not check: {kind}")
