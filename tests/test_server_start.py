"""A run that cannot start fails before its run directory exists: nothing is half-written."""

from __future__ import annotations

from pathlib import Path

import pytest
from image_files import write_image_folder, write_truncated_png

from fedtune.config import load_config
from fedtune.data import BadImageError
from server.federation import run_federation

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr_multipliers={conv_hed: 0.1}",
         "train.lr_multipliers: efficientnet_lite0 has no stage named 'conv_hed'"),
        ("train.trainable_blocks=12", "train.trainable_blocks: 12 is more than the 9 blocks"),
        ("data.source=imagefolder", "the imagefolder source needs data.root"),
    ],
)
def test_bad_settings_fail_before_anything_is_written(tmp_path: Path, override: str, message: str) -> None:
    cfg = load_config(REPO / "configs/quickstart.yaml", [
        f"output.dir={tmp_path / 'runs'}", "train.unfreeze=[]", "data.image_size=32", override,
    ])
    # The grid is never reached: these checks come before waiting for nodes.
    with pytest.raises(ValueError, match=message):
        run_federation(grid=None, cfg=cfg)  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()


def test_a_corrupt_test_image_fails_before_the_run_directory_exists(tmp_path: Path) -> None:
    """Found when the test split is loaded, not in round 0's evaluation after config.json is written."""
    write_image_folder(tmp_path / "images" / "train", {"a": 2, "b": 2})
    write_image_folder(tmp_path / "images" / "test", {"a": 1, "b": 1})
    cut = write_truncated_png(tmp_path / "images" / "test" / "b" / "cut.png")
    cfg = load_config(REPO / "configs/quickstart.yaml", [
        f"output.dir={tmp_path / 'runs'}", "train.unfreeze=[]", "data.image_size=32", "data.source=imagefolder",
        f"data.root={tmp_path / 'images'}",
    ])
    with pytest.raises(BadImageError, match=f"{cut}: cannot be decoded"):
        run_federation(grid=None, cfg=cfg)  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()
