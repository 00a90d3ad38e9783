"""The `fedtune` command as a user meets it: one clear line for bad input, nothing half-written."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import Result
from image_files import write_bomb_png, write_image_folder, write_truncated_png
from safetensors.torch import save_file
from typer.testing import CliRunner

from fedtune.backbones import BACKBONES, build_model
from fedtune.cli import cli
from fedtune.config import load_config
from fedtune.model_file import CLASS_NAMES, encode_class_names
from fedtune.report import RunDirectory
from fedtune.server.checkpoint import CHECKPOINT_FILE, Checkpoint, RandomState

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


def _saved_run(tmp_path: Path, *overrides: str, classes: list[str] | None = None) -> Path:
    """A run directory as the server leaves it, with an untrained (random-head) model."""
    cfg = load_config(REPO / "configs/quickstart.yaml", [f"output.dir={tmp_path}", "data.image_size=32", *overrides])
    torch.manual_seed(0)
    if classes is None:
        classes = [str(i) for i in range(10)] if cfg.data.source == "digits" else ["ants", "bees"]
    model = build_model(cfg.model.backbone, num_classes=len(classes), weights="imagenet")
    run = RunDirectory.create(tmp_path, cfg.name)
    run.write_config(cfg.to_json())
    run.save_model(model.state_dict(), {"backbone": cfg.model.backbone, "num_classes": str(len(classes)),
                                        CLASS_NAMES: encode_class_names(classes), "head_dropout": "0.0",
                                        "image_size": "32"})
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


# --- every bad input: one line naming the key or the file, exit code 2, nothing written ------------


def _one_error_line(result: Result) -> str:
    """The single line a bad input must give; no traceback, no other output."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and len(lines[0]) < 1000
    return lines[0]


def _image_data(root: Path) -> Path:
    write_image_folder(root / "train", {"cat": 4, "dog": 4})
    write_image_folder(root / "test", {"cat": 2, "dog": 2})
    return root


def _setup_nothing(tmp_path: Path) -> str:
    return ""


def _setup_image_folder(tmp_path: Path) -> str:
    return str(_image_data(tmp_path / "images"))


def _setup_bomb_in_test_split(tmp_path: Path) -> str:
    root = _image_data(tmp_path / "images")
    write_bomb_png(root / "test" / "dog" / "huge.png")
    return str(root)


def _setup_truncated_in_test_split(tmp_path: Path) -> str:
    root = _image_data(tmp_path / "images")
    write_truncated_png(root / "test" / "cat" / "cut.png")
    return str(root)


def _setup_truncated_weights(tmp_path: Path) -> str:
    path = tmp_path / "weights.safetensors"
    save_file(BACKBONES["resnet18"].build().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:50_000])
    return str(path)


def _setup_nan_weights(tmp_path: Path) -> str:
    state = BACKBONES["resnet18"].build().state_dict()
    state["layer4.1.bn2.weight"][3] = float("nan")
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    return str(path)


