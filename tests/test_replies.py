"""Every client reply parsed at the edge, train and evaluate alike: the worst version of each, and why it is out."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from replies import TRAIN_METRICS, error_reply, evaluate_reply, flower_reason, instruction, train_reply

from fedtune import messages as keys
from fedtune.strategies.validation import (
    MAX_METRICS,
    PERSONAL_EVALUATE_METRICS,
    UnusableReply,
    check_evaluate_replies,
    check_train_replies,
    parse_evaluate_content,
    parse_train_content,
    specs_of,
    train_metric_specs,
)
from fedtune.text import concise_reason, printable

pytestmark = pytest.mark.usefixtures("server_identity")

GOOD = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
NON_FINITE = "holds non-finite values (NaN or inf)"
METRICS = train_metric_specs(dp_sgd=False)


@pytest.fixture
def expected() -> dict:
    return specs_of(ArrayRecord({k: Array(v) for k, v in GOOD.items()}))


def _train_problem(reply: Message, expected: dict, metrics: dict = METRICS) -> str | None:
    try:
        parse_train_content(reply.content, expected, metrics)
    except UnusableReply as problem:
        return str(problem)
    return None


def _evaluate_problem(reply: Message) -> str | None:
    try:
        parse_evaluate_content(reply.content)
    except UnusableReply as problem:
        return str(problem)
    return None


def _with(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {**GOOD, key: value}


def _npy(shape: tuple[int, ...], dtype: str, data: bytes) -> Array:
    """An Array whose .npy header claims `shape` and `dtype`, followed by `data` (a lying client's bytes)."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": dtype, "fortran_order": False, "shape": shape})
    return Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=stream.getvalue() + data)


def _reply_with_b(array: Array) -> Message:
    content = RecordDict({
        keys.ARRAYS: ArrayRecord({"w": Array(GOOD["w"]), "b": array}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3, **TRAIN_METRICS}),
    })
    return Message(content, reply_to=instruction(1))


# --- train replies: tensors -------------------------------------------------------------------


def test_specs_of_records_names_shapes_and_dtypes(expected: dict) -> None:
    assert list(expected) == ["w", "b"]
    assert expected["w"].shape == (2, 3)
    assert expected["w"].dtype == np.dtype(np.float32)


def test_a_good_reply_is_rebuilt_with_exactly_the_expected_records(expected: dict) -> None:
    reply = train_reply(GOOD, extra=RecordDict({"notes": ConfigRecord({"free": "text" * 1000})}))
    parsed, ignored = parse_train_content(reply.content, expected, METRICS)
    assert ignored == []
    assert list(parsed.array_records) == [keys.ARRAYS] and list(parsed.metric_records) == [keys.METRICS]
    assert not parsed.config_records  # whatever else the client added is gone
    for key, value in GOOD.items():
        np.testing.assert_array_equal(parsed[keys.ARRAYS][key].numpy(), value)
    assert dict(parsed[keys.METRICS]) == {keys.NUM_EXAMPLES: 10, **TRAIN_METRICS}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (_with("w", np.array([[0, np.nan, 0], [0, 0, 0]], np.float32)), f"tensor 'w' {NON_FINITE}"),
        (_with("b", np.array([0, np.inf, 0], np.float32)), f"tensor 'b' {NON_FINITE}"),
        (_with("b", np.array([0, -np.inf, 0], np.float32)), f"tensor 'b' {NON_FINITE}"),
        (_with("w", np.zeros((3, 2), np.float32)), "tensor 'w' has shape (3, 2), expected (2, 3)"),
        (_with("b", np.zeros(3, np.float64)), "tensor 'b' has dtype float64, expected float32"),
        (_with("b", np.zeros(3, ">f4")), "tensor 'b' has dtype >f4, expected float32"),
        ({"w": GOOD["w"]}, "missing tensors ['b']"),
        (_with("extra", np.zeros(1, np.float32)), "unexpected tensors ['extra']"),
    ],
    ids=["nan", "inf", "-inf", "shape", "dtype", "byte-order", "missing", "extra"],
)
def test_a_malformed_tensor_is_named(expected: dict, arrays: dict[str, np.ndarray], message: str) -> None:
    assert _train_problem(train_reply(arrays), expected) == message


