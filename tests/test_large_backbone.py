"""A ViT-B/16 (343 MB) goes over the wire to a real client node, once, and the round completes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from real_nodes import REPO, LoopbackFederation, make_certs

from fedtune.report import RunDirectory


def _small_folder(source: Path, target: Path, per_class: int) -> Path:
    """An image folder laid out by class, `per_class` photographs of each."""
    for label in ("ants", "bees"):
        (target / label).mkdir(parents=True)
        for image in sorted((source / label).iterdir())[:per_class]:
            shutil.copy(image, target / label / image.name)
    return target


@pytest.mark.slow
def test_vit_b_16_backbone_reaches_a_client_with_its_own_data(tmp_path: Path, hymenoptera_root: Path) -> None:
    server_data = tmp_path / "server-data"
    _small_folder(hymenoptera_root / "train", server_data / "train", 4)
    _small_folder(hymenoptera_root / "val", server_data / "val", 10)  # the server's test split
    client_data = _small_folder(hymenoptera_root / "train", tmp_path / "client-data", 12)
    nodes = LoopbackFederation(tmp_path / "nodes", make_certs(tmp_path / "certs"), num_clients=1)
    runs = tmp_path / "runs"
    try:
        nodes.start_client(0, own_data=client_data)
        server = nodes.start_server(
            REPO / "configs" / "antsbees.yaml", "model.backbone=vit_b_16", "model.weights=none",
            "data.source=imagefolder", f"data.root={server_data}", "data.image_size=224", "federation.rounds=1",
            "train.unfreeze=[]", "train.local_epochs=1", "data.augment=false", f"output.dir={runs}",
        )
        assert nodes.wait(server, 1200) == 0, nodes.log("server.log")[-3000:]
    finally:
        nodes.stop()
    (run_dir,) = runs.iterdir()
    (round_1,) = RunDirectory.load_history(run_dir / "history.json")[1:]
    assert round_1.clients_ok == 1
    assert round_1.bytes_sent_backbone > 330e6  # the whole ViT-B/16, once
    assert round_1.bytes_sent - round_1.bytes_sent_backbone < 1e6  # the rest: the head and the questions
    deliveries = json.loads((run_dir / "summary.json").read_text())["backbone_deliveries_per_node"]
    assert list(deliveries.values()) == [1]
    (cached,) = (nodes.cache(0) / "models").glob("*.safetensors")
    assert cached.stat().st_size > 330e6
