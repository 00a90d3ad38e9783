"""What a client node trains on: a partition of the experiment's data, or its own dataset whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedtune.client.task import NodeIdentity, local_data
from fedtune.config import load_config
from fedtune.data import load_split
from fedtune.protocol import ClientSettings

REPO = Path(__file__).resolve().parents[1]


def _settings(hymenoptera_root: Path) -> ClientSettings:
    cfg = load_config(REPO / "configs" / "antsbees.yaml", [f"data.root={hymenoptera_root}", "data.image_size=32"])
    return ClientSettings.of(cfg, num_classes=2)


def test_own_data_is_used_whole_and_a_partition_is_a_part(hymenoptera_root: Path, tmp_path: Path) -> None:
    settings = _settings(hymenoptera_root)
    own = NodeIdentity.from_node_config({"partition-id": 0, "own-data": "true", "data-root": str(hymenoptera_root),
                                         "cache-dir": str(tmp_path)})
    whole = local_data(settings, own)
    images = len(load_split("hymenoptera", "train", root=str(hymenoptera_root), download=False, seed=0))
    assert len(whole.train) + len(whole.validation) == images
    part = local_data(settings, NodeIdentity.from_node_config({"partition-id": 3, "data-root": str(hymenoptera_root),
                                                                "cache-dir": str(tmp_path)}))
    assert 0 < len(part.train) + len(part.validation) < images


def test_a_client_must_say_what_it_trains_on() -> None:
    client = subprocess.run([sys.executable, "-m", "fedtune", "client", "--server", "127.0.0.1:9092", "--insecure"],
                            capture_output=True, text=True)
    assert client.returncode == 2 and "--data PATH (its own dataset, used whole)" in client.stderr
    try:
        NodeIdentity.from_node_config({"partition-id": 0, "own-data": "true"})
    except ValueError as error:
        assert "--data PATH" in str(error)
    else:
        raise AssertionError("own-data without a data-root was accepted")
