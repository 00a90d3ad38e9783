"""The experiment file: validation errors name the key; overrides; the unfreeze schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import ClientSettings, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_committed_configs_are_valid() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("train:\n  lrr: 0.1\n", "train.lrr", "unknown key"),
        ("train:\n  lr: -1\n", "train.lr", "greater than 0"),
        ("train:\n  lr: fast\n", "train.lr", "valid number"),
        ("federation:\n  num_clients: 0\n", "federation.num_clients", "greater than or equal to 1"),
        ("strategy:\n  name: fedsgd\n", "strategy.name", "'fedavg'"),
        ("data:\n  source: mnist\n", "data", "unknown data source 'mnist'"),
        ("data:\n  partition:\n    scheme: dirichlet\n    alpha: 0\n", "data.partition.alpha", "greater than 0"),
        ("federation:\n  num_clients: 2\n  clients_per_round: 3\n", "federation", "exceeds num_clients"),
        ("train:\n  trainable_blocks: some\n", "train.trainable_blocks", "'all'"),
        (
            "federation:\n  rounds: 3\ntrain:\n  unfreeze:\n    - {from_round: 5, trainable_blocks: 1}\n",
            "train.unfreeze",
            "after the last round",
        ),
        (
            "train:\n  trainable_blocks: 2\n  unfreeze:\n    - {from_round: 2, trainable_blocks: 1}\n",
            "train",
            "must not decrease",
        ),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    message = str(error.value)
    assert "\n" not in message
    assert f"{key}:" in message
    assert hint in message


def test_not_a_mapping_and_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train:\n  lr: 0.1\n"), ["train.lr=0.02", "train.trainable_blocks=all",
                                                               "data.augment=true", "federation.rounds=7"])
    assert cfg.train.lr == 0.02
    assert cfg.train.trainable_blocks == "all"
    assert cfg.data.augment is True
    assert cfg.federation.rounds == 7
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(write(tmp_path, ""), ["train.nope=1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(write(tmp_path, ""), ["train.lr"])


def test_unfreeze_schedule_by_round(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            "federation:\n  rounds: 8\ntrain:\n  trainable_blocks: 0\n  unfreeze:\n"
            "    - {from_round: 4, trainable_blocks: 1}\n    - {from_round: 7, trainable_blocks: all}\n",
        )
    )
    assert [cfg.train.trainable_blocks_at(r) for r in range(1, 9)] == [0, 0, 0, 1, 1, 1, "all", "all"]


def test_client_settings_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train:\n  lr: 0.05\n"))
    text = ClientSettings.of(cfg, num_classes=10).to_message()
    settings = ClientSettings.from_message(text)
    assert settings.train.lr == 0.05
    assert settings.num_classes == 10
    assert len(text) < 400  # rides along with every message: keep it small


def test_unknown_backbone_and_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model: unknown backbone 'resnet17'; known: .*resnet18"):
        load_config(write(tmp_path, "model:\n  backbone: resnet17\n"))
    with pytest.raises(ConfigError, match="model.weights: no weights file at /nowhere/w.safetensors"):
        load_config(write(tmp_path, "model:\n  weights: /nowhere/w.safetensors\n"))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert load_config(write(tmp_path, f"model:\n  weights: {weights}\n")).model.weights == str(weights)
