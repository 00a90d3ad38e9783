"""Central (user-level) DP: Flower's wrappers clip and add noise as configured; the epsilon is right."""

from __future__ import annotations

import json
import logging
import random
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune import messages as keys
from fedtune.accounting import user_level_epsilon
from fedtune.config import CentralDPConfig, ConfigError, load_config
from fedtune.report import RunDirectory
from fedtune.simulation import simulate
from fedtune.strategies import build_strategy

REPO = Path(__file__).resolve().parents[1]
SIZE = 20_000  # coordinates: enough to measure the noise's standard deviation within a few percent


class _Nodes:
    """The one thing a strategy asks a grid when it samples: which nodes are connected."""

    def __init__(self, count: int) -> None:
        self.ids = list(range(1, count + 1))

    def get_node_ids(self) -> list[int]:
        return self.ids


def central_strategy(*overrides: str):  # noqa: ANN201 - a Flower Strategy
    cfg = load_config(REPO / "configs/quickstart.yaml", [
        "federation.num_clients=2", "privacy.central.enabled=true", "privacy.central.clipping_norm=1.0", *overrides,
    ])
    return build_strategy(cfg)


def one_round(strategy, updates: list[np.ndarray], num_examples: list[int]) -> np.ndarray:  # noqa: ANN001
    """The strategy's aggregate of replies that each add `update` to an all-zero model."""
    current = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})
    messages = list(strategy.configure_train(1, current, ConfigRecord({}), _Nodes(len(updates))))
    replies = [
        Message(RecordDict({
            keys.ARRAYS: ArrayRecord({"w": Array(update.astype(np.float32))}),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n}),
        }), reply_to=message)
        for message, update, n in zip(messages, updates, num_examples, strict=True)
    ]
    aggregated, _ = strategy.aggregate_train(1, replies)
    return aggregated["w"].numpy()


@pytest.mark.usefixtures("server_identity")
def test_server_side_clipping_clips_each_update_and_averages_uniformly() -> None:
    # Norms 10 and 0.5: the first is scaled down to norm 1, the second kept. Different numbers of
    # examples must not change the weights (the noise is calibrated to a uniform average).
    big = np.zeros(SIZE)
    big[0] = 10.0
    small = np.zeros(SIZE)
    small[1] = 0.5
    np.random.seed(0)
    result = one_round(central_strategy("privacy.central.noise_multiplier=1e-9"), [big, small], [1000, 10])
    assert result[0] == pytest.approx(0.5, abs=1e-6)  # (10 clipped to 1) / 2
    assert result[1] == pytest.approx(0.25, abs=1e-6)  # 0.5 / 2, unclipped
    assert np.abs(result[2:]).max() < 1e-6


@pytest.mark.usefixtures("server_identity")
def test_server_side_noise_has_the_calibrated_standard_deviation() -> None:
    np.random.seed(1)
    tiny = np.zeros(SIZE)
    tiny[0] = 1e-6  # an update of norm 0 would divide by zero in Flower's clipping (fedtune rejects those)
    result = one_round(central_strategy("privacy.central.noise_multiplier=0.8"), [tiny, tiny], [5, 5])
    # noise_multiplier x clipping_norm / clients = 0.8 x 1.0 / 2
    assert result.mean() == pytest.approx(0.0, abs=0.02)
    assert result.std() == pytest.approx(0.4, rel=0.03)


@pytest.mark.usefixtures("server_identity")
def test_central_dp_draws_each_client_independently_as_it_is_accounted() -> None:
    # The accountant composes the Poisson-subsampled Gaussian: each of 1,000 clients drawn with
    # probability 0.1 every round, on its own, not exactly 100 of them.
    strategy = central_strategy("federation.num_clients=1000", "federation.clients_per_round=100")
    random.seed(0)
    nodes = _Nodes(1000)
    start = ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
    counts: list[int] = []
    drawn: Counter[int] = Counter()
    for server_round in range(1, 301):
        ids = [m.metadata.dst_node_id for m in strategy.configure_train(server_round, start, ConfigRecord({}), nodes)]
        assert len(set(ids)) == len(ids)
        counts.append(len(ids))
        drawn.update(ids)
    # Binomial(1000, 0.1) a round: mean 100, standard deviation 9.5.
    assert 97 <= statistics.mean(counts) <= 103 and 7.5 <= statistics.stdev(counts) <= 11.5
    assert len(set(counts)) > 10
    assert len(drawn) == 1000 and 0.095 <= sum(drawn.values()) / 300_000 <= 0.105