_IMAGES = "data:\n  source: imagefolder\n  root: {setup}\n  image_size: 32\n  partition: {min_examples: 1}\n"
BAD_INPUTS = [
    # (id, experiment file, what the setup makes (its result fills {setup}), what the line must name)
    ("empty-file", "", _setup_nothing, "bad.yaml: the file is empty (or holds only comments); to run with every "
                                       "default setting, write {} in it"),
    ("section-twice", "train:\n  optimizer: adam\n  lr: 0.5\ntrain:\n  lr: 0.01\n", _setup_nothing,
     "duplicate key train (lines 1 and 4)"),
    ("not-utf8", b"name: caf\xe9\n", _setup_nothing, "bad.yaml: not UTF-8 text (byte 0xe9 at offset 9)"),
    ("5000-levels", "train: " + "[" * 5000 + "]" * 5000 + "\n", _setup_nothing, "nested more than 32 levels deep"),
    ("huge-value", "name: " + "z" * 900_000 + "!\n", _setup_nothing, "name: String should have at most 128 characters"),
    ("bool-as-int", "federation:\n  num_clients: true\n", _setup_nothing, "federation.num_clients: Input should "
                                                                           "be a valid integer (got True)"),
    ("float-as-int", "train:\n  batch_size: 1e18\n", _setup_nothing, "train.batch_size: Input should be a valid "
                                                                      "integer (got 1e+18)"),
    ("no-data-root", "data:\n  source: imagefolder\n", _setup_nothing, "the imagefolder source needs data.root"),
    ("missing-data-root", "data:\n  source: hymenoptera\n  root: {setup}/nowhere\n", _setup_nothing,
     "no hymenoptera_data (train/ and val/) at"),
    ("unknown-stage", "train:\n  lr_multipliers: {conv_head: 0.1, block_9: 0.5}\n", _setup_nothing,
     "train.lr_multipliers: efficientnet_lite0 has no stage named 'block_9'"),
    ("too-many-blocks", "train:\n  trainable_blocks: 12\n", _setup_nothing,
     "train.trainable_blocks: 12 is more than the 9 blocks of efficientnet_lite0"),
    ("unfreeze-too-far", "federation:\n  rounds: 3\ntrain:\n  unfreeze: [{from_round: 2, trainable_blocks: 10}]\n",
     _setup_nothing, "train.unfreeze[0].trainable_blocks: 10 is more than the 9 blocks"),
    ("not-a-torchvision-set", "data:\n  source: torchvision:Cifar10\n  root: {setup}\n", _setup_nothing,
     "data: unknown torchvision dataset 'Cifar10'"),
    ("infeasible-partition", "federation:\n  num_clients: 2000\n", _setup_nothing,
     "data.partition: num_partitions must be between 1 and the number of examples (1437)"),
    ("truncated-weights", "model:\n  backbone: resnet18\n  weights: {setup}\n", _setup_truncated_weights,
     "weights.safetensors is not a readable safetensors file"),
    ("nan-weights", "model:\n  backbone: resnet18\n  weights: {setup}\n", _setup_nan_weights,
     "weights.safetensors: tensor layer4.1.bn2.weight holds NaN or infinite values"),
    ("bomb-in-test-split", _IMAGES, _setup_bomb_in_test_split, "test/dog/huge.png: too large to decode safely"),
    ("truncated-in-test-split", _IMAGES, _setup_truncated_in_test_split, "test/cat/cut.png: cannot be decoded"),
]


