"""A run that cannot start fails before its run directory exists: nothing is half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import load_config
from server.federation import run_federation

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr_multipliers={conv_hed: 0.1}", "train.lr_multipliers names no stage of efficientnet_lite0: conv_hed"),
        ("train.trainable_blocks=12", "trainable_blocks=12 but the backbone has only 9 blocks"),
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
