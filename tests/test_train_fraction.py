"""data.train_fraction: a client trains on a seeded, nested, stratified part of its own training split."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType
from server_messages import NUM_CLIENTS, Node, instruction, query, round_config, settings

from fedtune import messages as keys
from fedtune.client.task import NodeIdentity, local_data
from fedtune.config import ConfigError, load_config
from fedtune.data import training_subset
from fedtune.protocol import MAX_REASON_CHARS, ClientSettings, VirtualClient

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
LABELS = np.repeat([0, 1, 2], [60, 30, 10])  # three classes, 6:3:1
FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


# --- the subsample ------------------------------------------------------------------------------


def test_a_fraction_keeps_its_share_of_every_class_and_at_least_one_example() -> None:
    indices = list(range(len(LABELS)))
    for fraction in FRACTIONS:
        kept = training_subset(indices, LABELS, fraction=fraction, seed=3)

        assert len(kept) == max(1, math.ceil(round(fraction * len(indices), 9)))
        assert kept == sorted(set(kept)) and set(kept) <= set(indices)
        counts = Counter(int(LABELS[i]) for i in kept)
        assert all(abs(counts[c] - len(kept) * share) <= 1 for c, share in {0: 0.6, 1: 0.3, 2: 0.1}.items())
    assert training_subset([7], LABELS, fraction=0.01, seed=3) == [7]  # a client of one example keeps it
    assert training_subset([], LABELS, fraction=0.5, seed=3) == []
    # 0.1 x 30 is 3.0000000000000004 in floating point: still 3 examples
    assert len(training_subset(range(30), LABELS, fraction=0.1, seed=0)) == 3


def test_a_smaller_fraction_keeps_a_subset_of_a_larger_ones_examples() -> None:
    indices = np.random.default_rng(0).permutation(len(LABELS))[:80]
    for seed in range(5):
        subsets = [set(training_subset(indices, LABELS, fraction=f, seed=seed)) for f in FRACTIONS]
        assert all(smaller <= larger for smaller, larger in zip(subsets, subsets[1:], strict=False))
        assert subsets[-1] == {int(i) for i in indices}


def test_which_examples_are_kept_depends_on_the_seed_only() -> None:
    indices = list(range(0, 100, 2))
    kept = training_subset(indices, LABELS, fraction=0.25, seed=11)

    assert training_subset(indices, LABELS, fraction=0.25, seed=11) == kept
    assert training_subset(indices[::-1], LABELS, fraction=0.25, seed=11) == kept  # not on their order
    assert training_subset(indices, LABELS, fraction=0.25, seed=12) != kept
    assert training_subset(indices, LABELS, fraction=1.0, seed=11) == indices  # all: unchanged


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.0000001, float("nan"), float("inf")])
def test_a_fraction_outside_0_1_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"training fraction must be in \(0, 1\]"):
        training_subset(range(10), LABELS, fraction=fraction, seed=0)
    with pytest.raises(ValueError, match="indices must lie in"):
        training_subset([0, 100], LABELS, fraction=0.5, seed=0)


# --- the setting --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "problem"), [
    ("0", "data.train_fraction: Input should be greater than 0 (got 0)"),
    ("-0.1", "data.train_fraction: Input should be greater than 0"),
    ("1.5", "data.train_fraction: Input should be less than or equal to 1 (got 1.5)"),
    ("nan", "data.train_fraction: Input should be a valid number"),
    ("half", "data.train_fraction: Input should be a valid number"),
])
def test_the_experiment_file_refuses_a_fraction_outside_0_1(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(QUICKSTART, [f"data.train_fraction={value}"])
    assert problem in str(error.value)


def test_the_fraction_travels_in_the_client_settings_and_the_default_adds_nothing() -> None:
    default = ClientSettings.of(load_config(QUICKSTART), num_classes=10)
    assert "train_fraction" not in default.to_message()  # existing runs send what they always sent

    quarter = ClientSettings.of(load_config(QUICKSTART, ["data.train_fraction=0.25"]), num_classes=10)
    assert ClientSettings.from_message(quarter.to_message()).data.train_fraction == 0.25


# --- on a node ------------------------------------------------------------------------------------


def _digits(fraction: float) -> ClientSettings:
    cfg = load_config(QUICKSTART, ["data.image_size=32", f"data.train_fraction={fraction}"])
    return ClientSettings.of(cfg, num_classes=10)


def test_each_client_trains_on_a_nested_part_of_its_own_split_and_validates_on_all_of_it(tmp_path: Path) -> None:
    for partition in range(NUM_CLIENTS):
        node = NodeIdentity.from_node_config({"partition-id": partition, "cache-dir": str(tmp_path)}, simulated=True)
        whole = local_data(_digits(1.0), node)
        tenth = local_data(_digits(0.1), node)
        half = local_data(_digits(0.5), node)

        train = whole.train.indices  # type: ignore[attr-defined]
        assert len(tenth.train) == math.ceil(round(0.1 * len(train), 9)) >= 1  # type: ignore[arg-type]
        assert set(tenth.train.indices) <= set(half.train.indices) <= set(train)  # type: ignore[attr-defined]
        assert tenth.validation.indices == whole.validation.indices  # type: ignore[attr-defined]
        assert tenth.validation_identity == whole.validation_identity
        assert tenth.train_identity != whole.train_identity  # cached features are of what it trains on


def test_a_real_node_and_a_simulations_virtual_client_keep_the_same_examples(tmp_path: Path) -> None:
    settings_ = _digits(0.25)
    real = NodeIdentity.from_node_config({"partition-id": 4, "cache-dir": str(tmp_path)}, simulated=False)
    virtual = NodeIdentity.from_node_config({"partition-id": 0, "cache-dir": str(tmp_path)}, simulated=True).playing(
        VirtualClient(partition=4, clients=NUM_CLIENTS))

    assert local_data(settings_, real).train.indices == local_data(settings_, virtual).train.indices  # type: ignore[attr-defined]


@pytest.mark.usefixtures("server_identity")
def test_a_node_trains_on_the_fraction_the_server_sends_and_evaluates_on_all_of_its_validation(
    tmp_path: Path,
) -> None:
    node = Node(cache=tmp_path / "node")
    assert not node.send(query(with_backbone=True)).has_error()

    def examples(fraction: float, message_type: str) -> int:
        config = {**round_config(), keys.CLIENT_CONFIG: json.dumps(settings(f"data.train_fraction={fraction}"))}
        reply = node.send(instruction(config, message_type=message_type))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return int(reply.content[keys.METRICS][keys.NUM_EXAMPLES])

    whole = examples(1.0, MessageType.TRAIN)
    assert examples(0.1, MessageType.TRAIN) == math.ceil(round(0.1 * whole, 9))
    assert examples(0.1, MessageType.EVALUATE) == examples(1.0, MessageType.EVALUATE)


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize(("value", "problem"), [
    (0, "data.train_fraction: Input should be greater than 0"),
    (-1e300, "data.train_fraction: Input should be greater than 0"),
    (1.5, "data.train_fraction: Input should be less than or equal to 1"),
    (float("nan"), "data.train_fraction"),
    (float("inf"), "data.train_fraction"),
    ("0.5", "data.train_fraction: Input should be a valid number"),
    (True, "data.train_fraction: Input should be a valid number"),
])
def test_a_node_refuses_a_fraction_outside_0_1_from_the_server(tmp_path: Path, value: object, problem: str) -> None:
    node = Node(cache=tmp_path / "node")
    assert not node.send(query(with_backbone=True)).has_error()
    data = settings()
    data["data"]["train_fraction"] = value
    config = {**round_config(), keys.CLIENT_CONFIG: json.dumps(data)}  # NaN and Infinity as JSON literals

    reply = node.send(instruction(config))

    assert reply.has_error()
    reason = str(reply.error.reason)
    assert reason.startswith(f"{keys.REFUSED}: {keys.CLIENT_CONFIG}: ") and problem in reason, reason
    assert len(reason) <= MAX_REASON_CHARS
    assert not (node.cache / "features").exists()
