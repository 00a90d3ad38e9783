"""Central (user-level) DP: clipping, noise every round from generators of its own, and the right epsilon."""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from interruptions import crash_in_round

from fedtune import messages as keys
from fedtune.accounting import user_level_epsilon
from fedtune.config import CentralDPConfig, ConfigError, ExperimentConfig, load_config
from fedtune.report import RunDirectory
from fedtune.simulation import simulate
from fedtune.strategies import build_strategy, restore_strategy_state, strategy_state
from fedtune.strategies.central_dp import CentralDP, CentralRandomness

REPO = Path(__file__).resolve().parents[1]
SIZE = 20_000  # coordinates: enough to measure the noise's standard deviation within a few percent


class _Nodes:
    """The one thing a strategy asks a grid when it samples: which nodes are connected."""

    def __init__(self, count: int) -> None:
        self.ids = list(range(1, count + 1))

    def get_node_ids(self) -> list[int]:
        return self.ids


def central_config(*overrides: str) -> ExperimentConfig:
    return load_config(REPO / "configs/quickstart.yaml", [
        "federation.num_clients=2", "privacy.central.enabled=true", "privacy.central.clipping_norm=1.0",
        "privacy.central.reproducible=true", *overrides,  # the noise and the draw follow the seed: a repeatable test
    ])


def central_strategy(*overrides: str) -> CentralDP:
    strategy = build_strategy(central_config(*overrides))
    assert isinstance(strategy, CentralDP)
    return strategy


def one_round(strategy: CentralDP, updates: list[np.ndarray], num_examples: list[int]) -> np.ndarray:
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
    result = one_round(central_strategy("privacy.central.noise_multiplier=1e-9"), [big, small], [1000, 10])
    assert result[0] == pytest.approx(0.5, abs=1e-6)  # (10 clipped to 1) / 2
    assert result[1] == pytest.approx(0.25, abs=1e-6)  # 0.5 / 2, unclipped
    assert np.abs(result[2:]).max() < 1e-6


@pytest.mark.usefixtures("server_identity")
def test_server_side_noise_has_the_calibrated_standard_deviation() -> None:
    tiny = np.zeros(SIZE)
    tiny[0] = 1e-6
    result = one_round(central_strategy("privacy.central.noise_multiplier=0.8"), [tiny, tiny], [5, 5])
    # noise_multiplier x clipping_norm / clients = 0.8 x 1.0 / 2
    assert result.mean() == pytest.approx(0.0, abs=0.02)
    assert result.std() == pytest.approx(0.4, rel=0.03)


@pytest.mark.usefixtures("server_identity")
def test_central_dp_draws_each_client_independently_as_it_is_accounted() -> None:
    # The accountant composes the Poisson-subsampled Gaussian: each of 1,000 clients drawn with
    # probability 0.1 every round, on its own, not exactly 100 of them.
    strategy = central_strategy("federation.num_clients=1000", "federation.clients_per_round=100")
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


@pytest.mark.usefixtures("server_identity")
def test_fewer_replies_than_expected_are_not_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    # With Poisson sampling fewer replies than expected are normal, and the noise stays calibrated
    # (Flower's wrappers warned about it: flwr/serverapp/strategy/dp_fixed_clipping.py, validate_replies).
    strategy = central_strategy("federation.num_clients=8", "federation.clients_per_round=4")
    strategy.strategy.sampling_rate = 1.0  # the test's one client is drawn
    with caplog.at_level(logging.INFO):
        one_round(strategy, [np.full(SIZE, 1e-3)], [10])
    assert not any("differs from the number of sampled clients" in r.getMessage() for r in caplog.records)
    assert any("central DP noise of standard deviation 0.25 added" in r.getMessage() for r in caplog.records)


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
        "privacy.central.reproducible=true", f"output.dir={tmp_path / 'runs'}",
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


# ----- every round is the accounted mechanism, with randomness the seed does not give away ------------

ZEROS = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})


def noise_alone(strategy: CentralDP, server_round: int = 1) -> np.ndarray:
    """What a round without updates releases (an empty draw, or replies that all failed), as the model moved."""
    return strategy.release_noise_alone(server_round, ZEROS)["w"].numpy().astype(np.float64)


def drawn(strategy: CentralDP, server_round: int, clients: int) -> list[int]:
    return [m.metadata.dst_node_id for m in strategy.configure_train(server_round, ZEROS, ConfigRecord({}),
                                                                     _Nodes(clients))]


