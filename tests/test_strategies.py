"""Strategies: the registry, each registered name, partial server optimisers, Byzantine-robust rules, state."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import Bulyan, FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum
from replies import error_reply, train_reply

from fedtune import messages as keys
from fedtune.config import ConfigError, ExperimentConfig, parse_config
from fedtune.strategies import PartialFedAdam, PartialFedYogi, build_strategy, restore_strategy_state, strategy_state
from fedtune.strategies.registry import STRATEGIES, register
from fedtune.strategies.validation import check_train_replies, specs_of, train_metric_specs

pytestmark = pytest.mark.usefixtures("server_identity")

_reply = train_reply
_error_reply = error_reply


def test_replies_carry_the_node_and_run_of_their_instruction() -> None:
    reply = _reply({"w": np.zeros(2, np.float32)}, node=5)
    assert reply.metadata.src_node_id == 5
    assert reply.metadata.dst_node_id == 0
    assert reply.metadata.run_id == 7
    assert not reply.has_error()


# --- the registry -----------------------------------------------------------------------------


def test_every_strategy_name_of_the_config_is_registered() -> None:
    from typing import get_args

    from fedtune.config import StrategyConfig

    names = set(get_args(StrategyConfig.model_fields["name"].annotation))
    assert names == set(STRATEGIES)


def test_registering_a_name_twice_is_refused_and_keeps_the_first() -> None:
    first = STRATEGIES["fedavg"]
    with pytest.raises(ValueError, match="strategy 'fedavg' is already registered"):
        register("fedavg")(lambda cfg, buffer_keys: FedAvg())
    assert STRATEGIES["fedavg"] is first


# --- build_strategy ---------------------------------------------------------------------------


def _config(name: str, **federation: object) -> ExperimentConfig:
    return parse_config(
        {
            "federation": {"num_clients": 10, "clients_per_round": 4, **federation},
            "train": {"lr": 0.03},
            "strategy": {"name": name, "proximal_mu": 0.2, "eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-4},
        }
    )


@pytest.mark.parametrize(
    ("name", "kind"),
    [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", PartialFedAdam), ("fedyogi", PartialFedYogi)],
)
def test_build_strategy_builds_each_registered_name(name: str, kind: type) -> None:
    strategy = build_strategy(_config(name))
    assert type(strategy) is kind


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi"])
def test_build_strategy_samples_clients_per_round(name: str) -> None:
    strategy = build_strategy(_config(name))
    assert strategy.fraction_train == pytest.approx(0.4)
    assert strategy.min_train_nodes == 4
    assert strategy.fraction_evaluate == pytest.approx(0.4)
    assert strategy.min_evaluate_nodes == 4
    assert strategy.min_available_nodes == 10


def test_build_strategy_samples_everyone_without_clients_per_round() -> None:
    cfg = parse_config({"federation": {"num_clients": 6}})
    strategy = build_strategy(cfg)
    assert strategy.fraction_train == pytest.approx(1.0)
    assert strategy.min_train_nodes == 6
    assert strategy.min_available_nodes == 6


def test_build_strategy_skips_federated_evaluation_without_validation_data() -> None:
    cfg = parse_config({"federation": {"num_clients": 10, "clients_per_round": 4}, "data": {"val_fraction": 0.0}})
    strategy = build_strategy(cfg)
    assert strategy.fraction_evaluate == 0.0
    assert strategy.min_evaluate_nodes == 0


def test_build_strategy_passes_fedprox_mu() -> None:
    strategy = build_strategy(_config("fedprox"))
    assert isinstance(strategy, FedProx)
    assert strategy.proximal_mu == pytest.approx(0.2)


@pytest.mark.parametrize(("name", "base"), [("fedadam", FedAdam), ("fedyogi", FedYogi)])
def test_build_strategy_configures_the_server_optimiser(name: str, base: type) -> None:
    buffers = frozenset({"stages.conv_head.1.running_mean"})
    strategy = build_strategy(_config(name), buffer_keys=buffers)
    assert isinstance(strategy, base)
    assert strategy.eta == pytest.approx(0.05)
    assert strategy.eta_l == pytest.approx(0.03)  # the clients' learning rate
    assert (strategy.beta_1, strategy.beta_2, strategy.tau) == pytest.approx((0.8, 0.95, 1e-4))
    assert strategy.buffer_keys == buffers


def test_build_strategy_rejects_an_unknown_name() -> None:
    # The config's Literal already refuses unknown names; a config copied without validation
    # (model_copy) still must not reach a KeyError.
    cfg = _config("fedavg")
    unchecked = cfg.model_copy(update={"strategy": cfg.strategy.model_copy(update={"name": "fedsgd"})})
    known = "bulyan, fedadam, fedavg, fedmedian, fedprox, fedtrimmedavg, fedyogi, krum, multikrum"
    with pytest.raises(ValueError, match=f"unknown strategy 'fedsgd'; known: {known}"):
        build_strategy(unchecked)


# --- partial, growing updates for FedAdam / FedYogi -------------------------------------------


def _start_round(strategy: FedAdam, arrays: dict[str, np.ndarray]) -> None:
    # FedOpt.configure_train(server_round, arrays, config, grid) records the global arrays it sends
    # as `current_arrays = {k: array.numpy() for k, array in arrays.items()}` before sampling nodes
    # from the Grid. The sampling needs a live Grid and plays no part in aggregation, so only the
    # recording is reproduced here, through the same ArrayRecord round trip.
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    strategy.current_arrays = {k: array.numpy() for k, array in record.items()}


def _fedopt(name: str, buffer_keys: frozenset[str] = frozenset()) -> FedAdam:
    cfg = parse_config({"federation": {"num_clients": 2}, "strategy": {"name": name}})
    return build_strategy(cfg, buffer_keys=buffer_keys)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_the_trainable_set_may_grow_between_rounds(name: str) -> None:
    strategy = _fedopt(name)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 2)).astype(np.float32)

    # Round 1: only "a" trains.
    _start_round(strategy, {"a": a})
    round_1 = [_reply({"a": a + 0.1}, 10, node=1), _reply({"a": a - 0.3}, 30, node=2)]
    arrays, metrics = strategy.aggregate_train(1, round_1)
    assert arrays is not None and set(arrays) == {"a"}
    assert metrics is not None
    a = arrays["a"].numpy()

    # Round 2: the unfreeze schedule adds "b".
    b = rng.normal(size=(4,)).astype(np.float32)
    _start_round(strategy, {"a": a, "b": b})
    round_2 = [_reply({"a": a + 0.2, "b": b + 0.5}, 10, node=1), _reply({"a": a + 0.1, "b": b - 0.1}, 30, node=2)]
    arrays, _ = strategy.aggregate_train(2, round_2)

    assert arrays is not None and set(arrays) == {"a", "b"}
    new_b = arrays["b"].numpy()
    assert new_b.shape == b.shape
    assert np.isfinite(new_b).all()
    assert np.isfinite(arrays["a"].numpy()).all()
    # Zero moments before this round: b's first step has the sign of its averaged update (+0.05).
    assert (new_b > b).all()


def test_plain_fedadam_cannot_grow_its_trainable_set() -> None:
    # Why the mixin exists: Flower's FedAdam keeps moments only for the keys it has seen.
    strategy = FedAdam(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    a, b = np.zeros(2, np.float32), np.zeros(3, np.float32)
    _start_round(strategy, {"a": a})
    strategy.aggregate_train(1, [_reply({"a": a + 1}, node=1), _reply({"a": a + 1}, node=2)])
    _start_round(strategy, {"a": a, "b": b})
    with pytest.raises(KeyError, match="b"):
        strategy.aggregate_train(2, [_reply({"a": a, "b": b + 1}, node=1), _reply({"a": a, "b": b + 1}, node=2)])


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_buffers_take_the_weighted_average_and_parameters_the_adaptive_step(name: str) -> None:
    buffer, parameter = "stages.conv_head.1.running_var", "stages.conv_head.0.weight"
    strategy = _fedopt(name, buffer_keys=frozenset({buffer}))
    rng = np.random.default_rng(1)
    start = {
        buffer: rng.uniform(0.5, 1.5, size=8).astype(np.float32),
        parameter: rng.normal(size=(8, 4)).astype(np.float32),
    }
    _start_round(strategy, start)
    updates = [
        {key: value + rng.normal(scale=0.2, size=value.shape).astype(np.float32) for key, value in start.items()}
        for _ in range(3)
    ]
    weights = [10, 30, 60]
    pairs = zip(updates, weights, strict=True)
    replies = [_reply(update, weight, node=node) for node, (update, weight) in enumerate(pairs, 1)]

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    total = sum(weights)
    average = {key: sum(u[key] * (w / total) for u, w in zip(updates, weights, strict=True)) for key in start}
    np.testing.assert_allclose(arrays[buffer].numpy(), average[buffer], rtol=1e-6, atol=1e-7)
    assert arrays[buffer].numpy().dtype == np.float32
    assert (arrays[buffer].numpy() > 0).all()  # a variance stays a variance
    # The parameter took the server optimiser's step, which is not the plain average.
    assert not np.allclose(arrays[parameter].numpy(), average[parameter], atol=1e-3)
    assert np.isfinite(arrays[parameter].numpy()).all()


def test_buffer_average_leaves_out_failed_replies() -> None:
    buffer = "bn.running_mean"
    strategy = _fedopt("fedadam", buffer_keys=frozenset({buffer}))
    start = {buffer: np.zeros(3, np.float32), "w": np.zeros(3, np.float32)}
    _start_round(strategy, start)
    replies = [
        _reply({buffer: np.full(3, 1.0, np.float32), "w": np.ones(3, np.float32)}, 1, node=1),
        _reply({buffer: np.full(3, 4.0, np.float32), "w": np.ones(3, np.float32)}, 3, node=2),
        _error_reply("boom", node=3),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays[buffer].numpy(), np.full(3, 3.25, np.float32))


# --- Byzantine-robust strategies ----------------------------------------------------------------


def _robust_config(name: str, clients: int = 7, **strategy: object) -> ExperimentConfig:
    return parse_config({"federation": {"num_clients": clients}, "strategy": {"name": name, **strategy}})


@pytest.mark.parametrize(
    ("name", "base"),
    [("fedmedian", FedMedian), ("fedtrimmedavg", FedTrimmedAvg), ("krum", Krum), ("multikrum", MultiKrum),
     ("bulyan", Bulyan)],
)
def test_build_strategy_builds_each_robust_rule_with_its_parameters(name: str, base: type) -> None:
    strategy = build_strategy(_robust_config(name, trim_fraction=0.3, num_malicious=1))
    assert isinstance(strategy, base)
    assert strategy.min_train_nodes == 7 and strategy.fraction_train == pytest.approx(1.0)
    if name == "fedtrimmedavg":
        assert strategy.beta == pytest.approx(0.3)
    if name in ("krum", "multikrum", "bulyan"):
        assert strategy.num_malicious_nodes == 1
    if name == "multikrum":
        assert strategy.num_nodes_to_select == 6  # clients per round - num_malicious
    if name == "krum":
        assert strategy.num_nodes_to_select == 1


@pytest.mark.parametrize(("scheme", "warned"), [("dirichlet", True), ("shards", True), ("iid", False)])
def test_krum_on_non_iid_partitions_says_what_it_costs(scheme: str, warned: bool,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_config({"federation": {"num_clients": 7}, "data": {"partition": {"scheme": scheme}},
                        "strategy": {"name": "krum", "num_malicious": 1}})
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        build_strategy(cfg)
    assert ("keeps one client's update a round" in caplog.text) is warned
    assert ("multikrum averages the best-scored updates instead" in caplog.text) is warned


def test_multikrum_takes_the_configured_number_of_updates() -> None:
    strategy = build_strategy(_robust_config("multikrum", num_malicious=1, num_selected=3))
    assert strategy.num_nodes_to_select == 3


def _parsed(replies: list[Message], sent: dict[str, np.ndarray]) -> list[Message]:
    """The replies as the server hands them to a strategy: parsed at the edge, in the server's key order."""
    expected = specs_of(ArrayRecord({k: Array(v) for k, v in sent.items()}))
    checked = check_train_replies(replies, expected, metrics=train_metric_specs(dp_sgd=False), server_round=1,
                                  name_of=str)
    assert not checked.problems
    return checked.valid


