"""Strategies and reply checks: the registry, partial server optimisers, and why a reply is left out."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from fedtune import messages as keys
from fedtune.config import ExperimentConfig, parse_config
from strategies import PartialFedAdam, PartialFedYogi, build_strategy
from strategies.validation import concise_reason, problem_with, sort_replies, specs_of

# --- building real Flower messages ------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("server_identity")


def _instruction(node: int) -> Message:
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}), node, MessageType.TRAIN)


def _reply(
    arrays: dict[str, np.ndarray], num_examples: object = 10, *, node: int = 1, extra: RecordDict | None = None
) -> Message:
    content = RecordDict({keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()})})
    if num_examples is not None:
        content[keys.METRICS] = MetricRecord({keys.NUM_EXAMPLES: num_examples, "train_loss": 0.5})
    for name, record in (extra or {}).items():
        content[name] = record
    return Message(content, reply_to=_instruction(node))


def _error_reply(reason: str, *, node: int) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=_instruction(node))


def _flower_reason(client_message: str) -> str:
    """The reason Flower's simulation engine reports: str(type(ex)) + ":<'" + str(ex) + "'>" (vce_api)."""
    error = ClientAppException(client_message)
    return str(type(error)) + ":<'" + str(error) + "'>"


def test_replies_carry_the_node_and_run_of_their_instruction() -> None:
    reply = _reply({"w": np.zeros(2, np.float32)}, node=5)
    assert reply.metadata.src_node_id == 5
    assert reply.metadata.dst_node_id == 0
    assert reply.metadata.run_id == 7
    assert reply.metadata.message_type == MessageType.TRAIN
    assert not reply.has_error()


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
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'; known: fedadam, fedavg, fedprox, fedyogi"):
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


# --- problem_with: why a reply cannot be aggregated -------------------------------------------

GOOD = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
NON_FINITE = "holds non-finite values (NaN or inf)"


@pytest.fixture
def expected() -> dict:
    return specs_of(ArrayRecord({k: Array(v) for k, v in GOOD.items()}))


def _with(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {**GOOD, key: value}


def test_specs_of_records_names_shapes_and_dtypes(expected: dict) -> None:
    assert set(expected) == {"w", "b"}
    assert expected["w"].shape == (2, 3)
    assert expected["w"].dtype == np.dtype(np.float32)


def test_a_good_reply_has_no_problem(expected: dict) -> None:
    assert problem_with(_reply(GOOD), expected) is None


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (_with("w", np.array([[0, np.nan, 0], [0, 0, 0]], np.float32)), f"tensor 'w' {NON_FINITE}"),
        (_with("b", np.array([0, np.inf, 0], np.float32)), f"tensor 'b' {NON_FINITE}"),
        (_with("b", np.array([0, -np.inf, 0], np.float32)), f"tensor 'b' {NON_FINITE}"),
        (_with("w", np.zeros((3, 2), np.float32)), "tensor 'w' has shape (3, 2), expected (2, 3)"),
        (_with("b", np.zeros(3, np.float64)), "tensor 'b' has dtype float64, expected float32"),
        ({"w": GOOD["w"]}, "missing tensors ['b']"),
        (_with("extra", np.zeros(1, np.float32)), "unexpected tensors ['extra']"),
    ],
    ids=["nan", "inf", "-inf", "shape", "dtype", "missing", "extra"],
)
def test_a_malformed_tensor_is_named(expected: dict, arrays: dict[str, np.ndarray], message: str) -> None:
    assert problem_with(_reply(arrays), expected) == message


def test_many_missing_tensors_are_abbreviated() -> None:
    expected = specs_of(ArrayRecord({f"t{i}": Array(np.zeros(1, np.float32)) for i in range(5)}))
    assert problem_with(_reply({"t0": np.zeros(1, np.float32)}), expected) == "missing tensors ['t1', 't2', 't3'] ..."


@pytest.mark.parametrize(
    ("num_examples", "shown"),
    [(0, "0"), (-5, "-5"), (10.0, "10.0"), (2.5, "2.5"), ([10], "[10]")],
    ids=["zero", "negative", "float", "fraction", "list"],
)
def test_num_examples_must_be_a_positive_integer(expected: dict, num_examples: object, shown: str) -> None:
    problem = problem_with(_reply(GOOD, num_examples), expected)
    assert problem == f"'num-examples' must be a positive integer, got {shown}"


def test_num_examples_missing_is_named(expected: dict) -> None:
    arrays = ArrayRecord({k: Array(v) for k, v in GOOD.items()})
    content = RecordDict({keys.ARRAYS: arrays, keys.METRICS: MetricRecord({"train_loss": 0.1})})
    reply = Message(content, reply_to=_instruction(1))
    assert problem_with(reply, expected) == "'num-examples' must be a positive integer, got None"