@pytest.mark.parametrize(("case", "text", "setup", "expected"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_each_bad_input_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, case: str, text: str | bytes, setup: Callable[[Path], str], expected: str
) -> None:
    made = setup(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_bytes(text.replace("{setup}", made).encode() if isinstance(text, str) else text)
    # simulate before Ray starts, server before the SuperLink does; a server's clients partition
    # their own data, so only simulations check the partitioning.
    commands = [["check"], ["simulate"]]
    if case != "infeasible-partition":
        commands.append(["server", "--host", "127.0.0.1"])
    for command in commands:
        result = runner.invoke(cli, [*command, str(config), "--set", f"output.dir={tmp_path / 'runs'}"])
        line = _one_error_line(result)
        assert expected in line, line
    assert not (tmp_path / "runs").exists()


def test_a_bad_input_in_a_real_process_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "deep.yaml"
    config.write_text("train: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n")
    done = subprocess.run([sys.executable, "-m", "fedtune", "check", str(config)], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"error: {config}: not valid YAML: line 1, column 129: nested more than 32 levels deep\n"


def test_output_dir_naming_a_file_is_caught_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "results").write_text("a file, not a folder")
    for where in ("results", "results/runs"):
        line = _one_error_line(runner.invoke(cli, ["simulate", str(REPO / "configs/quickstart.yaml"),
                                                   "--set", f"output.dir={tmp_path / where}"]))
        assert f"output.dir: {tmp_path / where} " in line and "is a file, not a folder" in line
    assert (tmp_path / "results").read_text() == "a file, not a folder"


def test_a_damaged_checkpoint_stops_the_resume_before_anything_starts(tmp_path: Path) -> None:
    """It is named, never used, and neither overwritten nor passed over for a fresh run."""
    overrides = [f"output.dir={tmp_path / 'runs'}", "federation.rounds=5"]
    cfg = load_config(REPO / "configs/quickstart.yaml", overrides)
    run_dir = RunDirectory.create(cfg.output.dir, cfg.name)
    run_dir.write_config(cfg.to_json())
    Checkpoint(round=1, run_key="quickstart-0123456789ab", model_hash="0" * 64, elapsed_seconds=1.0,
               model={"w": torch.ones(8)}, strategy_tensors={}, strategy_scalars={},
               random_state=RandomState.capture(), early_stopping={}, at_budget=[], privacy={}).save(run_dir.path)
    checkpoint = run_dir.path / CHECKPOINT_FILE
    damaged = bytearray(checkpoint.read_bytes())
    damaged[-1] ^= 0x01  # one bit of the last tensor
    checkpoint.write_bytes(bytes(damaged))

    for command in ("check", "simulate"):
        line = _one_error_line(runner.invoke(cli, [command, str(REPO / "configs/quickstart.yaml"),
                                                   *(f"--set={o}" for o in overrides)]))
        assert f"checkpoint {checkpoint} is damaged: its contents do not match its checksum" in line
        assert "output.resume=false" in line
    assert checkpoint.read_bytes() == bytes(damaged)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.path.name]


def test_predict_refuses_or_skips_an_image_too_large_to_decode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _saved_run(tmp_path / "runs", classes=["cat", "dog"])
    folder = tmp_path / "photos"
    write_image_folder(folder, {"cat": 2, "dog": 1})
    bomb = write_bomb_png(folder / "dog" / "huge.png")

    line = _one_error_line(runner.invoke(cli, ["predict", str(run_dir), "--images", str(folder)]))
    assert f"cannot use image {bomb}: too large to decode safely" in line and "--bad-images skip" in line

    with caplog.at_level(logging.WARNING):  # stderr, for a person (logging's last-resort handler)
        result = runner.invoke(cli, ["predict", str(run_dir), "--images", str(folder), "--bad-images", "skip"])
    assert result.exit_code == 0, result.output
    assert f"leaving out image {bomb}: too large" in caplog.text
    assert "on 3 labelled images" in result.output


def test_predict_on_a_test_split_with_a_bad_image_follows_the_runs_setting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _image_data(tmp_path / "images")
    bomb = write_bomb_png(root / "test" / "cat" / "huge.png")
    run_dir = _saved_run(tmp_path / "runs", "data.source=imagefolder", f"data.root={root}", classes=["cat", "dog"])

    line = _one_error_line(runner.invoke(cli, ["predict", str(run_dir)]))
    assert f"{bomb}: too large to decode safely" in line

    with caplog.at_level(logging.WARNING):
        result = runner.invoke(cli, ["predict", str(run_dir), "--bad-images", "skip"])
    assert result.exit_code == 0, result.output
    assert f"leaving out image {bomb}: too large" in caplog.text and "on 4 labelled images" in result.output


def test_class_names_with_commas_survive_the_model_file(tmp_path: Path) -> None:
    classes = ["cat,dog", "bird"]
    run_dir = _saved_run(tmp_path / "runs", classes=classes)
    folder = tmp_path / "photos"
    write_image_folder(folder, {"cat,dog": 2, "bird": 2})

    result = runner.invoke(cli, ["predict", str(run_dir), "--images", str(folder), "--show", "4"])

    assert result.exit_code == 0, result.output
    assert result.output.count("(label: cat,dog)") == 2 and result.output.count("(label: bird)") == 2
    assert "on 4 labelled images" in result.output