@pytest.mark.usefixtures("server_identity")
def test_the_clipped_updates_sum_is_divided_by_the_expected_count_not_the_number_received() -> None:
    # 4 clients expected a round (q = 4 / 8); 2 replied: their sum over 4, so that one client moves
    # the model by at most clipping_norm / 4, what the noise is calibrated to.
    strategy = central_strategy("federation.num_clients=8", "federation.clients_per_round=4",
                                "privacy.central.noise_multiplier=1e-9")
    strategy.strategy.sampling_rate = 1.0  # this test's two clients are both drawn
    first, second = np.zeros(SIZE), np.zeros(SIZE)
    first[0], second[1] = 0.5, 0.25
    result = one_round(strategy, [first, second], [10, 1000])
    assert result[0] == pytest.approx(0.125, abs=1e-6) and result[1] == pytest.approx(0.0625, abs=1e-6)
    assert np.abs(result[2:]).max() < 1e-6


def test_flowers_warning_about_fewer_replies_than_expected_is_not_shown(caplog: pytest.LogCaptureFixture) -> None:
    # With Poisson sampling fewer replies than expected are normal, and the noise stays calibrated.
    from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies

    from fedtune.strategies.central_dp import _not_the_expected_discrepancy

    flower = logging.getLogger("flwr")
    flower.removeFilter(_not_the_expected_discrepancy)
    with caplog.at_level(logging.INFO):
        validate_replies([], 3)  # what Flower's wrappers call: 0 replies where 3 were expected
    assert any("differs from the number of sampled clients" in r.getMessage() for r in caplog.records)
    caplog.clear()
    central_strategy()
    with caplog.at_level(logging.INFO):
        validate_replies([], 3)
    assert not any("differs from the number of sampled clients" in r.getMessage() for r in caplog.records)


def test_user_level_epsilon_matches_dp_accounting() -> None:
    central = CentralDPConfig(enabled=True, noise_multiplier=1.1, target_delta=1e-5)
    for rate, rounds in ((0.1, 50), (1.0, 10)):
        independent = rdp.RdpAccountant()
        independent.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(1.1)), rounds)
        expected = independent.get_epsilon(1e-5)
        epsilon = user_level_epsilon([1.1] * rounds, sampling_rate=rate, delta=central.target_delta)
        assert epsilon == pytest.approx(expected, rel=0.01)


def test_central_dp_settings_that_cannot_work_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="privacy.central: needs strategy fedavg"):
        load_config(REPO / "configs/quickstart.yaml", ["privacy.central.enabled=true", "strategy.name=fedadam"])
    with pytest.raises(ConfigError, match="clipped_count_stddev: 0.5 leaves no noise for the updates"):
        load_config(REPO / "configs/quickstart.yaml", [
            "privacy.central.enabled=true", "privacy.central.clipping=adaptive", "privacy.central.noise_multiplier=1",
        ])


@pytest.mark.parametrize("clipping", ["client", "adaptive"])
def test_a_central_dp_federation_reports_the_user_level_epsilon(tmp_path: Path, clipping: str) -> None:
    cfg = load_config(REPO / "configs/quickstart.yaml", [
        "data.image_size=32", "federation.num_clients=3", "federation.clients_per_round=2", "federation.rounds=3",
        "train.unfreeze=[]", "strategy.name=fedavg", "privacy.central.enabled=true",
        f"privacy.central.clipping={clipping}", "privacy.central.noise_multiplier=0.5",
        "privacy.central.clipping_norm=5", "privacy.central.clipped_count_stddev=1",
        f"output.dir={tmp_path / 'runs'}",
    ])
    outcome = simulate(cfg)
    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    # Poisson sampling: each client drawn with probability 2/3 every round; every one drawn trains.
    assert all(r.clients_ok == r.clients_sampled <= 3 for r in history[1:])
    epsilons = [r.extra["epsilon_user"] for r in history[1:]]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    central = cfg.privacy.central
    assert epsilons[-1] == pytest.approx(user_level_epsilon([0.5] * 3, sampling_rate=2 / 3, delta=central.target_delta))
    independent = rdp.RdpAccountant()  # every round accounted, whatever its draw
    independent.compose(dp_event.PoissonSampledDpEvent(2 / 3, dp_event.GaussianDpEvent(0.5)), 3)
    assert epsilons[-1] == pytest.approx(independent.get_epsilon(central.target_delta), rel=0.01)
    norms = [r.extra["clipping_norm"] for r in history[1:]]
    assert (len(set(norms)) > 1) if clipping == "adaptive" else norms == [5.0] * 3
    report = json.loads((outcome.run_dir / "privacy.json").read_text())["user_level"]
    assert report["epsilon"] == pytest.approx(epsilons[-1]) and report["sampling_rate"] == pytest.approx(2 / 3)
    assert report["sampling"].startswith("Poisson") and report["noise_multiplier_by_round"] == [0.5] * 3
    assert (outcome.run_dir / "privacy.png").is_file()
    # With 2 clients a round, noise 0.5 x 5 / 2 swamps the head: this checks the mechanics, not accuracy.
    assert all(r.central_loss is not None and np.isfinite(r.central_loss) for r in history)
