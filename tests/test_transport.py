"""The transport: every message of every path counted, SecAgg+ included, and the counts equal what really crossed.

The first tests run the Transport over a SuperLink stand-in in this process; the last runs a real
SecAgg+ federation in Flower's simulation engine with a wire tap (tests/wire_tap.py) between
Flower's grid and the server, and compares the run's history with what the tap saw.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from wire_tap import WireTap, content_bytes

from fedtune import messages as keys
from fedtune.server.transport import Transport

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

Handler = Callable[[Message], Message | None]  # a node's answer to a message; None: it does not answer


class StandInLink(Grid):
    """A SuperLink stand-in: accepts messages for the nodes it knows, whose handlers answer at once.

    Like Flower's, it gives each message it accepts an id and returns no id for one it refuses
    (here: a message to a node it does not know).
    """

    def __init__(self, nodes: dict[int, Handler]) -> None:
        self.nodes = nodes
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def get_nodes(self) -> Iterable[NodeInfo]:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            handler = self.nodes.get(message.metadata.dst_node_id)
            if handler is None:
                continue
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's InMemoryGrid does
            reply = handler(message)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("the transport sends through push_messages and pull_messages")


def tensors(size: int) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.arange(size, dtype=np.float32))})


def metrics_reply(message: Message) -> Message:
    return Message(RecordDict({keys.METRICS: MetricRecord({"accuracy": 0.5, keys.NUM_EXAMPLES: 10})}),
                   reply_to=message)


def no_reply(message: Message) -> None:
    return None


def error_reply(message: Message) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="x" * 100_000), reply_to=message)


def instruction(content: RecordDict, node: int) -> Message:
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


@pytest.mark.usefixtures("server_identity")
def test_each_message_counts_once_per_node_and_each_reply_its_content() -> None:
    link = StandInLink({1: metrics_reply, 2: metrics_reply, 3: metrics_reply})
    transport = Transport(link, interval=0.0)
    shared = RecordDict({keys.ARRAYS: tensors(1000), keys.CONFIG: ConfigRecord({"a": 1})})  # as a strategy shares it

    replies = list(transport.send_and_receive([instruction(shared, node) for node in (1, 2, 3)], timeout=1.0))

    assert len(replies) == 3
    assert transport.traffic.sent == 3 * content_bytes(shared) and content_bytes(shared) > 4000
    assert transport.traffic.received == sum(content_bytes(r.content) for r in replies) > 0
    assert transport.traffic.sent_backbone == 0


@pytest.mark.usefixtures("server_identity")
def test_the_full_model_is_counted_apart_within_what_was_sent() -> None:
    link = StandInLink({1: metrics_reply, 2: metrics_reply})
    transport = Transport(link, interval=0.0)
    backbone = tensors(50_000)
    delivery = RecordDict({keys.CONFIG: ConfigRecord({keys.MODEL_HASH: "0" * 64}), keys.BACKBONE: backbone})

    transport.send_and_receive([Message(delivery, dst_node_id=n, message_type=MessageType.QUERY) for n in (1, 2)])

    assert transport.traffic.sent == 2 * content_bytes(delivery)
    assert 2 * 50_000 * 4 <= transport.traffic.sent_backbone == 2 * content_bytes(backbone) < transport.traffic.sent


@pytest.mark.usefixtures("server_identity")
def test_refused_messages_unanswered_ones_and_error_replies_carry_no_content_bytes() -> None:
    link = StandInLink({1: error_reply, 2: no_reply})
    transport = Transport(link, interval=0.0)
    content = RecordDict({keys.ARRAYS: tensors(100)})

    # Node 3 is unknown to the SuperLink: its message is refused, nothing of it leaves the server.
    replies = list(transport.send_and_receive([instruction(content, n) for n in (1, 2, 3)], timeout=0.05))

    assert [r.has_error() for r in replies] == [True]
    assert transport.traffic.sent == 2 * content_bytes(content)  # nodes 1 and 2 received theirs
    assert transport.traffic.received == 0  # an error reply has no content; a 100 kB reason is not a payload


@pytest.mark.usefixtures("server_identity")
def test_each_round_starts_a_fresh_count_and_the_last_one_is_kept() -> None:
    link = StandInLink({1: metrics_reply})
    transport = Transport(link, interval=0.0)
    content = RecordDict({keys.ARRAYS: tensors(10)})

    first = transport.start_count()
    transport.send_and_receive([instruction(content, 1)])
    second = transport.start_count()
    transport.send_and_receive([instruction(content, 1)])
    transport.send_and_receive([instruction(content, 1)])

    assert second.sent == 2 * first.sent > 0 and transport.traffic is second


@pytest.mark.usefixtures("server_identity")
def test_virtual_clients_are_played_by_the_pool_and_each_reply_names_its_client() -> None:
    played: list[tuple[int, dict[str, object]]] = []

    def answer(message: Message) -> Message:
        played.append((message.metadata.dst_node_id, dict(message.content[keys.CONFIG])))
        return metrics_reply(message)

    link = StandInLink({11: answer, 12: answer, 13: answer})
    transport = Transport(link, interval=0.0, virtual_clients=100_000)
    transport.departed.add(5)
    assert len(transport.get_node_ids()) == 99_999 and 5 not in transport.get_node_ids()
    assert transport.connected_node_ids() == list(range(100_000))
    content = RecordDict({keys.ARRAYS: tensors(1000), keys.CONFIG: ConfigRecord({"a": 1})})  # shared, as by a strategy

    replies = list(transport.send_and_receive([instruction(content, c) for c in (99_999, 3, 0, 7, 42)], timeout=1.0))

    # Each message went to a node of the pool, in turn, naming the client the node plays for it ...
    assert [(node, record[keys.VIRTUAL_PARTITION]) for node, record in played] == [
        (11, 99_999), (12, 3), (13, 0), (11, 7), (12, 42)]
    assert {record[keys.VIRTUAL_CLIENTS] for _, record in played} == {100_000}
    # ... and each reply comes from that client, as the strategy addressed it.
    assert sorted(r.metadata.src_node_id for r in replies) == [0, 3, 7, 42, 99_999]
    # The strategy's content is left as it was, and counts as real nodes would receive it.
    assert dict(content[keys.CONFIG]) == {"a": 1}
    assert transport.traffic.sent == 5 * content_bytes(content)

    assert {record["a"] for _, record in played} == {1}  # the strategy's config travels with the naming
    with pytest.raises(ValueError, match="node id 100000 is not one of the 100000 virtual clients"):
        transport.push_messages([instruction(content, 100_000)])
    with pytest.raises(ValueError, match="a train message without a 'config' record cannot name its virtual client"):
        transport.push_messages([instruction(RecordDict({keys.ARRAYS: tensors(10)}), 1)])


def test_clients_that_left_the_run_are_not_sampled_but_still_connected() -> None:
    link = StandInLink({node: metrics_reply for node in (30, 10, 20)})
    transport = Transport(link)
    transport.departed.add(20)

    assert transport.get_node_ids() == [10, 30]  # sorted: a resumed run samples the same clients
    assert sorted(transport.connected_node_ids()) == [10, 20, 30]


# --- A real SecAgg+ run ------------------------------------------------------------------------------


@pytest.fixture
def ray_can_import_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray workers inherit the environment: let them import the ClientApp by name.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
PURE_PROTOCOL = [f"{MessageType.TRAIN}:{stage}" for stage in ("setup", "share_keys", "unmask")]  # carry no tensors


@pytest.mark.usefixtures("ray_can_import_the_app")
def test_a_secure_aggregation_run_counts_the_bytes_of_its_protocol_rounds(tmp_path: Path) -> None:
    from flwr.simulation import run_simulation

    from fedtune.client.app import app as client_app
    from fedtune.config import load_config
    from fedtune.model_file import load_model_file
    from fedtune.params import stage_of
    from fedtune.report import RunDirectory
    from fedtune.server.run import run_federation

    clients = 3
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "data.image_size=32", f"federation.num_clients={clients}", "federation.rounds=2", "train.local_epochs=1",
        "train.trainable_blocks=0", "train.unfreeze=[]", "privacy.secure_aggregation.enabled=true",
        f"output.dir={tmp_path / 'runs'}",
    ])
    taps: list[WireTap] = []
    outcomes = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        taps.append(WireTap(grid))  # below the server's transport: it sees what really crosses
        outcomes.append(run_federation(taps[0], cfg))

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"include_dashboard": False}})

    [outcome], [tap] = outcomes, taps
    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    final, _ = load_model_file(outcome.run_dir / "model.safetensors")
    head_bytes = sum(t.numel() * t.element_size() for k, t in final.items() if stage_of(k) == "head")
    assert [r.clients_ok for r in history[1:]] == [clients, clients]
    assert len(tap.rounds) == cfg.federation.rounds

    for record, wire in zip(history[1:], tap.rounds, strict=True):
        # Every stage of the protocol went to every client, and the evaluation after it.
        expected = Counter({f"{MessageType.TRAIN}:{stage}": clients for stage in SECAGG_STAGES})
        expected[MessageType.EVALUATE] = clients
        if record.round == 1:
            expected[MessageType.QUERY] = 2 * clients  # the model query, then the model itself
        assert wire.messages == expected, record.round
        # The history counts exactly what crossed, both ways.
        assert (record.bytes_sent, record.bytes_received) == (wire.sent, wire.received), record.round
        # That is the model payload (the trained tensors out and back, the evaluated ones out) and
        # more: the protocol's key exchange, key shares and unmasking, which carry no tensors.
        protocol_sent = sum(wire.sent_by_kind[kind] for kind in PURE_PROTOCOL)
        protocol_received = sum(wire.received_by_kind[kind] for kind in PURE_PROTOCOL)
        assert protocol_sent > 0 and protocol_received > 0
        assert record.bytes_sent >= record.bytes_sent_backbone + 2 * clients * head_bytes + protocol_sent
        assert record.bytes_received >= clients * head_bytes + protocol_received
    # The full model went once to each client, in round 1, within its query messages.
    full_bytes = sum(t.numel() * t.element_size() for t in final.values())
    assert clients * full_bytes <= history[1].bytes_sent_backbone < tap.rounds[0].sent_by_kind[MessageType.QUERY]
    assert history[2].bytes_sent_backbone == 0
