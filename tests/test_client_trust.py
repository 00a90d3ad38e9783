"""A node against a hostile server: every value a server sends, at its worst, through the real ClientApp.

Each refused message gets an error reply that names the field and the problem, and leaves the
node's files as they were: no file named by the server is read, written or deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from server_messages import (
    NUM_CLIENTS,
    Node,
    global_model,
    instruction,
    query,
    round_config,
    settings,
)

from fedtune import messages as keys
from fedtune.client.cache import CACHE_MAX_ENV
from fedtune.client.task import NodeIdentity, in_simulation
from fedtune.config import DataConfig
from fedtune.params import trainable_state_dict
from fedtune.protocol import MAX_REASON_CHARS, RefusedMessage

pytestmark = pytest.mark.usefixtures("server_identity")


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(cache=tmp_path / "node" / "cache")


@pytest.fixture
def holding(node: Node) -> Node:
    """A node that has stored the global model."""
    reply = node.send(query(with_backbone=True))
    assert not reply.has_error() and reply.content[keys.METRICS][keys.HAS_MODEL] == 1
    return node


def _refused(reply: Message, field: str, *problem: str) -> str:
    assert reply.has_error(), "the message was acted upon"
    reason = reply.error.reason
    assert reason.startswith(f"{keys.REFUSED}: {field}: "), reason
    for words in problem:
        assert words in reason, reason
    assert len(reason) <= MAX_REASON_CHARS
    return reason


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- The model hash names a file: only a sha256 digest may --------------------------------------

BAD_HASHES: list[tuple[object, str]] = [
    ("../../victim", "64 lowercase hex"),
    ("/tmp/victim", "64 lowercase hex"),
    ("../" * 30 + "etc/passwd", "64 lowercase hex"),
    ("A" * 64, "64 lowercase hex"),  # upper case: not the form state_hash gives
    ("0" * 63, "64 lowercase hex"),
    ("0" * 65, "64 lowercase hex"),
    ("0" * 63 + "\n", "64 lowercase hex"),
    ("f" * 5_000_000, "64 lowercase hex"),
    (12345, "must be a string, got int"),
    (b"0" * 64, "must be a string, got bytes"),
    (["0" * 64], "must be a string, got list"),
]


@pytest.mark.parametrize(("model_hash", "problem"), BAD_HASHES)
def test_a_query_with_a_malformed_hash_is_refused_and_touches_no_file(
    node: Node, tmp_path: Path, model_hash: object, problem: str
) -> None:
    # What '../../victim' would reach from the node's model folder: a file that a failed load used to delete.
    victim = node.cache / "models" / ".." / ".." / "victim.safetensors"
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_bytes(b"not a model")
    before = _files(tmp_path)

    reply = node.send(query(model_hash=model_hash))

    reason = _refused(reply, keys.MODEL_HASH, problem)
    assert _files(tmp_path) == before
    if isinstance(model_hash, str):
        assert len(reason) < 300  # an excerpt of the value, not the value


def test_the_model_query_is_no_file_existence_oracle(node: Node, tmp_path: Path) -> None:
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "present.safetensors").write_bytes(b"x")  # where '../../present' leads

    present = node.send(query(model_hash="../../present"))
    absent = node.send(query(model_hash="../../absent"))

    # Both refused for their form alone, whether or not the file exists.
    _refused(present, keys.MODEL_HASH)
    _refused(absent, keys.MODEL_HASH)
    assert present.error.reason.replace("present", "absent") == absent.error.reason


@pytest.mark.parametrize(("model_hash", "problem"), BAD_HASHES[:4])
def test_a_train_message_with_a_malformed_hash_is_refused_and_deletes_nothing(
    holding: Node, model_hash: object, problem: str
) -> None:
    victim = holding.cache.parent / "victim.safetensors"
    victim.write_bytes(b"not a model")  # a failed load used to delete the *.safetensors file it named
    config = {**round_config(), keys.MODEL_HASH: model_hash}

    _refused(holding.send(instruction(config)), keys.MODEL_HASH, problem)

    assert victim.read_bytes() == b"not a model"
    assert not (holding.cache / "features").exists()  # nothing was computed


def test_a_backbone_that_is_not_what_its_hash_announces_is_not_stored(node: Node) -> None:
    other = global_model(seed=1)

    reply = node.send(query(model_hash=global_model().model_hash, backbone=other.state))

    _refused(reply, keys.BACKBONE, "hashes to", "not the announced")
    assert node.model_files() == []


@pytest.mark.parametrize("change", ["extra config key", "extra record", "metric record", "no config"])
def test_a_query_of_another_shape_is_refused(node: Node, change: str) -> None:
    message = query(with_backbone=True)
    if change == "extra config key":
        message.content[keys.CONFIG]["fedtune.path"] = "/etc"
        field = keys.CONFIG
    elif change == "extra record":
        message.content["more"] = ArrayRecord({"x": torch.zeros(1)})
        field = "content"
    elif change == "metric record":
        message.content["metrics"] = MetricRecord({"x": 1})
        field = "content"
    else:
        del message.content[keys.CONFIG]
        field = keys.CONFIG

    _refused(node.send(message), field)
    assert node.model_files() == []


def test_a_query_without_a_hash_is_answered_without_touching_the_cache(node: Node) -> None:
    # A simulation's warm-up, sent before the server has built its model.
    message = query()
    del message.content[keys.CONFIG][keys.MODEL_HASH]
    answer = node.send(message)
    assert dict(answer.content[keys.METRICS]) == {keys.HAS_MODEL: 0, keys.PARTITION: 0}
    assert not node.cache.exists()


def test_a_backbone_without_its_hash_is_refused_and_not_stored(node: Node) -> None:
    message = query(with_backbone=True)
    del message.content[keys.CONFIG][keys.MODEL_HASH]
    _refused(node.send(message), keys.MODEL_HASH, "a backbone comes with the hash it is checked against")
    assert node.model_files() == []


def test_the_query_answer_carries_the_partition_label(tmp_path: Path) -> None:
    node = Node(cache=tmp_path / "cache", partition=7)
    answer = node.send(query())
    assert dict(answer.content[keys.METRICS]) == {keys.HAS_MODEL: 0, keys.PARTITION: 7}


# --- Round instructions: each field at its worst --------------------------------------------------


@pytest.mark.parametrize(("key", "value", "problem"), [
    (keys.SERVER_ROUND, -1, "between 1 and 10000"),
    (keys.SERVER_ROUND, 0, "between 1 and 10000"),
    (keys.SERVER_ROUND, 10**12, "between 1 and 10000"),
    (keys.SERVER_ROUND, True, "must be an integer, got bool"),
    (keys.SERVER_ROUND, "1", "must be an integer, got str"),
    (keys.SERVER_ROUND, 1.5, "must be an integer, got float"),
    (keys.PROXIMAL_MU, -1.0, "finite number in [0, 1000]"),
    (keys.PROXIMAL_MU, float("nan"), "finite number"),
    (keys.PROXIMAL_MU, float("inf"), "finite number"),
    (keys.PROXIMAL_MU, 1e308, "finite number in [0, 1000]"),
    (keys.PROXIMAL_MU, True, "must be a number, got bool"),
    (keys.PROXIMAL_MU, "0.1", "must be a number, got str"),
    (keys.TRAINABLE_STAGES, ["../../x"], "is not a stage name"),
    (keys.TRAINABLE_STAGES, ["head/../x"], "is not a stage name"),
    (keys.TRAINABLE_STAGES, [], "non-empty list"),
    (keys.TRAINABLE_STAGES, "head", "non-empty list"),
    (keys.TRAINABLE_STAGES, ["head", "head"], "names a stage twice"),
    (keys.TRAINABLE_STAGES, [f"s{i}" for i in range(100_000)], "more than 256"),
    (keys.TRAINABLE_STAGES, ["x" * 100_000], "is not a stage name"),
    (keys.TRAINABLE_STAGES, ["features_99", "head"], "is not a stage of mobilenet_v3_small"),
    (keys.TRAINABLE_STAGES, [1, 2], "is not a stage name"),
    (keys.CLIENT_CONFIG, "x" * 70_000, "70000 characters long, more than 65536"),
    (keys.CLIENT_CONFIG, "{not json", "Invalid JSON"),
    (keys.CLIENT_CONFIG, "[" * 60_000, "client settings from the server"),
    (keys.CLIENT_CONFIG, 5, "must be a JSON string, got int"),
    (KEY_CLIPPING_NORM, float("nan"), "finite number in (0, 1e+06]"),
    (KEY_CLIPPING_NORM, 0.0, "finite number in (0, 1e+06]"),
    (KEY_CLIPPING_NORM, "1.0", "must be a number"),
    ("fedtune.data-root", "/etc", "unknown key 'fedtune.data-root'"),
])
def test_a_malformed_field_of_a_round_is_refused(holding: Node, key: str, value: object, problem: str) -> None:
    config = {**round_config(), key: value}
    field = keys.CONFIG if key.startswith("fedtune.data") else key

    for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
        _refused(holding.send(instruction(config, message_type=message_type)), field, problem)
    assert not (holding.cache / "features").exists()


@pytest.mark.parametrize("missing", [keys.CLIENT_CONFIG, keys.MODEL_HASH, keys.TRAINABLE_STAGES, keys.SERVER_ROUND])
def test_a_round_without_a_required_field_is_refused(holding: Node, missing: str) -> None:
    config = round_config()
    del config[missing]
    _refused(holding.send(instruction(config)), missing, "missing")


def test_settings_without_a_version_are_refused(holding: Node) -> None:
    # The record of another fedtune release: the node says so instead of misreading a field.
    data = settings()
    del data["version"]
    config = {**round_config(), keys.CLIENT_CONFIG: json.dumps(data)}
    _refused(holding.send(instruction(config)), keys.CLIENT_CONFIG, "no version, but this node reads version 4 only")


def _with(path: str, value: object) -> str:
    """The settings JSON with one (dotted) entry replaced, as a hostile server would write it."""
    data = settings()
    *parents, last = path.split(".")
    target = data
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value
    return json.dumps(data)  # allow_nan: Infinity and NaN are written as JSON literals


@pytest.mark.parametrize(("path", "value", "problem"), [
    ("num_classes", 10**12, "num_classes: Input should be less than or equal to 100000"),
    ("num_classes", True, "num_classes: Input should be a valid integer"),
    ("num_classes", 10.0, "num_classes: Input should be a valid integer"),
    ("num_classes", "10", "num_classes: Input should be a valid integer"),
    ("num_clients", 10**9, "num_clients: Input should be less than or equal to 10000"),
    ("rounds", 10**9, "rounds: Input should be less than or equal to 10000"),
    ("seed", -1, "seed: Input should be greater than or equal to 0"),
    ("seed", 2**70, "seed: Input should be less than or equal to 4294967295"),
    ("train.local_epochs", 10**9, "train.local_epochs: Input should be less than or equal to 1000"),
    ("train.batch_size", 10**18, "train.batch_size: Input should be less than or equal to 65536"),
    ("train.lr", float("inf"), "train.lr: Input should be a finite number"),
    ("train.lr", float("nan"), "train.lr"),
    ("train.trainable_blocks", 10**9, "train.trainable_blocks"),
    ("train.lr_multipliers", {"../x": 2.0}, "train.lr_multipliers: '../x' is not a stage of mobilenet_v3_small"),
    ("train.lr_multipliers", {f"s{i}": 1.0 for i in range(2000)}, "train.lr_multipliers"),
    ("data.image_size", 10**6, "data.image_size: Input should be less than or equal to 1024"),
    ("data.source", "x" * 5000, "data.source: String should have at most 256 characters"),
    ("data.root", "/" + "x" * 5000, "data.root: String should have at most 4096 characters"),
    ("data.partition.min_examples", 10**12, "min_examples: Input should be less than or equal to 1000000"),
    ("data.partition.alpha", float("inf"), "alpha: Input should be a finite number"),
    ("dp_sgd.max_grad_norm", float("inf"), "max_grad_norm"),
    ("dp_sgd.clipping", "x" * 5000, "dp_sgd.clipping: Input should be 'auto', 'ghost' or 'per_sample'"),
    ("dp_sgd.clipping", 1, "dp_sgd.clipping: Input should be 'auto', 'ghost' or 'per_sample'"),
    ("model.backbone", "../../evil", "unknown backbone"),
    ("run_key", "../../x", "run_key: String should match pattern"),
    ("run_key", "a" * 300, "run_key: String should have at most 200 characters"),
    ("train.adapter", "x" * 5000, "train.adapter: Input should be 'none', 'lora' or 'bitfit'"),
    ("train.adapter", "lora", "adapter: lora adapts the trainable blocks below the head, and trainable_blocks is 0"),
    ("train.lora.rank", 10**9, "train.lora.rank: Input should be less than or equal to 1024"),
    ("train.lora.target_modules", ["../x"], "train.lora.target_modules"),
    ("train.lora.target_modules", ["a" * 5000], "train.lora.target_modules"),
    ("train.lora.target_modules", [f"m{i}" for i in range(5000)], "train.lora.target_modules"),
    ("evil", 1, "evil: unknown key"),
    ("version", 2, "version 2, but this node reads version 4 only: the server and this node run different fedtune"),
    ("version", True, "version True, but this node reads version 4 only"),
])
def test_settings_beyond_their_bounds_are_refused(holding: Node, path: str, value: object, problem: str) -> None:
    config = {**round_config(), keys.CLIENT_CONFIG: _with(path, value)}
    _refused(holding.send(instruction(config)), keys.CLIENT_CONFIG, problem)
    assert not (holding.cache / "privacy").exists() and not (holding.cache / "features").exists()


@pytest.mark.parametrize(("overrides", "problem"), [
    (("train.lora.target_modules=[qkv]",), "no layer named qkv in the adapted blocks (features_12, pre_logits)"),
    (("train.lora.target_modules=['2']",), "2 is a Hardswish; LoRA adapts Linear, Conv2d"),
    (("train.trainable_blocks=99",), "trainable_blocks=99 but the backbone has only 14 blocks"),
])
def test_adapters_that_do_not_fit_the_backbone_are_refused_by_name(
    holding: Node, overrides: tuple[str, ...], problem: str
) -> None:
    """Well-formed settings whose adapters cannot be built on this backbone: refused before anything runs."""
    client_settings = settings("train.adapter=lora", "train.trainable_blocks=2", *overrides)
    config = {**round_config(), keys.CLIENT_CONFIG: json.dumps(client_settings)}
    _refused(holding.send(instruction(config)), keys.CLIENT_CONFIG, problem)


def _trainable() -> dict[str, torch.Tensor]:
    model = global_model()
    return {k: v.clone() for k, v in trainable_state_dict(model.model, model.stages).items()}


@pytest.mark.parametrize(("change", "problem"), [
    ("nan", "holds NaN or infinite values"),
    ("inf", "holds NaN or infinite values"),
    ("float64", "has dtype torch.float64"),
    ("extra key", "unexpected ['stages.features_0.0.weight']"),
    ("missing key", "missing ["),
    ("shape", "does not match the model's"),
])
def test_malformed_tensors_are_refused(holding: Node, change: str, problem: str) -> None:
    tensors = _trainable()
    name = sorted(tensors)[-1]
    if change in ("nan", "inf"):
        tensors[name].view(-1)[0] = float(change)
    elif change == "float64":
        tensors[name] = tensors[name].double()
    elif change == "extra key":
        tensors["stages.features_0.0.weight"] = global_model().state["stages.features_0.0.weight"]
    elif change == "missing key":
        del tensors[name]
    else:
        tensors[name] = torch.zeros(3, 3)
    _refused(holding.send(instruction(round_config(), arrays=tensors)), keys.ARRAYS, problem)


def test_a_round_of_another_shape_is_refused(holding: Node) -> None:
    message = instruction(round_config())
    message.content["extra"] = ConfigRecord({"x": 1})
    _refused(holding.send(message), "content", "unexpected config record 'extra'")


def test_a_well_formed_round_trains_and_evaluates(holding: Node) -> None:
    config = {**round_config(), keys.PROXIMAL_MU: 0.01, KEY_CLIPPING_NORM: 10.0}
    trained = holding.send(instruction(config))
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""
    assert trained.content[keys.METRICS][keys.NUM_EXAMPLES] > 0
    evaluated = holding.send(instruction(round_config(), message_type=MessageType.EVALUATE))
    assert not evaluated.has_error() and evaluated.content[keys.METRICS][keys.NUM_EXAMPLES] > 0


# --- A node that lost its model says so ----------------------------------------------------------


def test_a_node_without_the_model_says_so(node: Node) -> None:
    reply = node.send(instruction(round_config()))
    assert reply.has_error() and reply.error.reason.startswith(f"{keys.MODEL_MISSING}: ")


@pytest.mark.parametrize("damage", ["deleted", "flipped byte", "truncated"])
def test_a_node_whose_model_was_lost_says_so_and_trains_once_it_is_sent_again(holding: Node, damage: str) -> None:
    [path] = holding.model_files()
    if damage == "deleted":
        path.unlink()
    elif damage == "flipped byte":
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x01
        path.write_bytes(bytes(raw))
    else:
        path.write_bytes(path.read_bytes()[:100])

    reply = holding.send(instruction(round_config()))

    assert reply.has_error() and reply.error.reason.startswith(f"{keys.MODEL_MISSING}: ")
    assert not path.exists()  # a damaged copy is removed, so the node answers the next query truthfully
    assert holding.send(query()).content[keys.METRICS][keys.HAS_MODEL] == 0
    assert holding.send(query(with_backbone=True)).content[keys.METRICS][keys.HAS_MODEL] == 1
    assert not holding.send(instruction(round_config())).has_error()


# --- The cache cap, set by the node --------------------------------------------------------------


def test_the_cache_cap_comes_from_the_node_config_and_refuses_a_model_too_large(tmp_path: Path) -> None:
    node = Node(cache=tmp_path / "cache", extra_config={"cache-max-gb": 0.001})  # 1 MB, the model is 6 MB

    reply = node.send(query(with_backbone=True))

    assert reply.has_error() and "larger than this node's cache cap" in reply.error.reason
    assert node.model_files() == []


def test_the_cache_cap_evicts_the_least_recently_used_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_MAX_ENV, "0.015")  # 16 MB: two of the 6 MB models, not three
    node = Node(cache=tmp_path / "cache")
    first, second, third = (global_model(seed) for seed in range(3))
    node.send(query(first, with_backbone=True))
    node.send(query(second, with_backbone=True))
    os.utime(node.cache / "models" / f"{second.model_hash}.safetensors", (1, 1))  # long unused
    node.send(query(third, with_backbone=True))

    answers = [node.send(query(m)).content[keys.METRICS][keys.HAS_MODEL] for m in (first, second, third)]
    assert answers == [1, 0, 1]


@pytest.mark.parametrize("value", ["-1", "0", "lots", "inf", "nan", "1e300"])
def test_a_malformed_cache_cap_is_named(value: str) -> None:
    with pytest.raises(ValueError, match="node config cache-max-gb: must be a number of gigabytes"):
        NodeIdentity.from_node_config({"partition-id": 0, "cache-max-gb": value}, simulated=False)


# --- Feature cache: a damaged entry is never trained on ------------------------------------------


@pytest.mark.parametrize("damage", ["flipped byte", "replaced labels"])
def test_a_damaged_feature_entry_is_recomputed_before_training(
    holding: Node, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    def read(entry: Path) -> tuple[dict[str, str], torch.Tensor, torch.Tensor]:
        with safe_open(entry, framework="pt") as reader:  # copies: safetensors may map the file
            return reader.metadata(), reader.get_tensor("features").clone(), reader.get_tensor("labels").clone()

    assert not holding.send(instruction(round_config())).has_error()
    [entry] = sorted((holding.cache / "features").glob("*.safetensors"))
    metadata, features, labels = read(entry)
    if damage == "flipped byte":
        raw = bytearray(entry.read_bytes())
        raw[-3] ^= 0x10
        entry.write_bytes(bytes(raw))
    else:
        save_file({"features": features, "labels": (labels + 1) % 10}, str(entry), metadata=metadata)

    with caplog.at_level(logging.WARNING, logger="fedtune.client"):
        reply = holding.send(instruction(round_config(server_round=2)))

    assert not reply.has_error()
    assert any(str(entry) in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    again, features_again, labels_again = read(entry)  # recomputed: the same features and labels as before
    assert again == metadata and torch.equal(features_again, features) and torch.equal(labels_again, labels)


# --- Data: on a real node, the path and the download come from the node alone -------------------


def test_a_real_node_does_not_read_the_folder_the_server_names(holding: Node, tmp_path: Path) -> None:
    server_folder = tmp_path / "server-says"
    server_folder.mkdir()
    data = settings()
    data["data"].update(source="imagefolder", root=str(server_folder), download=True)
    config = {**round_config(), keys.CLIENT_CONFIG: json.dumps(data)}

    with pytest.raises(ValueError, match=r"a real node reads only the folder its own config names: start it "
                                         r"with --data PATH"):
        holding.send(instruction(config))


def test_a_real_node_does_not_download_because_the_server_says_so(tmp_path: Path) -> None:
    own = tmp_path / "own-data"
    own.mkdir()
    node = Node(cache=tmp_path / "cache", extra_config={"data-root": str(own)})
    node.send(query(with_backbone=True))
    data = settings()
    data["data"].update(source="torchvision:MNIST", root="/server/folder", download=True)
    config = {**round_config(), keys.CLIENT_CONFIG: json.dumps(data)}

    # torchvision looks in the node's own folder only, and is not told to download.
    with pytest.raises(FileNotFoundError, match=f"not found or incomplete under {own}"):
        node.send(instruction(config))
    assert list(own.iterdir()) == []


def test_where_data_comes_from_on_real_and_virtual_nodes(tmp_path: Path) -> None:
    experiment = DataConfig(source="imagefolder", root="/experiment/data", download=True)
    real = NodeIdentity.from_node_config({"partition-id": 0, "data-root": "/node/data"}, simulated=False)
    allowed = NodeIdentity.from_node_config({"partition-id": 0, "data-root": "/node/data", "download": True},
                                            simulated=False)
    virtual = NodeIdentity.from_node_config({"partition-id": 0, "num-partitions": NUM_CLIENTS}, simulated=True)
    assert real.data_location(experiment) == ("/node/data", False)
    assert allowed.data_location(experiment) == ("/node/data", True)
    assert virtual.data_location(experiment) == ("/experiment/data", True)  # the user's own file, on their machine
    assert real.data_location(DataConfig(source="digits")) == ("/node/data", False)


def test_this_process_is_not_a_virtual_node() -> None:
    # pytest is no Ray actor of Flower's simulation engine: the handlers here act as a real node's.
    assert in_simulation() is False
    assert NodeIdentity.from_node_config({"partition-id": 0}).simulated is False


def test_the_node_config_flags_are_checked() -> None:
    with pytest.raises(ValueError, match="node config download: must be true or false"):
        NodeIdentity.from_node_config({"partition-id": 0, "download": "yes please"}, simulated=False)
    with pytest.raises(ValueError, match="node config partition-id: must be between 0 and 1000000"):
        NodeIdentity.from_node_config({"partition-id": -3}, simulated=False)
    for value in ("inf", "nan", "-1", "0", "plenty"):
        with pytest.raises(ValueError, match="node config max-epsilon: must be"):
            NodeIdentity.from_node_config({"partition-id": 0, "max-epsilon": value}, simulated=False)
    with pytest.raises(ValueError, match="node config max-delta: must be above 0 and below 1"):
        NodeIdentity.from_node_config({"partition-id": 0, "max-epsilon": 1, "max-delta": 1.5}, simulated=False)


# --- The node's own privacy budget: a server cannot turn DP-SGD off, nor loosen it -------------


def _private_round(*overrides: str) -> dict[str, object]:
    return round_config(settings_json=json.dumps(settings("privacy.dp_sgd.enabled=true", *overrides)))


def _holding_node(cache: Path, **node_config: object) -> Node:
    node = Node(cache=cache, extra_config=node_config)
    assert not node.send(query(with_backbone=True)).has_error()
    return node


def test_a_node_with_its_own_budget_refuses_a_round_without_dp_sgd(tmp_path: Path) -> None:
    strict = _holding_node(tmp_path / "strict", **{"max-epsilon": 1.0})
    _refused(strict.send(instruction(round_config())), "dp_sgd", "trains only under DP-SGD", "max-epsilon is 1")


@pytest.mark.parametrize(("override", "field", "problem"), [
    ("privacy.dp_sgd.target_delta=0.5", "dp_sgd.target_delta", "above this node's max-delta 1e-05"),
    ("privacy.dp_sgd.poisson_sampling=false", "dp_sgd.poisson_sampling", "accounted for Poisson sampling"),
    ("privacy.dp_sgd.reproducible=true", "dp_sgd.reproducible", "noise seeded from the run's seed"),
])
def test_a_node_with_its_own_budget_refuses_looser_accounting(tmp_path: Path, override: str, field: str,
                                                              problem: str) -> None:
    strict = _holding_node(tmp_path / "strict", **{"max-epsilon": 1.0})
    _refused(strict.send(instruction(_private_round(override))), field, problem)


def test_a_node_holds_the_servers_budget_to_its_own(tmp_path: Path) -> None:
    # The server asks for epsilon 50 over the run; the node with max-epsilon 1 calibrates its noise
    # to 1 instead, and the one without a floor follows the server.
    config = _private_round("privacy.dp_sgd.target_epsilon=50")
    loose = _holding_node(tmp_path / "loose").send(instruction(config))
    strict = _holding_node(tmp_path / "strict", **{"max-epsilon": 1.0}).send(instruction(config))
    assert not loose.has_error() and not strict.has_error(), (loose.error if loose.has_error() else strict.error)
    loose_metrics, strict_metrics = loose.content[keys.METRICS], strict.content[keys.METRICS]
    assert strict_metrics[keys.NOISE_MULTIPLIER] > loose_metrics[keys.NOISE_MULTIPLIER]
    assert strict_metrics[keys.EPSILON] <= 1.0 < loose_metrics[keys.EPSILON]


def test_dp_sgd_that_would_send_batchnorm_statistics_back_is_refused(holding: Node) -> None:
    tampered = settings("privacy.dp_sgd.enabled=true")
    tampered["freeze_statistics"] = False
    _refused(holding.send(instruction(round_config(settings_json=json.dumps(tampered)))), "freeze_statistics",
             "BatchNorm statistics kept frozen")


# --- Secure aggregation: the legacy FitIns entries fedtune adds --------------------------------


def _legacy_train(entries: dict[str, object]) -> Message:
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from fedtune.protocol import encode_secure_fit_config

    tensors = {k: v.numpy() for k, v in _trainable().items()}
    fit_config = encode_secure_fit_config(ConfigRecord(round_config()), list(tensors), clipping_range=8.0,
                                          max_weight=1000.0)
    fit_config.update(entries)
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(list(tensors.values())), fit_config),
                                          keep_input=True)
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.mark.parametrize(("entry", "value", "problem"), [
    ("fedtune.secagg.config", "[" * 200_000, "not valid JSON (RecursionError)"),
    ("fedtune.secagg.config", "x" * 300_000, "300000 characters long"),
    ("fedtune.secagg.config", "[1, 2]", "must hold a JSON object, got list"),
    ("fedtune.secagg.config", '{"a": {"b": 1}}', "Not all values are of valid type"),
    ("fedtune.secagg.config", 5, "must be a JSON string, got int"),
    ("fedtune.secagg.array-keys", '"stages.head.3.weight"', "JSON list of tensor names"),
    ("fedtune.secagg.array-keys", '["a", "a"]', "names a tensor twice"),
    ("fedtune.secagg.clipping-range", float("nan"), "finite number in (0, 1e+12]"),
    ("fedtune.secagg.clipping-range", float("inf"), "finite number in (0, 1e+12]"),
    ("fedtune.secagg.clipping-range", -8.0, "finite number in (0, 1e+12]"),
    ("fedtune.secagg.clipping-range", True, "must be a number, got bool"),
    ("fedtune.secagg.max-weight", 0.0, "finite number in (0, 1e+12]"),
])
def test_malformed_secure_aggregation_entries_are_refused_before_training(
    node: Node, entry: str, value: object, problem: str
) -> None:
    from fedtune.client.secure_aggregation import _train_in_legacy_layout

    trained: list[Message] = []
    with pytest.raises(RefusedMessage, match=re.escape(f"{entry}: ") + ".*" + re.escape(problem)):
        _train_in_legacy_layout(_legacy_train({entry: value}), node.context, lambda m, c: trained.append(m))
    assert trained == []