def test_many_missing_or_extra_tensors_are_abbreviated() -> None:
    expected = specs_of(ArrayRecord({f"t{i}": Array(np.zeros(1, np.float32)) for i in range(5)}))
    assert _train_problem(train_reply({"t0": np.zeros(1, np.float32)}), expected) == (
        "missing tensors ['t1', 't2', 't3'] ..."
    )
    flood = {f"x{i}": np.zeros(1, np.float32) for i in range(2000)}
    assert _train_problem(train_reply({**flood, **{f"t{i}": np.zeros(1, np.float32) for i in range(5)}}),
                          expected) == "unexpected tensors ['x0', 'x1', 'x10'] ..."


def test_undecodable_bytes_are_named(expected: dict) -> None:
    broken = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"\x00garbage")
    problem = _train_problem(_reply_with_b(broken), expected)
    assert problem is not None and problem.startswith("tensor 'b' cannot be decoded: ")


def test_a_header_claiming_a_huge_tensor_is_refused_before_numpy_allocates_it(expected: dict) -> None:
    # numpy's loader allocates what the header declares before reading: 4 TB here.
    lying = _npy((10**12,), "<f4", b"\x00" * 12)
    started = time.monotonic()
    assert _train_problem(_reply_with_b(lying), expected) == "tensor 'b' has shape (1000000000000,), expected (3,)"
    assert time.monotonic() - started < 1.0


def test_an_object_array_is_refused_without_unpickling(expected: dict) -> None:
    pickled = _npy((3,), "|O", b"cos\nsystem\n(S'echo owned'\ntR.")
    assert _train_problem(_reply_with_b(pickled), expected) == "tensor 'b' has dtype object, expected float32"


def test_a_tensor_carrying_far_more_bytes_than_its_shape_is_refused(expected: dict) -> None:
    padded = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"\x00" * 10_000_000)
    assert _train_problem(_reply_with_b(padded), expected) == "tensor 'b' carries 10000000 bytes, expected about 12"


def test_a_negative_running_variance_is_refused() -> None:
    expected = specs_of(ArrayRecord({"bn.running_var": Array(np.ones(4, np.float32))}))
    reply = train_reply({"bn.running_var": np.array([1, -0.5, 1, 1], np.float32)})
    assert _train_problem(reply, expected) == (
        "tensor 'bn.running_var' holds negative values: it is a BatchNorm running variance"
    )


# --- train replies: records and metrics -------------------------------------------------------


@pytest.mark.parametrize(
    ("num_examples", "shown"),
    [(0, "0"), (-5, "-5"), (10.0, "10.0"), (2.5, "2.5"), ([10], "a list of 1 values"), (2**60, str(2**60))],
    ids=["zero", "negative", "float", "fraction", "list", "beyond-2**53"],
)
def test_num_examples_must_be_a_positive_integer(expected: dict, num_examples: object, shown: str) -> None:
    problem = _train_problem(train_reply(GOOD, num_examples), expected)
    assert problem == f"metric 'num-examples' must be a positive integer up to 2**53, got {shown}"


def test_num_examples_missing_is_named(expected: dict) -> None:
    reply = train_reply(GOOD, metrics=dict(TRAIN_METRICS))
    assert _train_problem(reply, expected) == "metric 'num-examples' is missing"


def test_num_examples_as_bool_is_refused_by_flower_itself() -> None:
    with pytest.raises(TypeError, match="bool"):
        MetricRecord({keys.NUM_EXAMPLES: True})


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"train_loss": [0.1, 0.2]}, "metric 'train_loss' must be a finite number >= 0, got a list of 2 values"),
        ({"train_loss": float("nan")}, "metric 'train_loss' must be a finite number >= 0, got nan"),
        ({"train_loss": float("inf")}, "metric 'train_loss' must be a finite number >= 0, got inf"),
        ({"train_loss": -1.0}, "metric 'train_loss' must be a finite number >= 0, got -1.0"),
        ({"train_accuracy": 1.5}, "metric 'train_accuracy' must be a number in [0, 1], got 1.5"),
        ({"train_accuracy": None}, "metric 'train_accuracy' is missing"),
    ],
    ids=["list", "nan", "inf", "negative", "accuracy-above-1", "missing"],
)
def test_a_bad_metric_is_named(expected: dict, metrics: dict, message: str) -> None:
    values = {keys.NUM_EXAMPLES: 10, **TRAIN_METRICS, **metrics}
    values = {k: v for k, v in values.items() if v is not None}
    assert _train_problem(train_reply(GOOD, metrics=values), expected) == message