ROBUST = ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"]


@pytest.mark.parametrize("name", ROBUST)
def test_robust_rules_take_partial_updates_whose_keys_grow_between_rounds(name: str) -> None:
    strategy = build_strategy(_robust_config(name))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 2)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    # Round 1: only "a" trains; round 2: unfreezing adds "b". Nothing carries over between rounds.
    round_1 = [_reply({"a": a + rng.normal(scale=0.1, size=a.shape).astype(np.float32)}, node=n) for n in range(7)]
    arrays, metrics = strategy.aggregate_train(1, _parsed(round_1, {"a": a}))
    assert arrays is not None and list(arrays) == ["a"] and metrics is not None
    sent = {"a": arrays["a"].numpy(), "b": b}
    round_2 = [_reply({k: v + np.float32(0.01 * n) for k, v in sent.items()}, node=n) for n in range(7)]
    arrays, _ = strategy.aggregate_train(2, _parsed(round_2, sent))
    assert arrays is not None and list(arrays) == ["a", "b"]
    assert arrays["b"].numpy().shape == (4,) and arrays["b"].numpy().dtype == np.float32
    assert strategy_state(strategy) == ({}, {})  # nothing to checkpoint: a resumed run rebuilds it whole


@pytest.mark.parametrize("name", ROBUST)
def test_robust_rules_keep_out_two_hostile_updates_of_seven(name: str) -> None:
    # f = 2 needs 7 clients for Krum (2f + 3) but 11 for Bulyan (4f + 3): Bulyan is given f = 1,
    # and its Krum stage and coordinate-wise trimming still leave the two far-off updates out.
    f = 1 if name == "bulyan" else 2
    strategy = build_strategy(_robust_config(name, trim_fraction=0.3, num_malicious=f))
    rng = np.random.default_rng(1)
    start = np.zeros(50, np.float32)
    honest = [start + 1.0 + rng.normal(scale=0.05, size=50).astype(np.float32) for _ in range(5)]
    hostile = [start - 1e6, start + rng.normal(scale=1e3, size=50).astype(np.float32)]
    replies = [_reply({"w": w}, 10, node=n) for n, w in enumerate(honest + hostile)]
    arrays, _ = strategy.aggregate_train(1, _parsed(replies, {"w": start}))
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0, atol=0.2)