@pytest.mark.parametrize("clipping", ["server", "client", "adaptive"])
def test_a_round_without_updates_releases_the_model_plus_the_accounted_noise(clipping: str) -> None:
    from scipy import stats

    strategy = central_strategy("federation.num_clients=8", "federation.clients_per_round=4",
                                f"privacy.central.clipping={clipping}", "privacy.central.noise_multiplier=0.8",
                                "privacy.central.clipped_count_stddev=1")
    # Adaptive clipping gives part of the budget to its count: its updates get the larger multiplier
    # of Andrew et al. 2021, (0.8^-2 - (2 x 1)^-2)^-1/2, so that both together cost 0.8.
    multiplier = (0.8 ** -2 - 2.0 ** -2) ** -0.5 if clipping == "adaptive" else 0.8
    moved = noise_alone(strategy)
    stddev = multiplier * 1.0 / 4  # noise multiplier x clipping norm / expected clients
    assert abs(moved.mean()) < 4 * stddev / np.sqrt(SIZE)
    assert moved.std() == pytest.approx(stddev, rel=0.03)
    assert stats.kstest(moved / stddev, "norm").pvalue > 1e-4


def test_adaptive_clipping_counts_an_empty_round_with_the_same_noise() -> None:
    cfg = central_config("federation.num_clients=8", "federation.clients_per_round=4",
                         "privacy.central.clipping=adaptive", "privacy.central.noise_multiplier=0.8",
                         "privacy.central.clipped_count_stddev=1")
    strategy = build_strategy(cfg)
    assert isinstance(strategy, CentralDP)
    twin = CentralRandomness(seed=cfg.seed)  # the generators the strategy draws from, seeded alike
    moved = noise_alone(strategy)
    assert np.array_equal(moved, twin.noise.normal(0.0, strategy.noise_multiplier / 4, SIZE).astype(np.float32))
    # No update counted, each weighing +-1/2 around the half: the unclipped fraction is 1/2 plus the
    # count's noise over the 4 expected clients, and the norm moves by exp(-0.2 (fraction - 0.5)).
    fraction = 0.5 + twin.noise.normal(0.0, 1.0) / 4
    assert strategy.clipping_norm == pytest.approx(np.exp(-0.2 * (fraction - 0.5)))


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize(("size", "moves"), [(10.0, "up"), (0.1, "down")])
def test_adaptive_clipping_moves_the_norm_towards_the_target_quantile(size: float, moves: str) -> None:
    # Four updates of norm 10 against a norm of 1, all clipped: the norm grows towards the median of
    # the update norms; four of norm 0.1, none clipped: it shrinks. (Flower's own adaptive clipping
    # moves it the other way: flwr/serverapp/strategy/dp_adaptive_clipping.py, _geometric_update.)
    strategy = central_strategy("federation.num_clients=4", "federation.clients_per_round=4",
                                "privacy.central.clipping=adaptive", "privacy.central.noise_multiplier=1e-3",
                                "privacy.central.clipped_count_stddev=0.01")
    update = np.zeros(SIZE)
    update[0] = size
    one_round(strategy, [update] * 4, [1] * 4)
    unclipped = 0.0 if moves == "up" else 1.0
    assert strategy.clipping_norm == pytest.approx(np.exp(-0.2 * (unclipped - 0.5)), rel=1e-3)
    # An aggregate the server then discards (non-finite: fedtune/server/round.py) and replaces with
    # the noise alone does not count the round twice: one noisy count a round, as accounted.
    moved = strategy.clipping_norm
    noise_alone(strategy, server_round=1)
    assert strategy.clipping_norm == moved


@pytest.mark.usefixtures("server_identity")
def test_by_default_the_draw_and_the_noise_do_not_follow_the_seed() -> None:
    # The seed is in every run's config.json: noise derived from it could be regenerated and
    # subtracted. By default both generators are seeded from OS entropy, and never saved.
    cfg = central_config("federation.num_clients=1000", "federation.clients_per_round=500",
                         "privacy.central.reproducible=false")
    first, second = build_strategy(cfg), build_strategy(cfg)
    assert isinstance(first, CentralDP) and isinstance(second, CentralDP)
    assert drawn(first, 1, 1000) != drawn(second, 1, 1000)
    assert not np.array_equal(noise_alone(first), noise_alone(second))
    seeded = CentralRandomness(seed=cfg.seed)
    assert not np.array_equal(first.randomness.noise.random(8), seeded.noise.random(8))
    assert not np.array_equal(first.randomness.draws.random(8), seeded.draws.random(8))
    _, scalars = strategy_state(first)
    assert not any(key.endswith("randomness") for key in scalars)  # nothing of them goes into the checkpoint
    assert first.randomness.state() is None


