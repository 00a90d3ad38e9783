"""A server killed mid-run, as resume tests need it: after a round trained, before it was checkpointed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import ExperimentConfig
from fedtune.records import RoundRecord
from fedtune.report import RunDirectory
from fedtune.server.checkpoint import CHECKPOINT_FILE, Checkpoint
from fedtune.simulation import simulate


def crash_in_round(monkeypatch: pytest.MonkeyPatch, cfg: ExperimentConfig, *, crashed_round: int = 2) -> Path:
    """Run `cfg` in simulation and kill its server as it records round `crashed_round`; returns the
    run directory, whose checkpoint is checked to hold the round before."""
    append_round = RunDirectory.append_round

    def crash(self: RunDirectory, record: RoundRecord) -> None:
        if record.round == crashed_round:
            raise KeyboardInterrupt("the server is killed")
        append_round(self, record)

    with monkeypatch.context() as patched:
        patched.setattr(RunDirectory, "append_round", crash)
        with pytest.raises((KeyboardInterrupt, RuntimeError)):
            simulate(cfg)
    (run_dir,) = Path(cfg.output.dir).iterdir()
    assert Checkpoint.load(run_dir / CHECKPOINT_FILE).round == crashed_round - 1
    return run_dir