def test_an_unknown_metric_is_dropped_and_named(expected: dict) -> None:
    reply = train_reply(GOOD, metrics={keys.NUM_EXAMPLES: 10, **TRAIN_METRICS, "loss_per_class": [0.1, 0.2],
                                       "\x1b[31mfake\nlog line": 1.0})
    parsed, ignored = parse_train_content(reply.content, expected, METRICS)
    assert set(parsed[keys.METRICS]) == {keys.NUM_EXAMPLES, *TRAIN_METRICS}
    assert ignored == ["\x1b[31mfake\nlog line", "loss_per_class"]


def test_a_metric_record_of_a_million_keys_is_refused(expected: dict) -> None:
    flood = MetricRecord({f"m{i}": 0.0 for i in range(10**6)})
    content = RecordDict({keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in GOOD.items()}), keys.METRICS: flood})
    problem = _train_problem(Message(content, reply_to=instruction(1)), expected)
    assert problem == f"its MetricRecord holds 1000000 metrics, more than {MAX_METRICS}"


def test_dp_sgd_runs_require_the_clients_privacy_figures(expected: dict) -> None:
    dp = train_metric_specs(dp_sgd=True)
    assert _train_problem(train_reply(GOOD), expected, dp) == "metric 'epsilon' is missing"
    figures = {keys.EPSILON: 1.5, keys.NOISE_MULTIPLIER: 1.1, keys.SAMPLE_RATE: 0.1}
    good = train_reply(GOOD, metrics={keys.NUM_EXAMPLES: 10, **TRAIN_METRICS, **figures})
    assert _train_problem(good, expected, dp) is None
    bad = train_reply(GOOD, metrics={keys.NUM_EXAMPLES: 10, **TRAIN_METRICS, **figures, keys.SAMPLE_RATE: 3.0})
    assert _train_problem(bad, expected, dp) == "metric 'dp-sample-rate' must be a number in [0, 1], got 3.0"


def test_two_array_records_are_refused(expected: dict) -> None:
    extra = RecordDict({"other": ArrayRecord({"w": Array(GOOD["w"])})})
    assert _train_problem(train_reply(GOOD, extra=extra), expected) == (
        "expected one ArrayRecord 'arrays', got ['arrays', 'other']"
    )


def test_an_array_record_under_another_name_is_refused(expected: dict) -> None:
    content = RecordDict({"weights": ArrayRecord({k: Array(v) for k, v in GOOD.items()}),
                          keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3, **TRAIN_METRICS})})
    problem = _train_problem(Message(content, reply_to=instruction(1)), expected)
    assert problem == "expected one ArrayRecord 'arrays', got ['weights']"


def test_no_metric_record_is_refused(expected: dict) -> None:
    assert _train_problem(train_reply(GOOD, None), expected) == "expected one MetricRecord, got 0"


def test_two_metric_records_are_refused(expected: dict) -> None:
    extra = RecordDict({"more": MetricRecord({keys.NUM_EXAMPLES: 3})})
    assert _train_problem(train_reply(GOOD, extra=extra), expected) == "expected one MetricRecord, got 2"


# --- evaluate replies -------------------------------------------------------------------------

GOOD_EVALUATION = {keys.NUM_EXAMPLES: 20, "loss": 0.4, "accuracy": 0.9}