@pytest.mark.usefixtures("server_identity")
def test_reproducible_draws_repeat_and_a_restored_state_continues_them() -> None:
    cfg = central_config("federation.num_clients=8", "federation.clients_per_round=4")
    first, second = build_strategy(cfg), build_strategy(cfg)
    assert isinstance(first, CentralDP) and isinstance(second, CentralDP)
    draws = [drawn(first, r, 8) for r in range(1, 6)]
    assert draws == [drawn(second, r, 8) for r in range(1, 6)] and len({len(d) for d in draws}) > 1
    assert np.array_equal(noise_alone(first), noise_alone(second))
    # As a checkpoint saves it (JSON), and a resumed server, built afresh, restores it.
    tensors, scalars = strategy_state(first)
    resumed = build_strategy(cfg)
    assert isinstance(resumed, CentralDP)
    restore_strategy_state(resumed, tensors, json.loads(json.dumps(scalars)))
    assert [drawn(resumed, r, 8) for r in range(6, 11)] == [drawn(first, r, 8) for r in range(6, 11)]
    assert np.array_equal(noise_alone(resumed), noise_alone(first))
    # A generator state that is not one is refused, naming it.
    broken = json.loads(json.dumps(scalars))
    broken["0/randomness"]["draws"] = {"bit_generator": "MT19937", "state": "x"}
    with pytest.raises(ValueError, match="central DP's generator 'draws'"):
        restore_strategy_state(build_strategy(cfg), tensors, broken)
    secret = build_strategy(central_config("privacy.central.reproducible=false"))
    with pytest.raises(ValueError, match="privacy.central.reproducible is off"):
        restore_strategy_state(secret, tensors, scalars)


def test_an_empty_draw_moves_the_model_and_a_resumed_run_continues_the_same_draws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without SecAgg+: a round that draws nobody releases the model plus the noise; two runs of one
    seed (privacy.central.reproducible) draw the same clients and the same noise, and a run killed
    after round 2 trained and resumed from its checkpoint ends with the uninterrupted run's model."""
    from safetensors.torch import load_file

    def config(name: str) -> ExperimentConfig:
        # Seed 391 draws 0, 2 and 1 of the 4 clients in rounds 1 to 3 (each with probability 1/2).
        return load_config(REPO / "configs/quickstart.yaml", [
            "seed=391", "data.image_size=32", "federation.num_clients=4", "federation.clients_per_round=2",
            "federation.rounds=3", "train.unfreeze=[]", "privacy.central.enabled=true",
            "privacy.central.noise_multiplier=0.5", "privacy.central.clipping_norm=5",
            "privacy.central.reproducible=true", f"output.dir={tmp_path / name}",
        ])

    uninterrupted = simulate(config("a"))
    history = RunDirectory.load_history(uninterrupted.run_dir / "history.json")
    assert [r.clients_sampled for r in history[1:]] == [0, 2, 1]
    assert all(r.clients_ok == r.clients_sampled for r in history[1:])
    # Every round released the model plus noise: it moved, the empty draw's round included.
    assert len({r.central_loss for r in history}) == len(history)
    user = json.loads((uninterrupted.run_dir / "privacy.json").read_text())["user_level"]
    assert user["randomness"].startswith("reproducible: the client draw and the noise follow the run's seed (391")
    assert user["every_round"].startswith("every round releases the model plus the noise")

    cfg = config("b")
    run_dir = crash_in_round(monkeypatch, cfg, crashed_round=2)
    resumed = simulate(cfg)
    assert resumed.run_dir == run_dir and resumed.rounds_completed == 3
    replayed = RunDirectory.load_history(run_dir / "history.json")
    assert [r.clients_sampled for r in replayed] == [r.clients_sampled for r in history]
    final, expected = load_file(run_dir / "model.safetensors"), load_file(uninterrupted.run_dir / "model.safetensors")
    assert final.keys() == expected.keys() and all(np.array_equal(final[k], expected[k]) for k in final)
