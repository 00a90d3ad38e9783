"""Round records for tests: a small run's rounds, with central and federated accuracy, bytes and an extra metric."""

from __future__ import annotations

from fedtune.records import RoundRecord


def make_record(round_: int, **changes: object) -> RoundRecord:
    """Round 0 is the evaluation before training: no clients, no bytes, only central metrics."""
    if round_ == 0:
        record = RoundRecord(0, "0", 0, 0, 0, 0, 0, 0, 0, None, None, None, None, 2.30, 0.1, 0.5)
    else:
        record = RoundRecord(
            round=round_,
            trainable_blocks="0" if round_ < 3 else "all",
            clients_sampled=5,
            clients_ok=4,
            clients_rejected=1,
            clients_failed=0,
            bytes_sent=18_600_000 + 21_900 if round_ == 1 else 21_900 * round_,
            bytes_received=11_000 * round_,
            bytes_sent_backbone=18_600_000 if round_ == 1 else 0,
            train_loss=1.0 / round_,
            train_accuracy=0.5 + 0.05 * round_,
            federated_loss=1.1 / round_,
            federated_accuracy=0.45 + 0.05 * round_,
            central_loss=1.2 / round_,
            central_accuracy=0.4 + 0.1 * round_ / 3,
            seconds=1.5 * round_,
            extra={"proximal_term": 0.01 * round_},
        )
    for name, value in changes.items():
        setattr(record, name, value)
    return record
