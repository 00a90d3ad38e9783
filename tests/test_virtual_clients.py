"""Virtual clients: a pool of simulation nodes plays a federation of any size, sharing one backbone copy.

The config entries that name a virtual client are sent at their worst to a node of its own; a real node
refuses to play another client at all; a simulation node keeps each client's privacy ledger apart;
and real simulations run 50 clients on one cached backbone and 100,000 clients in seconds a round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType
from mnist_format import write_digits_as_mnist
from server_messages import NUM_CLIENTS, Node, instruction, query, round_config, settings

import fedtune.client.task as task
from fedtune import messages as keys
from fedtune.client.task import SHARED_CACHE, NodeIdentity
from fedtune.config import MAX_CLIENTS, load_config
from fedtune.protocol import MAX_REASON_CHARS, RefusedMessage, VirtualClient
from fedtune.report import RunDirectory
from fedtune.simulation import simulate, simulation_nodes

REPO = Path(__file__).resolve().parents[1]


def _naming(message: Message, entries: dict[str, object]) -> Message:
    """The message, its config naming a virtual client with these entries."""
    config = message.content.config_records[keys.CONFIG]
    message.content[keys.CONFIG] = ConfigRecord({**config, **entries})  # type: ignore[dict-item]
    return message


def _refused(reply: Message, field: str, problem: str) -> None:
    assert reply.has_error(), "the message was acted upon"
    reason = reply.error.reason
    assert reason.startswith(f"{keys.REFUSED}: {field}: "), reason
    assert problem in reason, reason
    assert len(reason) <= MAX_REASON_CHARS


@pytest.fixture
def holding(tmp_path: Path, server_identity: None) -> Node:
    node = Node(cache=tmp_path / "node" / "cache")
    assert not node.send(query(with_backbone=True)).has_error()
    return node


# --- The record naming a virtual client, at its worst ---------------------------------------------

PARTITION, CLIENTS = keys.VIRTUAL_PARTITION, keys.VIRTUAL_CLIENTS


@pytest.mark.parametrize(("entries", "field", "problem"), [
    ({PARTITION: True, CLIENTS: 10}, PARTITION, "must be an integer, got bool"),
    ({PARTITION: 1.0, CLIENTS: 10}, PARTITION, "must be an integer, got float"),
    ({PARTITION: "1", CLIENTS: 10}, PARTITION, "must be an integer, got str"),
    ({PARTITION: [1, 2], CLIENTS: 10}, PARTITION, "must be an integer, got list"),
    ({PARTITION: 10, CLIENTS: 10}, PARTITION, "must be in [0, 9], got 10"),
    ({PARTITION: -1, CLIENTS: 10}, PARTITION, "must be in [0, 9], got -1"),
    ({PARTITION: 0, CLIENTS: 0}, CLIENTS, f"must be in [1, {MAX_CLIENTS}], got 0"),
    ({PARTITION: 0, CLIENTS: 2**63 - 1}, CLIENTS, f"must be in [1, {MAX_CLIENTS}]"),
    ({PARTITION: 0}, CLIENTS, "missing"),
    ({CLIENTS: 10}, PARTITION, "missing"),
    ({PARTITION: 0, CLIENTS: 10, "fedtune.virtual-cache-dir": "/etc"}, keys.CONFIG,
     "unknown key 'fedtune.virtual-cache-dir'"),
])
@pytest.mark.parametrize("kind", ["query", "train", "evaluate"])
def test_a_malformed_virtual_client_is_refused(
    holding: Node, kind: str, entries: dict[str, object], field: str, problem: str
) -> None:
    message = (query() if kind == "query"
               else instruction(round_config(), message_type=getattr(MessageType, kind.upper())))
    _refused(holding.send(_naming(message, entries)), field, problem)


@pytest.mark.parametrize("kind", ["query", "train", "evaluate"])
def test_a_real_node_refuses_to_play_another_client_and_writes_nothing(holding: Node, kind: str) -> None:
    before = sorted(holding.cache.rglob("*"))
    message = (query(with_backbone=True) if kind == "query"
               else instruction(round_config(), message_type=getattr(MessageType, kind.upper())))
    reply = holding.send(_naming(message, {PARTITION: 3, CLIENTS: NUM_CLIENTS}))
    _refused(reply, PARTITION, "this is a real node: its data and its identity are its own")
    assert sorted(holding.cache.rglob("*")) == before


# --- A simulation node plays the client a message names ------------------------------------------


def test_a_simulation_node_plays_the_named_client_in_the_machines_shared_cache(isolated_cache: Path) -> None:
    node = NodeIdentity.from_node_config({"partition-id": 1, "num-partitions": 4}, simulated=True)
    playing = node.playing(VirtualClient(partition=99_999, clients=100_000), 100_000)
    shared = isolated_cache / SHARED_CACHE
    assert (playing.partition_id, playing.num_partitions) == (99_999, 100_000)
    assert playing.cache_root == shared and playing.client_state_root == shared / "clients" / "99999"
    assert node.playing(None) is node and node.client_state_root == node.cache_root

    with pytest.raises(RefusedMessage, match="says the federation has 100000 clients, the settings say 10"):
        node.playing(VirtualClient(partition=3, clients=100_000), 10)


def test_each_virtual_client_keeps_its_own_privacy_ledger(
    tmp_path: Path, isolated_cache: Path, server_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(task, "in_simulation", lambda: True)
    node = Node(cache=tmp_path / "pool-node-0")  # its own cache-dir is not where virtual clients keep theirs
    private = round_config(settings_json=json.dumps(settings("privacy.dp_sgd.enabled=true")))
    assert not node.send(_naming(query(with_backbone=True), {PARTITION: 3, CLIENTS: NUM_CLIENTS})).has_error()
    for client in (3, 4, 3):
        reply = node.send(_naming(instruction(private), {PARTITION: client, CLIENTS: NUM_CLIENTS}))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""

    shared = isolated_cache / SHARED_CACHE
    steps = {path.relative_to(shared).parts[1]: sum(entry[2] for entry in json.loads(path.read_text())["history"])
             for path in shared.glob("clients/*/privacy/*.json")}
    assert sorted(steps) == ["3", "4"]
    # Client 3 trained twice, client 4 once: each ledger counts only its own client's steps.
    assert steps["3"] == 2 * steps["4"] > 0
    assert len(list(shared.glob("models/*.safetensors"))) == 1
    assert not (tmp_path / "pool-node-0").exists()


# --- Real simulations -----------------------------------------------------------------------------


def test_fifty_virtual_clients_keep_one_backbone_copy_on_disk(tmp_path: Path, isolated_cache: Path) -> None:
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "data.image_size=32", "federation.num_clients=50", "federation.clients_per_round=10", "federation.rounds=3",
        "train.trainable_blocks=0", "train.unfreeze=[]", "train.local_epochs=1", f"output.dir={tmp_path / 'runs'}",
    ])
    assert simulation_nodes(cfg) == 10
    outcome = simulate(cfg)

    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert outcome.rounds_completed == 3 and all(r.clients_ok == 10 for r in history[1:])
    # One copy of the model on this machine's disk, sent once, to the warm-up's first client.
    model_files = sorted(isolated_cache.rglob("models/*.safetensors"))
    assert [path.relative_to(isolated_cache).parts[0] for path in model_files] == [SHARED_CACHE]
    assert summary["backbone_deliveries_per_node"] == {"0": 1}
    serialised = [r.bytes_backbone_serialised for r in history[1:]]
    assert serialised[0] > 0 and serialised[1:] == [0, 0]
    # The history reports the backbone as real nodes would receive it: once for each client, with
    # its first message (10 to 50 clients in 3 rounds of 10 trained and 10 evaluated).
    copies = sum(r.bytes_sent_backbone for r in history) / serialised[0]
    assert copies == int(copies) and 10 <= copies <= 50
    assert history[1].bytes_sent_backbone >= 10 * serialised[0]
    assert history[-1].central_accuracy > history[0].central_accuracy


def test_a_hundred_thousand_virtual_clients_two_rounds_of_ten(tmp_path: Path, isolated_cache: Path) -> None:
    """100,000 registered clients on 10 simulation nodes: one 8x8 example each (tests/mnist_format.py)."""
    clients = 100_000
    data = write_digits_as_mnist(tmp_path / "data", train=clients, test=200)
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "model.backbone=mobilenet_v3_small", "model.weights=none", "data.source=torchvision:MNIST",
        f"data.root={data}", "data.download=false", "data.image_size=32", "data.val_fraction=0",
        "data.partition.scheme=iid", "data.partition.min_examples=1", f"federation.num_clients={clients}",
        "federation.clients_per_round=10", "federation.min_clients=10", "federation.rounds=2",
        "train.trainable_blocks=0", "train.unfreeze=[]", "train.local_epochs=1", "train.batch_size=1",
        f"output.dir={tmp_path / 'runs'}", "early_stopping.enabled=false",
    ])
    assert simulation_nodes(cfg) == 10
    outcome = simulate(cfg)

    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    assert outcome.rounds_completed == 2
    assert [(r.clients_sampled, r.clients_ok) for r in history[1:]] == [(10, 10), (10, 10)]
    assert all(torch.isfinite(torch.tensor(r.train_loss)) for r in history[1:])
    # Only the sampled clients' state exists: nothing was made for the other 99,980.
    assert len(list(isolated_cache.rglob("models/*.safetensors"))) == 1
    assert len(list((isolated_cache / SHARED_CACHE).glob("clients/*"))) <= 20
    assert os.listdir(isolated_cache) == [SHARED_CACHE]