def test_plain_fedavg_is_taken_over_by_one_hostile_update() -> None:
    # What the robust rules (and the update bound) are for.
    start = np.zeros(50, np.float32)
    replies = [_reply({"w": start + 1.0}, node=n) for n in range(4)] + [_reply({"w": start - 1e6}, node=9)]
    arrays, _ = build_strategy(_robust_config("fedavg")).aggregate_train(1, _parsed(replies, {"w": start}))
    assert arrays is not None and (arrays["w"].numpy() < -1e5).all()


@pytest.mark.parametrize("name", ["krum", "bulyan"])
def test_tensors_are_paired_by_name_whatever_order_a_client_sends_them_in(name: str) -> None:
    # Krum's distances and Bulyan's trimming pair tensors by position; one client sending its two
    # same-shaped tensors in the other order would swap them there. Parsed replies are in the
    # server's order.
    strategy = build_strategy(_robust_config(name, num_malicious=1))
    sent = {"first": np.zeros(4, np.float32), "second": np.zeros(4, np.float32)}
    honest = [{"first": np.full(4, 1.0 + 0.01 * n, np.float32), "second": np.full(4, -1.0, np.float32)}
              for n in range(7)]
    replies = [_reply(update, node=n) for n, update in enumerate(honest)]
    replies[0] = _reply({"second": honest[0]["second"], "first": honest[0]["first"]}, node=0)  # reversed order
    assert list(replies[0].content[keys.ARRAYS]) == ["second", "first"]
    parsed = _parsed(replies, sent)
    assert all(list(reply.content[keys.ARRAYS]) == ["first", "second"] for reply in parsed)
    arrays, _ = strategy.aggregate_train(1, parsed)
    assert arrays is not None
    np.testing.assert_allclose(arrays["first"].numpy(), 1.03, atol=0.031)
    np.testing.assert_allclose(arrays["second"].numpy(), -1.0)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "bulyan"])
