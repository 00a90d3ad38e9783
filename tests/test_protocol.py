"""What crosses the wire, parsed at the edge: the clients' answers as the server reads them, and the model delivery.

The delivery tests run the server's ModelDelivery against real ClientApps in this process
(tests/server_messages.py LoopbackGrid), each node with its own cache on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from server_messages import LoopbackGrid, Node, global_model, instruction, round_config

from fedtune import messages as keys
from fedtune.protocol import (
    MAX_PARTITION_LABEL,
    RefusedMessage,
    excerpt,
    parse_model_hash,
    parse_query_answer,
    says_model_missing,
)
from fedtune.server.delivery import MAX_DELIVERIES, ModelDelivery

pytestmark = pytest.mark.usefixtures("server_identity")


def _answer(metrics: dict[str, object] | None) -> Message:
    question = Message(RecordDict({keys.CONFIG: ConfigRecord({keys.MODEL_HASH: "0" * 64})}), dst_node_id=5,
                       message_type=MessageType.QUERY)
    content = RecordDict() if metrics is None else RecordDict({keys.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=question)


def test_a_well_formed_answer() -> None:
    answer = parse_query_answer(_answer({keys.HAS_MODEL: 1, keys.PARTITION: 3}))
    assert (answer.has_model, answer.partition, answer.problems) == (True, 3, ())


@pytest.mark.parametrize(("has_model", "partition"), [
    (2, 0), (-1, 0), (1.0, 0), ([1], 0), (None, 0),
    (1, -1), (1, MAX_PARTITION_LABEL + 1), (1, 2**62), (1, 1.5), (1, [3]),
])
def test_a_malformed_answer_is_not_trusted(has_model: object, partition: object) -> None:
    # (A MetricRecord holds numbers and lists of numbers only: Flower itself refuses strings.)
    metrics = {keys.PARTITION: partition} | ({} if has_model is None else {keys.HAS_MODEL: has_model})
    answer = parse_query_answer(_answer(metrics))
    well_formed_has = type(has_model) is int and has_model in (0, 1)
    assert answer.has_model is (well_formed_has and has_model == 1)
    assert answer.partition == (partition if type(partition) is int and 0 <= partition <= MAX_PARTITION_LABEL
                                else None)
    assert answer.problems  # what was wrong is said, for the log line


def test_an_answer_without_metrics_means_no_model() -> None:
    answer = parse_query_answer(_answer(None))
    assert not answer.has_model and answer.partition is None and "no 'metrics' record" in answer.problems[0]


def test_only_an_error_that_begins_as_agreed_says_the_model_is_missing() -> None:
    question = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)

    def error(reason: str) -> Message:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=question)

    assert says_model_missing(error(f"{keys.MODEL_MISSING}: abc is not in this node's cache"))
    assert not says_model_missing(error(f"client: {keys.MODEL_MISSING}"))
    assert not says_model_missing(Message(RecordDict(), reply_to=question))


def test_excerpts_are_short() -> None:
    assert len(excerpt("x" * 10_000_000)) < 80 and "10000002 characters" in excerpt("x" * 10_000_000)
    with pytest.raises(RefusedMessage) as refused:
        parse_model_hash("y" * 10_000_000)
    assert len(str(refused.value)) < 200


# --- The delivery --------------------------------------------------------------------------------


@pytest.fixture
def federation(tmp_path: Path) -> tuple[ModelDelivery, LoopbackGrid]:
    model = global_model()
    nodes = {node_id: Node(cache=tmp_path / f"node-{partition}", partition=partition)
             for partition, node_id in enumerate((1234567890123, 42, 777))}
    delivery = ModelDelivery(model_hash=model.model_hash, backbone=ArrayRecord(model.state), timeout=10.0)
    return delivery, LoopbackGrid(nodes)


def _round(delivery: ModelDelivery, grid: LoopbackGrid, server_round: int) -> list[Message]:
    messages = [instruction(round_config(server_round=server_round), dst_node_id=node) for node in grid.nodes]
    return delivery.send_and_receive(grid, messages)


def test_name_of_uses_the_partition_label_from_the_answer(federation: tuple[ModelDelivery, LoopbackGrid]) -> None:
    delivery, grid = federation
    assert delivery.name_of(1234567890123) == "node 1234567890123"  # before it answered

    delivery.ensure_models(grid, list(grid.nodes))

    assert delivery.name_of(1234567890123) == "client 0 (node 123456…)"
    assert delivery.name_of(42) == "client 1 (node 42)"
    assert delivery.partitions == {1234567890123: 0, 42: 1, 777: 2}


def test_a_node_that_lost_its_model_gets_it_again_and_trains_in_the_same_round(
    federation: tuple[ModelDelivery, LoopbackGrid], caplog: pytest.LogCaptureFixture
) -> None:
    delivery, grid = federation
    assert all(not r.has_error() for r in _round(delivery, grid, 1))
    assert delivery.deliveries == {1234567890123: 1, 42: 1, 777: 1}
    [cached] = grid.nodes[42].model_files()
    cached.unlink()  # the node's disk was cleaned between rounds
    grid.sent.clear()

    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        replies = _round(delivery, grid, 2)

    assert len(replies) == 3 and all(not r.has_error() for r in replies)
    assert {r.metadata.src_node_id for r in replies} == set(grid.nodes)
    assert delivery.deliveries == {1234567890123: 1, 42: 2, 777: 1}
    # train to all, then the query and the delivery to the one that lost it, then its train message again
    assert grid.sent == [(1234567890123, MessageType.TRAIN), (42, MessageType.TRAIN), (777, MessageType.TRAIN),
                         (42, MessageType.QUERY), (42, MessageType.QUERY), (42, MessageType.TRAIN)]
    assert any("client 1 (node 42) lost the model" in r.getMessage() for r in caplog.records)


def test_a_node_that_lost_its_model_and_the_message_is_not_answered_keeps_its_first_reply(
    federation: tuple[ModelDelivery, LoopbackGrid],
) -> None:
    delivery, grid = federation
    _round(delivery, grid, 1)
    grid.nodes[777].model_files()[0].unlink()
    # The node gets the model again, but its second train message is not answered in time.
    original = grid.send_and_receive

    def drop_retry(messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        if [(m.metadata.dst_node_id, m.metadata.message_type) for m in messages] == [(777, MessageType.TRAIN)]:
            return []
        return original(messages, timeout=timeout)

    grid.send_and_receive = drop_retry  # type: ignore[method-assign]
    replies = _round(delivery, grid, 2)

    lost = [r for r in replies if r.metadata.src_node_id == 777]
    assert len(replies) == 3 and len(lost) == 1 and says_model_missing(lost[0])
    assert 777 in delivery.holders and delivery.deliveries[777] == 2


def test_a_node_that_keeps_losing_the_model_is_not_sent_it_forever(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = global_model()
    # Its cache cap is below the model's size: it can never keep it, whatever it is sent.
    nodes = {5: Node(cache=tmp_path / "small", partition=4, extra_config={"cache-max-gb": 0.001})}
    grid = LoopbackGrid(nodes)
    delivery = ModelDelivery(model_hash=model.model_hash, backbone=ArrayRecord(model.state), timeout=10.0)

    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        for server_round in range(1, 6):
            [reply] = _round(delivery, grid, server_round)
            assert says_model_missing(reply)

    assert delivery.deliveries == {5: MAX_DELIVERIES}
    assert any("still lacks the model after 3 deliveries" in r.getMessage() for r in caplog.records)
    assert any("client 4 (node 5) did not store the model" in r.getMessage() and "cache cap" in r.getMessage()
               for r in caplog.records)


def test_a_refused_query_is_logged_with_the_nodes_reason(
    federation: tuple[ModelDelivery, LoopbackGrid], caplog: pytest.LogCaptureFixture
) -> None:
    delivery, grid = federation
    delivery.model_hash = "../../etc/passwd"  # a server bug or a tampered run: the client says no

    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        delivery.ensure_models(grid, [42])

    assert not delivery.holders
    assert any(f"{keys.REFUSED}: {keys.MODEL_HASH}: must be 64 lowercase hex" in r.getMessage()
               for r in caplog.records)
