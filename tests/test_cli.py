"""The `fedtune` command as a user meets it: one clear line for bad input, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedtune.backbones import build_model
from fedtune.cli import cli
from fedtune.config import load_config
from fedtune.results import RunDirectory

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("train:\n  lr: -0.1\n", "train.lr"),
        ("federation:\n  num_clientz: 3\n", "federation.num_clientz"),
        ("data:\n  partition:\n    scheme: random\n", "data.partition.scheme"),
        ("model:\n  head_dropout: 1.5\n", "model.head_dropout"),
    ],
)
def test_invalid_config_one_line_naming_the_key_and_nothing_written(
    tmp_path: Path, yaml_text: str, key: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text + f"output:\n  dir: {tmp_path / 'runs'}\n")
    result = runner.invoke(cli, ["simulate", str(config)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{key}:" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_invalid_override_names_the_key(tmp_path: Path) -> None:
    result = runner.invoke(cli, ["simulate", str(REPO / "configs/quickstart.yaml"), "--set", "train.epochs=3",
                                 "--set", f"output.dir={tmp_path / 'runs'}"])
    assert result.exit_code == 2
    assert "train.epochs: unknown key" in result.output
    assert not (tmp_path / "runs").exists()


def test_check_prints_the_resolved_config() -> None:
    result = runner.invoke(cli, ["check", str(REPO / "configs/quickstart.yaml"), "--set", "federation.rounds=5"])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["federation"]["rounds"] == 5
    assert resolved["model"]["backbone"] == "efficientnet_lite0"


def _saved_run(tmp_path: Path, *overrides: str) -> Path:
    """A run directory as the server leaves it, with an untrained (random-head) model."""
    cfg = load_config(REPO / "configs/quickstart.yaml", [f"output.dir={tmp_path}", "data.image_size=32", *overrides])
    torch.manual_seed(0)
    classes = [str(i) for i in range(10)] if cfg.data.source == "digits" else ["ants", "bees"]
    model = build_model(cfg.model.backbone, num_classes=len(classes), weights="imagenet")
    run = RunDirectory.create(tmp_path, cfg.name)
    run.write_config(cfg.to_json())
    run.save_model(model.state_dict(), {"backbone": cfg.model.backbone, "num_classes": str(len(classes)),
                                        "classes": ",".join(classes), "head_dropout": "0.0", "image_size": "32"})
    return run.path


def test_predict_on_the_runs_test_split(tmp_path: Path) -> None:
    run_dir = _saved_run(tmp_path)
    result = runner.invoke(cli, ["predict", str(run_dir), "--show", "3"])
    assert result.exit_code == 0, result.output
    assert "accuracy: " in result.output and "on 360 labelled images" in result.output
    assert result.output.count("(label: ") == 3


def test_predict_on_a_labelled_folder(tmp_path: Path, hymenoptera_root: Path) -> None:
    run_dir = _saved_run(tmp_path / "runs", "data.source=hymenoptera", f"data.root={hymenoptera_root}")
    folder = tmp_path / "photos"
    for label in ("ants", "bees"):
        (folder / label).mkdir(parents=True)
        for photo in sorted((hymenoptera_root / "val" / label).glob("*.jpg"))[:2]:
            (folder / label / photo.name).write_bytes(photo.read_bytes())
    result = runner.invoke(cli, ["predict", str(run_dir / "model.safetensors"), "--images", str(folder)])
    assert result.exit_code == 0, result.output
    assert "accuracy: " in result.output and "on 4 labelled images" in result.output


def test_predict_errors_are_one_line(tmp_path: Path) -> None:
    result = runner.invoke(cli, ["predict", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert result.output.startswith("error: model file not found")
    (tmp_path / "empty").mkdir()
    run_dir = _saved_run(tmp_path / "runs")
    result = runner.invoke(cli, ["predict", str(run_dir), "--images", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no images" in result.output
