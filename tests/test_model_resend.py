"""A real simulation (Flower's engine on Ray) in which a node loses its cached model: the server sends it again."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from fedtune.config import load_config
from fedtune.report import RunDirectory
from fedtune.simulation import simulate

REPO = Path(__file__).resolve().parents[1]


def _image_folder(root: Path, *, classes: int = 3, train: int = 24, test: int = 8) -> Path:
    """Digits as PNG files in ImageFolder layout: a dataset that lives in a folder, as a user's would."""
    digits = load_digits()
    for label in range(classes):
        images = digits.images[digits.target == label][: train + test]
        for i, image in enumerate(images):
            split = "train" if i < train else "test"
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_a_node_that_lost_its_model_is_sent_it_again_and_trains_in_that_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, ray_can_import_tests: None
) -> None:
    from probe_lost_model import LOSES_MODEL, PROBE_DIR_ENV, lost_model_app

    probe = tmp_path / "probe"
    monkeypatch.setenv(PROBE_DIR_ENV, str(probe))
    # data.root is read by the virtual nodes too: in a simulation the experiment file is the user's own.
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "data.source=imagefolder", f"data.root={_image_folder(tmp_path / 'images')}", "data.image_size=32",
        "data.partition.scheme=iid", "federation.num_clients=3", "federation.rounds=3", "train.unfreeze=[]",
        "train.trainable_blocks=0", "train.local_epochs=1", f"output.dir={tmp_path / 'runs'}",
    ])

    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        outcome = simulate(cfg, client_app=lost_model_app)

    partition, server_round = LOSES_MODEL
    assert outcome.stop_reason == "completed 3 rounds"
    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    # Every client trained in every round, the one that lost its model included.
    assert [(r.clients_ok, r.clients_failed) for r in history[1:]] == [(3, 0)] * 3
    lines = (probe / f"p{partition}.log").read_text().splitlines()
    assert lines[0] == "round 1 simulated=True trained"
    assert lines[1].startswith(f"round {server_round} simulated=True error: model not cached: ")
    assert lines[2:] == [f"round {server_round} simulated=True trained", "round 3 simulated=True trained"]
    # The full model went once into the machine's shared cache (to client 0, in the warm-up), and
    # again to the client that lost it. The virtual clients share that cache: another client whose
    # message ran while the file was gone lost it too, and was sent it the same way.
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    deliveries = summary["backbone_deliveries_per_node"]
    assert deliveries[str(partition)] == 1 and deliveries["0"] in (1, 2) and set(deliveries.values()) <= {1, 2}
    assert history[server_round].bytes_backbone_serialised > 0 and history[3].bytes_backbone_serialised == 0
    resent = [r.getMessage() for r in caplog.records if "lost the model" in r.getMessage()]
    assert any(line.startswith(f"client {partition} lost the model") for line in resent)
    assert len(resent) == sum(deliveries.values()) - 1  # every delivery after the warm-up's answered a loss
