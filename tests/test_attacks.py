"""Attacks by clients in real federations (Ray): each is logged and counted, and the model stays near the honest one.

The attackers (tests/probe_clients.py `attack_app`) train for real and then corrupt their reply:
an update scaled x 1e6, sign-flipped x 10, replaced by large noise, or honest but claiming 10^12
examples. Each run is compared with the run in which the attackers take no part: the same honest
clients, on the same partitions, alone. benchmarks/robustness.py runs the whole matrix.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedtune.config import ExperimentConfig, load_config
from fedtune.model_file import load_model_file
from fedtune.records import RoundRecord
from fedtune.report import RunDirectory
from fedtune.simulation import simulate

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TOLERANCE = 0.03  # accuracy points the acceptance allows against the honest clients alone
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


@dataclass(frozen=True)
class Run:
    accuracy: float
    history: list[RoundRecord]
    summary: dict
    model: dict[str, torch.Tensor]
    log: list[str]


def attack_config(output: Path, *overrides: str) -> ExperimentConfig:
    """5 clients on the quickstart task at 32 px, head only: about a second per round.

    10 rounds: in the first few, accuracy climbs 10 points a round, so a round's delay would read
    as a loss of accuracy; by round 10 it gains about one point a round.
    """
    return load_config(REPO / "configs" / "quickstart.yaml", [
        "data.image_size=32", "federation.num_clients=5", "federation.rounds=10", "train.unfreeze=[]",
        f"output.dir={output}", *overrides,
    ])


def federate(output: Path, attacks: str, *overrides: str) -> Run:
    """A simulation in which the partitions named in `attacks` ("0:scaled,1:lie") attack."""
    from probe_clients import ATTACKS_ENV, attack_app

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    server_log = logging.getLogger("fedtune.server")
    server_log.addHandler(handler)
    with pytest.MonkeyPatch.context() as patch:
        # Ray workers inherit the environment: the attack plan, the probe module, the node caches.
        patch.setenv(ATTACKS_ENV, attacks)
        patch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
        patch.setenv("FEDTUNE_CACHE_DIR", str(output / "cache"))
        try:
            outcome = simulate(attack_config(output / "runs", *overrides), client_app=attack_app)
        finally:
            server_log.removeHandler(handler)
    model, _ = load_model_file(outcome.run_dir / "model.safetensors")
    return Run(
        accuracy=outcome.final_central_accuracy,
        history=RunDirectory.load_history(outcome.run_dir),
        summary=json.loads((outcome.run_dir / "summary.json").read_text()),
        model=model,
        log=[record.getMessage() for record in records],
    )


@pytest.fixture(scope="module")
def honest_alone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Partitions 0 and 1 take no part: the three honest clients alone."""
    yield federate(tmp_path_factory.mktemp("honest-alone"), "0:absent,1:absent")


def test_the_default_bound_leaves_out_scaled_and_sign_flipped_updates(honest_alone: Run, tmp_path: Path) -> None:
    run = federate(tmp_path, "0:scaled,1:sign-flip")

    for record in run.history[1:]:
        assert (record.clients_ok, record.updates_rejected_norm, record.clients_rejected) == (3, 2, 0)
        assert len(record.client_problems) == 2
    rejections = [m for m in run.log if "rejected the update of client" in m]
    assert len(rejections) == 20
    assert all("its parameter update's norm" in m and "over strategy.bound.norm_ratio = 3" in m for m in rejections)
    assert run.summary["updates_rejected_norm_total"] == 20
    assert [entry["rounds"] for entry in run.summary["problems_by_client"].values()] == [10, 10]
    # Both attackers were left out every round: the honest three aggregated exactly as alone.
    assert run.model.keys() == honest_alone.model.keys()
    for key, tensor in run.model.items():
        assert torch.equal(tensor, honest_alone.model[key]), key
    assert run.accuracy == honest_alone.accuracy