def test_coordinate_wise_rules_keep_a_running_variance_a_variance(name: str) -> None:
    strategy = build_strategy(_robust_config(name))
    variance = np.full(8, 1.0, np.float32)
    rng = np.random.default_rng(2)
    replies = [_reply({"bn.running_var": variance * rng.uniform(0.2, 3.0, size=8).astype(np.float32)}, node=n)
               for n in range(7)]
    arrays, _ = strategy.aggregate_train(1, _parsed(replies, {"bn.running_var": variance}))
    assert arrays is not None and (arrays["bn.running_var"].numpy() > 0).all()


def test_multikrum_weights_the_updates_it_chooses_by_num_examples() -> None:
    strategy = build_strategy(_robust_config("multikrum", num_malicious=1, num_selected=2))
    start = np.zeros(3, np.float32)
    updates = [np.full(3, 1.0, np.float32), np.full(3, 1.1, np.float32)] + [np.full(3, v, np.float32)
                                                                               for v in (5.0, 9.0, -7.0, 20.0, -30.0)]
    replies = [_reply({"w": u}, weight, node=n) for n, (u, weight) in enumerate(zip(updates, [10, 30, 1, 1, 1, 1, 1],
                                                                                   strict=True))]
    arrays, _ = strategy.aggregate_train(1, _parsed(replies, {"w": start}))
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), (1.0 * 10 + 1.1 * 30) / 40, rtol=1e-6)