def test_a_good_evaluate_reply_is_rebuilt_with_its_metrics_only() -> None:
    parsed, ignored = parse_evaluate_content(evaluate_reply({**GOOD_EVALUATION, "f1": 0.8}).content)
    assert dict(parsed[keys.METRICS]) == GOOD_EVALUATION and ignored == ["f1"]
    assert not parsed.array_records and not parsed.config_records


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({keys.NUM_EXAMPLES: None}, "metric 'num-examples' is missing"),
        ({keys.NUM_EXAMPLES: -5}, "metric 'num-examples' must be a positive integer up to 2**53, got -5"),
        ({keys.NUM_EXAMPLES: 0}, "metric 'num-examples' must be a positive integer up to 2**53, got 0"),
        ({keys.NUM_EXAMPLES: 7.5}, "metric 'num-examples' must be a positive integer up to 2**53, got 7.5"),
        ({"accuracy": [0.9, 0.8]}, "metric 'accuracy' must be a number in [0, 1], got a list of 2 values"),
        ({"accuracy": 2.0}, "metric 'accuracy' must be a number in [0, 1], got 2.0"),
        ({"loss": float("nan")}, "metric 'loss' must be a finite number >= 0, got nan"),
        ({"loss": None}, "metric 'loss' is missing"),
    ],
    ids=["no-num-examples", "num-examples--5", "num-examples-0", "num-examples-float", "list", "accuracy-2",
         "nan-loss", "no-loss"],
)
def test_a_bad_evaluate_metric_is_named(metrics: dict, message: str) -> None:
    values = {k: v for k, v in {**GOOD_EVALUATION, **metrics}.items() if v is not None}
    assert _evaluate_problem(evaluate_reply(values)) == message


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({}, "metric 'personal_loss' is missing"),
        ({"personal_loss": 0.2}, "metric 'personal_accuracy' is missing"),
        ({"personal_loss": 0.2, "personal_accuracy": 1.5}, "metric 'personal_accuracy' must be a number in [0, 1]"),
        ({"personal_loss": -1.0, "personal_accuracy": 0.5}, "metric 'personal_loss' must be a finite number >= 0"),
    ],
    ids=["neither", "no-accuracy", "accuracy-1.5", "negative-loss"],
)
def test_under_personalization_an_evaluate_reply_must_carry_its_own_models_metrics(
        metrics: dict, message: str) -> None:
    with pytest.raises(UnusableReply) as refused:
        parse_evaluate_content(evaluate_reply({**GOOD_EVALUATION, **metrics}).content, PERSONAL_EVALUATE_METRICS)
    assert str(refused.value).startswith(message)
    parsed, _ = parse_evaluate_content(evaluate_reply(
        {**GOOD_EVALUATION, "personal_loss": 0.2, "personal_accuracy": 1.0}).content, PERSONAL_EVALUATE_METRICS)
    assert parsed[keys.METRICS]["personal_accuracy"] == 1.0


def test_evaluate_reply_records_must_be_one_metric_record() -> None:
    assert _evaluate_problem(evaluate_reply(None)) == "expected one MetricRecord, got 0"
    two = evaluate_reply(GOOD_EVALUATION, extra=RecordDict({"more": MetricRecord({"x": 1.0})}))
    assert _evaluate_problem(two) == "expected one MetricRecord, got 2"
    tensors = evaluate_reply(GOOD_EVALUATION, extra=RecordDict({"arrays": ArrayRecord({"w": Array(GOOD["w"])})}))
    assert _evaluate_problem(tensors) == "an evaluate reply carries no tensors, got ['arrays']"
    flood = evaluate_reply({**GOOD_EVALUATION, **{f"m{i}": 1.0 for i in range(100)}})
    assert _evaluate_problem(flood) == f"its MetricRecord holds 103 metrics, more than {MAX_METRICS}"


# --- a round's replies: sorted, logged, and aggregated by Flower without surprises -----------