def test_num_examples_as_bool_is_refused(expected: dict) -> None:
    # MetricRecord itself refuses bools, so a True weight can never reach aggregation as 1.
    with pytest.raises(TypeError, match="bool"):
        MetricRecord({keys.NUM_EXAMPLES: True})


def test_two_array_records_are_refused(expected: dict) -> None:
    extra = RecordDict({"other": ArrayRecord({"w": Array(GOOD["w"])})})
    problem = problem_with(_reply(GOOD, extra=extra), expected)
    assert problem == "expected one ArrayRecord 'arrays', got ['arrays', 'other']"


def test_an_array_record_under_another_name_is_refused(expected: dict) -> None:
    arrays = ArrayRecord({k: Array(v) for k, v in GOOD.items()})
    content = RecordDict({"weights": arrays, keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3})})
    problem = problem_with(Message(content, reply_to=_instruction(1)), expected)
    assert problem == "expected one ArrayRecord 'arrays', got ['weights']"


def test_no_metric_record_is_refused(expected: dict) -> None:
    assert problem_with(_reply(GOOD, None), expected) == "expected one MetricRecord, got 0"


def test_two_metric_records_are_refused(expected: dict) -> None:
    extra = RecordDict({"more": MetricRecord({keys.NUM_EXAMPLES: 3})})
    assert problem_with(_reply(GOOD, extra=extra), expected) == "expected one MetricRecord, got 2"


def test_undecodable_bytes_are_named(expected: dict) -> None:
    broken = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"\x00garbage")
    content = RecordDict(
        {
            keys.ARRAYS: ArrayRecord({"w": Array(GOOD["w"]), "b": broken}),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3}),
        }
    )
    problem = problem_with(Message(content, reply_to=_instruction(1)), expected)
    assert problem is not None and problem.startswith("tensor 'b' cannot be decoded: ")


# --- sort_replies -----------------------------------------------------------------------------


def test_sort_replies_separates_valid_rejected_and_failed(expected: dict, caplog: pytest.LogCaptureFixture) -> None:
    good = _reply(GOOD, node=1)
    bad = _reply(_with("w", np.full((2, 3), np.nan, np.float32)), node=2)
    failed = _error_reply(_flower_reason("no data"), node=3)

    with caplog.at_level("WARNING", logger="fedtune.server"):
        result = sort_replies([good, bad, failed], expected, server_round=4)

    assert result.valid == [good]
    assert result.rejected == [bad]
    assert result.failed == [failed]
    assert result.problems == {2: f"tensor 'w' {NON_FINITE}", 3: "no data"}
    logged = [record.getMessage() for record in caplog.records]
    assert f"round 4: rejected the update of client 2: tensor 'w' {NON_FINITE}" in logged
    assert "round 4: client 3 failed: no data" in logged


# --- concise_reason ---------------------------------------------------------------------------


def test_concise_reason_extracts_the_client_message_from_flowers_wrapper() -> None:
    reason = _flower_reason("data root missing")
    assert reason.endswith("\nException ClientAppException occurred. Message: data root missing'>")
    assert concise_reason(reason) == "data root missing"


def test_concise_reason_extracts_the_message_from_a_ray_traceback() -> None:
    reason = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() "
        "(pid=4242, ip=127.0.0.1, actor_id=abc)\n"
        "  File \"/venv/lib/python3.11/site-packages/flwr/simulation/ray_transport/ray_actor.py\", line 65, in run\n"
        "    raise ClientAppException(str(ex)) from ex\n"
        "flwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: data root missing'>"
    )
    assert concise_reason(reason) == "data root missing"


def test_concise_reason_keeps_only_the_first_line_of_a_multi_line_client_message() -> None:
    assert concise_reason(_flower_reason("data root missing\nsee the docs")) == "data root missing"


def test_concise_reason_of_a_plain_traceback_is_its_last_line() -> None:
    reason = (
        "Traceback (most recent call last):\n"
        '  File "client/app.py", line 52, in run_training\n'
        "    data = local_data(settings, node)\n"
        "FileNotFoundError: data root missing: /data/ants\n"
        "\n   \n"
    )
    assert concise_reason(reason) == "FileNotFoundError: data root missing: /data/ants"


def test_concise_reason_of_nothing() -> None:
    assert concise_reason("") == "no reason given"
    assert concise_reason("\n  \n") == "no reason given"


def test_concise_reason_is_bounded() -> None:
    assert len(concise_reason(_flower_reason("x" * 2000))) == 500
    assert len(concise_reason("y" * 2000)) == 500