@pytest.mark.parametrize(("name", "clients", "tolerated"), [("bulyan", 5, 0), ("krum", 4, 0), ("bulyan", 2, 0)])
def test_a_round_with_too_few_updates_for_f_lowers_f_and_says_so(
    name: str, clients: int, tolerated: int, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = build_strategy(_robust_config(name, clients=11, num_malicious=1))
    start = np.zeros(3, np.float32)
    replies = [_reply({"w": start + np.float32(1 + 0.01 * n)}, node=n) for n in range(clients)]
    with caplog.at_level("WARNING", logger="fedtune.server"):
        arrays, _ = strategy.aggregate_train(4, _parsed(replies, {"w": start}))
    assert strategy.num_malicious_nodes == 1  # the configured f is back for the next round
    warned = [r.getMessage() for r in caplog.records if r.name == "fedtune.server"]
    assert any(f"round 4: {name}: {clients} usable updates tolerate {tolerated} hostile ones" in m for m in warned)
    if clients >= 3:
        assert arrays is not None
        np.testing.assert_allclose(arrays["w"].numpy(), 1.0, atol=0.05)
    else:
        assert arrays is None  # Bulyan needs 3 updates even for f = 0 (Flower skips the round)


def test_trimmed_mean_says_when_it_cuts_nothing(caplog: pytest.LogCaptureFixture) -> None:
    strategy = build_strategy(_robust_config("fedtrimmedavg", trim_fraction=0.2))
    start = np.zeros(3, np.float32)
    replies = [_reply({"w": start + np.float32(n)}, node=n) for n in range(4)]  # int(0.2 x 4) = 0
    with caplog.at_level("WARNING", logger="fedtune.server"):
        strategy.aggregate_train(2, _parsed(replies, {"w": start}))
    assert "round 2: fedtrimmedavg: trim_fraction 0.2 of 4 usable updates cuts none" in caplog.text


def test_robust_rules_resume_from_a_checkpoint_of_their_empty_state() -> None:
    for name in ROBUST:
        strategy = build_strategy(_robust_config(name))
        tensors, scalars = strategy_state(strategy)
        restore_strategy_state(build_strategy(_robust_config(name)), tensors, scalars)


# --- which strategies fit which settings ------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"federation": {"num_clients": 4}, "strategy": {"name": "krum"}},
         "strategy.num_malicious: krum tolerating 1 hostile clients needs at least 5 clients per round "
         "(2 x num_malicious + 3), but federation.clients_per_round gives 4"),
        ({"federation": {"num_clients": 10, "clients_per_round": 6}, "strategy": {"name": "bulyan"}},
         "strategy.num_malicious: bulyan tolerating 1 hostile clients needs at least 7 clients per round "
         "(4 x num_malicious + 3), but federation.clients_per_round gives 6"),
        ({"federation": {"num_clients": 6}, "strategy": {"name": "multikrum", "num_malicious": 2}},
         "strategy.num_malicious: multikrum tolerating 2 hostile clients needs at least 7"),
        ({"federation": {"num_clients": 6}, "strategy": {"name": "multikrum", "num_selected": 6}},
         "strategy.num_selected: multikrum can average at most clients per round - num_malicious = 5 updates, not 6"),
        ({"federation": {"num_clients": 4}, "strategy": {"name": "fedtrimmedavg", "trim_fraction": 0.2}},
         "strategy.trim_fraction: 0.2 of 4 clients per round cuts no update; at least 0.25 is needed"),
        ({"strategy": {"name": "fedmedian"}, "privacy": {"secure_aggregation": {"enabled": True}}},
         "privacy.secure_aggregation: cannot be combined with strategy fedmedian: it compares single updates"),
        ({"strategy": {"name": "krum"}, "privacy": {"central": {"enabled": True}}},
         "privacy.central: needs strategy fedavg, not krum"),
        ({"strategy": {"bound": {"enabled": True}}, "privacy": {"secure_aggregation": {"enabled": True}}},
         "strategy.bound.enabled: the update bound cannot be combined with privacy.secure_aggregation"),
        ({"strategy": {"bound": {"enabled": True}}, "privacy": {"central": {"enabled": True}}},
         "strategy.bound.enabled: the update bound cannot be combined with privacy.central"),
        ({"strategy": {"bound": {"norm_ratio": 1.0}}}, "strategy.bound.norm_ratio: Input should be greater than 1"),
        ({"strategy": {"bound": {"weight_ratio": 0.5}}},
         "strategy.bound.weight_ratio: Input should be greater than or equal to 1"),
        ({"strategy": {"bound": {"norm_action": "drop"}}}, "strategy.bound.norm_action: Input should be 'reject'"),
        ({"strategy": {"bound": {"enabled": "sometimes"}}}, "strategy.bound.enabled"),
        ({"strategy": {"bound": {"max_examples": 0}}}, "strategy.bound.max_examples"),
    ],
    ids=["krum-too-few", "bulyan-too-few", "multikrum-f2", "multikrum-selected", "trim-none", "secagg-robust",
         "central-krum", "secagg-bound", "central-bound", "norm-ratio", "weight-ratio", "action", "enabled",
         "max-examples"],
)
def test_combinations_that_cannot_hold_are_config_errors_naming_the_keys(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(settings)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "settings",
    [
        {"strategy": {"name": "krum"}, "privacy": {"dp_sgd": {"enabled": True}}},
        {"strategy": {"name": "bulyan"}, "federation": {"num_clients": 7}, "privacy": {"dp_sgd": {"enabled": True}}},
        {"privacy": {"secure_aggregation": {"enabled": True}}},  # bound auto: off, nothing to refuse
        {"privacy": {"central": {"enabled": True}}},
        {"strategy": {"name": "fedadam", "bound": {"enabled": True, "norm_action": "clip"}}},
        {"strategy": {"name": "fedmedian", "bound": {"enabled": False}}},
        {"strategy": {"bound": {"norm_ratio": None, "weight_ratio": None, "max_examples": 500}}},
    ],
    ids=["krum-dp-sgd", "bulyan-dp-sgd", "secagg-auto", "central-auto", "fedadam-clip", "median-unbounded",
         "absolute-cap-only"],
)
def test_combinations_that_hold_are_accepted(settings: dict) -> None:
    parse_config(settings)