def test_check_train_replies_separates_valid_rejected_and_failed(expected: dict,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    good = train_reply(GOOD, node=1)
    bad = train_reply(_with("w", np.full((2, 3), np.nan, np.float32)), node=2)
    failed = error_reply(flower_reason("no data"), node=3)

    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        result = check_train_replies([good, bad, failed], expected, metrics=METRICS, server_round=4,
                                     name_of=lambda node: f"site-{node}")

    assert result.valid == [good]
    assert result.rejected == [bad]
    assert result.failed == [failed]
    assert result.problems == {2: f"tensor 'w' {NON_FINITE}", 3: "no data"}
    logged = [record.getMessage() for record in caplog.records]
    assert f"round 4: rejected the train reply of site-2: tensor 'w' {NON_FINITE}" in logged
    assert "round 4: site-3 failed its train: no data" in logged


def test_an_empty_update_is_refused_under_central_dp(expected: dict) -> None:
    sent = ArrayRecord({k: Array(v) for k, v in GOOD.items()})
    result = check_train_replies([train_reply(GOOD, node=4)], expected, metrics=METRICS, server_round=1, name_of=str,
                                 reject_unchanged=sent)
    assert result.problems == {4: "the update is empty: the tensors are exactly those sent"}


def test_one_extra_or_list_valued_metric_no_longer_stops_flowers_aggregation(
    expected: dict, caplog: pytest.LogCaptureFixture
) -> None:
    # Flower's FedAvg raises InconsistentMessageReplies unless every reply has the same metric keys:
    # before parsing, one extra key from one client ended the run in round 1.
    replies = [
        train_reply(GOOD, node=1),
        train_reply(GOOD, node=2, metrics={keys.NUM_EXAMPLES: 30, **TRAIN_METRICS, "extra": 1.0}),
        train_reply(GOOD, node=3, metrics={keys.NUM_EXAMPLES: 30, **TRAIN_METRICS, "per_class": [0.5, 0.5]}),
    ]
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        result = check_train_replies(replies, expected, metrics=METRICS, server_round=1, name_of=str)
    arrays, metrics = FedAvg().aggregate_train(1, result.valid)
    assert arrays is not None and metrics is not None and set(metrics) == set(TRAIN_METRICS)
    assert "round 1: ignored unknown metrics ['extra'] in the train reply of 2" in caplog.text
    assert "round 1: ignored unknown metrics ['per_class'] in the train reply of 3" in caplog.text


def test_malformed_evaluate_replies_are_left_out_and_the_rest_aggregate(caplog: pytest.LogCaptureFixture) -> None:
    replies = [
        evaluate_reply(GOOD_EVALUATION, node=1),
        evaluate_reply({**GOOD_EVALUATION, "extra": 1.0}, node=2),
        evaluate_reply({"loss": 0.1, "accuracy": 0.5}, node=3),
        evaluate_reply({**GOOD_EVALUATION, keys.NUM_EXAMPLES: -5}, node=4),
        evaluate_reply({**GOOD_EVALUATION, "accuracy": [1.0]}, node=5),
        error_reply(flower_reason("no validation examples"), node=6, message_type=MessageType.EVALUATE),
    ]
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        result = check_evaluate_replies(replies, server_round=2, name_of=lambda node: f"node {node}")
    assert sorted(r.metadata.src_node_id for r in result.valid) == [1, 2]
    assert sorted(result.problems) == [3, 4, 5, 6]
    assert len(result.rejected) == 3 and len(result.failed) == 1
    metrics = FedAvg().aggregate_evaluate(2, result.valid)
    assert metrics is not None and metrics["accuracy"] == pytest.approx(0.9)
    assert ("round 2: rejected the evaluate reply of node 4: metric 'num-examples' must be a positive integer up to "
            "2**53, got -5") in caplog.text
    assert "round 2: node 6 failed its evaluate: no validation examples" in caplog.text


# --- concise_reason: a client's error message, bounded and printable --------------------------


def test_concise_reason_extracts_the_client_message_from_flowers_wrapper() -> None:
    reason = flower_reason("data root missing")
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
    assert concise_reason(flower_reason("data root missing\nsee the docs")) == "data root missing"


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
    assert concise_reason(flower_reason("")) == "no reason given"


def test_concise_reason_of_an_error_without_a_reason() -> None:
    assert concise_reason(None) == "no reason given"  # Flower's Error allows it, and a peer may send it


def test_concise_reason_is_bounded_even_for_a_huge_reason() -> None:
    assert len(concise_reason(flower_reason("x" * 2000))) == 503  # 500 characters and "..."
    assert len(concise_reason("y" * 2000)) == 503
    huge = "z" * 50_000_000
    started = time.monotonic()
    assert len(concise_reason(flower_reason(huge))) == 503 and len(concise_reason(huge)) == 503
    assert time.monotonic() - started < 2.0


def test_concise_reason_replaces_terminal_escapes_and_control_characters() -> None:
    assert concise_reason(flower_reason("\x1b[2J\x1b[31mall good\x07\x00")) == "?[2J?[31mall good??"


def test_evaluate_metrics_average_alike_whichever_reply_arrives_first() -> None:
    # Floating-point sums depend on their order: replies are taken in an order of their content.
    replies = [evaluate_reply({keys.NUM_EXAMPLES: n, "loss": 1 / (n + 0.3), "accuracy": (n % 7) / 7}, node=n)
               for n in range(1, 40)]
    forward = check_evaluate_replies(replies, server_round=1, name_of=str).valid
    backward = check_evaluate_replies(list(reversed(replies)), server_round=1, name_of=str).valid
    assert [r.metadata.src_node_id for r in forward] == [r.metadata.src_node_id for r in backward]
    assert FedAvg().aggregate_evaluate(1, forward) == FedAvg().aggregate_evaluate(1, backward)


def test_a_peers_text_never_writes_lines_of_its_own_into_a_log() -> None:
    forged = "ok\n12:00:00 ERROR forged\x1b[2J" + "a" * 100
    assert printable(forged, 30) == "ok?12:00:00 ERROR forged?[2Jaa..."
    assert printable(forged, 30, escaped=True) == "ok\\n12:00:00 ERROR forged\\x1b[2Jaa..."
    assert printable("short", 30) == printable("short", 30, escaped=True) == "short"