def test_the_default_bound_caps_a_lying_client_and_leaves_out_noise(honest_alone: Run, tmp_path: Path) -> None:
    run = federate(tmp_path, "0:lie,1:noise")

    for record in run.history[1:]:
        assert (record.clients_ok, record.updates_rejected_norm, record.weights_capped) == (4, 1, 1)
    capped = [m for m in run.log if "capped the weight of the update of client 0: " in m]
    assert len(capped) == 10
    assert all("num-examples 1000000000000 counts as" in m and "strategy.bound.weight_ratio = 2" in m for m in capped)
    assert run.summary["weights_capped_total"] == 10 and run.summary["updates_rejected_norm_total"] == 10
    assert run.accuracy >= honest_alone.accuracy - TOLERANCE


def test_multikrum_without_the_bound_chooses_the_honest_updates(honest_alone: Run, tmp_path: Path) -> None:
    # MultiKrum averages the 3 updates nearest the others: here exactly the honest three, so the
    # model is the honest clients' alone up to the order of the floating-point sums (which ten
    # rounds of training amplify to ~1e-3; one attacker's update chosen once would move it by 1e3).
    run = federate(tmp_path, "0:scaled,1:sign-flip", "strategy.name=multikrum", "strategy.num_malicious=1",
                   "strategy.num_selected=3", "strategy.bound.enabled=false")
    assert all(r.clients_ok == 5 and r.updates_rejected_norm == 0 for r in run.history[1:])
    for key, tensor in run.model.items():
        torch.testing.assert_close(tensor, honest_alone.model[key], rtol=0, atol=1e-2)
    assert abs(run.accuracy - honest_alone.accuracy) <= 0.01


# --- the whole matrix, each attack against each defence (slow: 15-40 s a run) -----------------

ATTACKS = ("scaled", "sign-flip", "noise", "lie")


def robust_settings(name: str, attackers: int) -> list[str]:
    """Each rule set to tolerate the attackers where 5 clients allow it (Krum's f = 2 needs 7, Bulyan's f = 1 7)."""
    if name == "fedtrimmedavg":
        return [f"strategy.name={name}", f"strategy.trim_fraction={attackers / 5:g}"]
    if name in ("krum", "multikrum"):
        return [f"strategy.name={name}", "strategy.num_malicious=1"]
    if name == "bulyan":
        return [f"strategy.name={name}", "strategy.num_malicious=0"]
    return [f"strategy.name={name}"]


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int, tuple[str, ...]], Run]:
    """The run of the same defence by the honest clients alone (the attackers absent), once per setting."""
    runs: dict[tuple[str, int, tuple[str, ...]], Run] = {}

    def run(strategy: str, attackers: int, extra: tuple[str, ...] = ()) -> Run:
        key = (strategy, attackers, extra)
        if key not in runs:
            plan = ",".join(f"{partition}:absent" for partition in range(attackers))
            runs[key] = federate(tmp_path_factory.mktemp("alone"), plan, *robust_settings(strategy, attackers), *extra)
        return runs[key]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("attackers", [1, 2])
@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("strategy", ("fedavg", *ROBUST))
def test_each_attack_against_each_strategy_with_the_default_bound(
    strategy: str, attack: str, attackers: int, alone: Callable[[str, int, tuple[str, ...]], Run], tmp_path: Path
) -> None:
    plan = ",".join(f"{partition}:{attack}" for partition in range(attackers))
    run = federate(tmp_path, plan, *robust_settings(strategy, attackers))
    kind = "weights_capped" if attack == "lie" else "updates_rejected_norm"
    assert all(getattr(r, kind) == attackers for r in run.history[1:]), [getattr(r, kind) for r in run.history]
    assert run.summary[f"{kind}_total"] == attackers * len(run.history[1:])
    assert run.accuracy >= alone(strategy, attackers, ()).accuracy - TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("attack", ("scaled", "sign-flip", "noise"))
@pytest.mark.parametrize("strategy", ("fedmedian", "fedtrimmedavg", "krum", "multikrum"))
def test_robust_rules_alone_keep_one_attacker_out(
    strategy: str, attack: str, alone: Callable[[str, int, tuple[str, ...]], Run], tmp_path: Path
) -> None:
    unbounded = ("strategy.bound.enabled=false",)
    run = federate(tmp_path, f"0:{attack}", *robust_settings(strategy, 1), *unbounded)
    assert run.accuracy >= alone(strategy, 1, unbounded).accuracy - TOLERANCE
