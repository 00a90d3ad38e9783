"""Early stopping on the server's validation metric."""

from __future__ import annotations

from pathlib import Path

from fedtune.config import load_config
from fedtune.records import RoundRecord
from fedtune.server.run import EarlyStopping

REPO = Path(__file__).resolve().parents[1]


def record(
    server_round: int, *, central_accuracy: float | None = None, federated_loss: float | None = None
) -> RoundRecord:
    return RoundRecord(
        round=server_round, trainable_blocks="0", clients_sampled=2, clients_ok=2, clients_rejected=0,
        clients_failed=0, bytes_sent=0, bytes_received=0, bytes_sent_backbone=0, train_loss=None,
        train_accuracy=None, federated_loss=federated_loss, federated_accuracy=None, central_loss=None,
        central_accuracy=central_accuracy, seconds=0.0,
    )


def test_stops_after_patience_rounds_without_improvement() -> None:
    cfg = load_config(REPO / "configs/quickstart.yaml", [
        "early_stopping.enabled=true", "early_stopping.metric=central_accuracy", "early_stopping.patience=2",
        "early_stopping.min_delta=0.01",
    ])
    stopper = EarlyStopping(cfg)
    decisions = [stopper.update(record(r, central_accuracy=a)) for r, a in enumerate([0.1, 0.5, 0.6, 0.605, 0.59])]
    # 0.605 is not an improvement of more than min_delta over 0.6: two stale rounds stop the run.
    assert decisions == [False, False, False, False, True]
    assert (stopper.best, stopper.best_round) == (0.6, 2)


def test_loss_is_minimised_and_missing_values_are_skipped() -> None:
    cfg = load_config(REPO / "configs/quickstart.yaml", [
        "early_stopping.enabled=true", "early_stopping.metric=federated_loss", "early_stopping.patience=1",
    ])
    stopper = EarlyStopping(cfg)
    assert not stopper.update(record(0))  # round 0 has no federated evaluation
    assert not stopper.update(record(1, federated_loss=1.0))
    assert not stopper.update(record(2, federated_loss=0.8))
    assert stopper.update(record(3, federated_loss=0.9))


def test_disabled_never_stops() -> None:
    cfg = load_config(REPO / "configs/quickstart.yaml", ["early_stopping.enabled=false"])
    stopper = EarlyStopping(cfg)
    assert not any(stopper.update(record(r, central_accuracy=0.5)) for r in range(10))


def test_with_federated_evaluation_every_k_rounds_the_patience_counts_evaluations() -> None:
    cfg = load_config(REPO / "configs/quickstart.yaml", [
        "early_stopping.enabled=true", "early_stopping.metric=federated_loss", "early_stopping.patience=2",
        "federation.evaluation.every=3",
    ])
    stopper = EarlyStopping(cfg)
    losses = {3: 1.0, 6: 1.1, 8: 1.2}  # rounds 3 and 6, and 8, the last: the rounds that evaluate on clients
    decisions = [stopper.update(record(r, federated_loss=losses.get(r))) for r in range(9)]
    # A round without federated evaluation neither improves nor spends patience: rounds 6 and 8 stop the run.
    assert decisions == [False] * 8 + [True]
    assert stopper.reason() == ("early stopping: federated_loss did not improve for 2 evaluations (one every 3 "
                                "rounds) (best 1.0000 in round 3)")
    central = EarlyStopping(load_config(REPO / "configs/quickstart.yaml", [
        "early_stopping.metric=central_accuracy", "federation.evaluation.every=3"]))
    central.update(record(0, central_accuracy=0.5))
    assert "did not improve for 3 rounds (best" in central.reason()  # measured every round, evaluation or not
