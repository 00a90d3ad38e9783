"""Partitioning at federation scale: exact and seeded at 100,000 clients, the same partitions as before for small
federations, clear errors for impossible requests, and computed once per process (fedtune/data/resident.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fedtune.client.task import NodeIdentity, local_data
from fedtune.config import MAX_CLIENTS, ConfigError, load_config, parse_config
from fedtune.data import Partitioning, load_split, partition, partitioning, partitions, resident
from fedtune.protocol import ClientSettings
from fedtune.server.preflight import PreflightError, preflight
from fedtune.strategies import sampling

REPO = Path(__file__).resolve().parents[1]
DIGITS = np.asarray(load_split("digits", "train", root=None, download=False, seed=0).targets)
CLIENTS = 100_000
# Three examples a client, as in a cross-device federation: the digits labels repeated.
LARGE = np.resize(DIGITS, 3 * CLIENTS)


def _owners(parts: Partitioning) -> np.ndarray:
    """The partition of each entry of parts.order."""
    return np.repeat(np.arange(len(parts)), parts.sizes())


def _distinct_labels(parts: Partitioning, labels: np.ndarray) -> np.ndarray:
    """How many different labels each partition holds."""
    pairs = np.unique(_owners(parts) * (labels.max() + 1) + labels[parts.order])
    return np.bincount(pairs // (labels.max() + 1), minlength=len(parts))


@pytest.mark.parametrize(("scheme", "alpha"), [("iid", 0.5), ("dirichlet", 0.1), ("dirichlet", 1.0), ("shards", 0.5)])
def test_100k_clients_each_example_once_every_client_min_examples_and_seeded(scheme: str, alpha: float) -> None:
    settings = {"scheme": scheme, "num_partitions": CLIENTS, "alpha": alpha, "min_examples": 2}

    parts = partitioning(LARGE, seed=7, **settings)  # type: ignore[arg-type]

    assert len(parts) == CLIENTS
    assert np.array_equal(np.sort(parts.order), np.arange(len(LARGE)))  # every example in exactly one client
    assert parts.sizes().min() >= 2
    within = np.diff(parts.order)[np.diff(_owners(parts)) == 0]
    assert (within > 0).all()  # each client's indices ascending, as the lists always were
    again = partitioning(LARGE, seed=7, **settings)  # type: ignore[arg-type]
    assert np.array_equal(again.order, parts.order) and np.array_equal(again.offsets, parts.offsets)
    assert not np.array_equal(partitioning(LARGE, seed=8, **settings).order, parts.order)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        parts.order[0] = 1  # shared by every client a process serves: read-only


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("alpha", [5e-324, 1e-6, 1e6])  # what a server may send: any alpha in (0, 1e6]
def test_dirichlet_at_the_extremes_of_alpha_still_gives_every_client_min_examples(alpha: float) -> None:
    parts = partitioning(LARGE, scheme="dirichlet", num_partitions=CLIENTS, seed=0, alpha=alpha, min_examples=2)

    assert parts.sizes().min() >= 2 and np.array_equal(np.sort(parts.order), np.arange(len(LARGE)))


def test_dirichlet_keeps_its_label_skew_at_100k_clients() -> None:
    iid = partitioning(LARGE, scheme="iid", num_partitions=CLIENTS, seed=0, min_examples=2)
    skewed = partitioning(LARGE, scheme="dirichlet", num_partitions=CLIENTS, seed=0, alpha=0.1, min_examples=2)
    flat = partitioning(LARGE, scheme="dirichlet", num_partitions=CLIENTS, seed=0, alpha=1000.0, min_examples=2)

    # about three examples of ten classes each: iid clients hold 2.7 labels on average and hardly
    # ever one; alpha=0.1 clients, topped up to 2 as most are, often hold one; alpha=1000 mixes as iid
    distinct = {name: _distinct_labels(parts, LARGE) for name, parts in [("iid", iid), ("skewed", skewed),
                                                                         ("flat", flat)]}
    assert distinct["iid"].mean() > 2.5 and (distinct["iid"] == 1).mean() < 0.05
    assert distinct["skewed"].mean() < 2.0 and (distinct["skewed"] == 1).mean() > 0.3
    assert distinct["flat"].mean() > 2.8 and (distinct["flat"] == 1).mean() < 0.05
    # and the examples per client vary with alpha (Dirichlet draws sizes too), iid's do not
    assert iid.sizes().max() == 3 and skewed.sizes().max() > 20


def test_dirichlet_tops_up_only_above_its_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    # (1,000 clients in fedtune; 20 here, to fail 2,000 draws in milliseconds.) 2 examples a client at
    # alpha=0.5: hardly any draw of proportions gives every client 2, so a small federation is told
    # so, as always, and a larger one is topped up.
    monkeypatch.setattr(partitions, "DIRICHLET_TOP_UP_ABOVE", 20)
    with pytest.raises(ValueError, match=r"in 2000 draws with alpha=0\.5, no split of 40 examples gave all 20 "
                                         r"partitions at least min_examples=2; raise alpha"):
        partitioning(DIGITS[:40], scheme="dirichlet", num_partitions=20, seed=0, min_examples=2)
    for seed in range(20):  # whichever partitions a draw leaves short, the first or the last
        topped_up = partitioning(DIGITS[:42], scheme="dirichlet", num_partitions=21, seed=seed, min_examples=2)
        assert topped_up.sizes().tolist() == [2] * 21


# Digests of the partitions the implementation before issue 11 gave (the lists of partition()):
# a fixed seed must keep giving them, so that earlier results can be reproduced.
BEFORE = [
    ({"scheme": "dirichlet", "num_partitions": 10, "seed": 0, "alpha": 1.0, "min_examples": 2}, "ad54818dbbfa1342"),
    ({"scheme": "iid", "num_partitions": 10, "seed": 0, "min_examples": 2}, "465a2831a3541d7e"),
    ({"scheme": "shards", "num_partitions": 10, "seed": 0, "shards_per_partition": 2, "min_examples": 2},
     "0c109a728362b7d9"),
    ({"scheme": "dirichlet", "num_partitions": 100, "seed": 3, "alpha": 0.5, "min_examples": 2}, "2dc0836a12ab0133"),
    # above 1,000 clients, a Dirichlet draw that fits within the redraw budget is the one it always was
    ({"scheme": "dirichlet", "num_partitions": 5000, "seed": 1, "alpha": 5.0, "min_examples": 2}, "2abfd509aee77a2b"),
]


@pytest.mark.parametrize(("settings", "digest"), BEFORE,
                         ids=[f"{s['scheme']}-{s['num_partitions']}" for s, _ in BEFORE])
def test_a_seed_gives_the_partitions_it_always_gave(settings: dict[str, object], digest: str) -> None:
    labels = np.resize(DIGITS, 50_000) if settings["num_partitions"] == 5000 else DIGITS

    parts = partition(labels, **settings)  # type: ignore[arg-type]

    assert hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16] == digest


def test_an_impossible_request_names_the_constraint_and_the_numbers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="100000 partitions of at least 2 examples need 200000 examples; there are "
                                         "150000"):
        partitioning(LARGE[:150_000], scheme="dirichlet", num_partitions=CLIENTS, seed=0, min_examples=2)
    with pytest.raises(ValueError, match=r"100000 partitions x 2 shards = 200000 shards, more than the 150000"):
        partitioning(LARGE[:150_000], scheme="shards", num_partitions=CLIENTS, seed=0)
    with pytest.raises(ValueError, match=r"gives one only 2 examples, fewer than min_examples=3 \(shards of at least "
                                         r"1 examples; raise shards_per_partition"):
        partitioning(LARGE, scheme="shards", num_partitions=CLIENTS, seed=0, min_examples=3)
    # before anything starts, in the experiment's own keys
    cfg = load_config(REPO / "configs/quickstart.yaml", ["federation.num_clients=1000",
                                                         f"output.dir={tmp_path / 'runs'}"])
    with pytest.raises(PreflightError, match=r"^data\.partition\.min_examples=2 x federation\.num_clients=1000 needs "
                                             r"2000 examples; digits has 1437 for training$"):
        preflight(cfg, simulation=True)


def test_a_million_clients_are_allowed_and_no_more() -> None:
    assert MAX_CLIENTS == 1_000_000
    cfg = parse_config({"federation": {"num_clients": MAX_CLIENTS, "clients_per_round": 10}})
    settings = ClientSettings.of(cfg, num_classes=10)
    assert ClientSettings.from_message(settings.to_message()).num_clients == MAX_CLIENTS
    with pytest.raises(ConfigError, match="federation.num_clients: Input should be less than or equal to 1000000"):
        parse_config({"federation": {"num_clients": MAX_CLIENTS + 1}})
    with pytest.raises(ConfigError, match="num_clients: Input should be less than or equal to 1000000"):
        ClientSettings.from_message(settings.to_message().replace('"num_clients":1000000', '"num_clients":1000001'))


def test_a_server_asking_a_node_for_a_million_partitions_of_digits_is_refused_at_once(tmp_path: Path) -> None:
    cfg = parse_config({"federation": {"num_clients": MAX_CLIENTS, "clients_per_round": 10},
                        "data": {"partition": {"scheme": "dirichlet", "alpha": 1e-6, "min_examples": 1_000_000}}})
    node = NodeIdentity.from_node_config({"partition-id": MAX_CLIENTS - 1, "cache-dir": str(tmp_path)}, simulated=True)

    with pytest.raises(ValueError, match=r"between 1 and the number of examples \(1437\), got 1000000"):
        local_data(ClientSettings.of(cfg, num_classes=10), node)


@pytest.fixture
def empty_memos() -> None:
    resident.SPLITS.clear()
    resident.PARTITIONINGS.clear()


def test_a_process_partitions_once_and_every_client_takes_its_slice(tmp_path: Path, empty_memos: None) -> None:
    cfg = parse_config({"data": {"image_size": 32, "partition": {"scheme": "dirichlet", "alpha": 1.0}},
                        "federation": {"num_clients": 10}})
    settings = ClientSettings.of(cfg, num_classes=10, run_key="run-a")
    expected = partition(DIGITS, scheme="dirichlet", num_partitions=10, seed=0, alpha=1.0, min_examples=2)

    for client in range(10):
        node = NodeIdentity.from_node_config({"partition-id": client, "cache-dir": str(tmp_path)}, simulated=True)
        data = local_data(settings, node)
        assert sorted(data.train.indices + data.validation.indices) == expected[client]  # type: ignore[attr-defined]

    assert (len(resident.SPLITS), len(resident.PARTITIONINGS)) == (1, 1)
    loaded = resident.resident_split("digits", "train", root=None, download=False, seed=0, bad_images="error",
                                     scope="run-a")
    first = resident.resident_partitioning(loaded, scheme="dirichlet", num_partitions=10, seed=0, alpha=1.0,
                                           shards_per_partition=2, min_examples=2)
    assert resident.resident_partitioning(loaded, scheme="dirichlet", num_partitions=10, seed=0, alpha=1.0,
                                          shards_per_partition=2, min_examples=2) is first


def test_the_memos_stay_bounded_whatever_the_messages_ask(empty_memos: None) -> None:
    loaded = resident.resident_split("digits", "train", root=None, download=False, seed=0, bad_images="error",
                                     scope="run-a")
    for seed in range(3 * resident.MAX_PARTITIONINGS):  # a server changing the seed every message
        resident.resident_partitioning(loaded, scheme="iid", num_partitions=10, seed=seed, alpha=0.5,
                                       shards_per_partition=2, min_examples=1)
    for run in range(3 * resident.MAX_SPLITS):  # or the run
        resident.resident_split("digits", "train", root=None, download=False, seed=0, bad_images="error",
                                scope=f"run-{run}")

    assert (len(resident.PARTITIONINGS), len(resident.SPLITS)) == (resident.MAX_PARTITIONINGS, resident.MAX_SPLITS)
    # the most recent are the ones kept
    latest = resident.resident_split("digits", "train", root=None, download=False, seed=0, bad_images="error",
                                     scope=f"run-{3 * resident.MAX_SPLITS - 1}")
    assert len(resident.SPLITS) == resident.MAX_SPLITS and not latest.labels.flags.writeable


def test_a_failed_load_or_partitioning_is_not_kept(tmp_path: Path, empty_memos: None) -> None:
    with pytest.raises(FileNotFoundError):
        resident.resident_split("imagefolder", "train", root=str(tmp_path / "nowhere"), download=False, seed=0,
                                bad_images="error", scope="run-a")
    loaded = resident.resident_split("digits", "train", root=None, download=False, seed=0, bad_images="error",
                                     scope="run-a")
    with pytest.raises(ValueError, match="need 2874 examples"):
        resident.resident_partitioning(loaded, scheme="iid", num_partitions=1437, seed=0, alpha=0.5,
                                       shards_per_partition=2, min_examples=2)
    assert (len(resident.SPLITS), len(resident.PARTITIONINGS)) == (1, 0)


def test_sampling_a_million_clients_asks_flower_for_exactly_clients_per_round() -> None:
    # Flower samples max(int(connected x fraction_train), min_train_nodes) nodes
    # (flwr/serverapp/strategy/fedavg.py, line 170; evaluation alike): a fraction of a million
    # must not round the sample down, nor up.
    for clients, per_round in [(MAX_CLIENTS, 10), (MAX_CLIENTS, 1000), (999_983, 7), (100_000, 3)]:
        wanted = sampling(parse_config({"federation": {"num_clients": clients, "clients_per_round": per_round}}))
        assert max(int(clients * wanted["fraction_train"]), wanted["min_train_nodes"]) == per_round
        assert max(int(clients * wanted["fraction_evaluate"]), wanted["min_evaluate_nodes"]) == per_round
