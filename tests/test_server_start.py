"""A run that cannot start fails before its run directory exists: nothing is half-written."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from image_files import write_image_folder, write_truncated_png

from fedtune.config import load_config
from fedtune.data import BadImageError
from fedtune.server.app import check_simulated_node_count
from fedtune.server.run import run_federation

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


def test_a_simulation_under_secure_aggregation_with_the_wrong_node_count_says_so_at_once(tmp_path: Path) -> None:
    # `flwr run`'s default federation simulates 2 nodes; the experiment wants 3. Without SecAgg+
    # the 2 nodes play the 3 virtual clients; under it each client needs a node of its own. Flower's
    # own simulation engine (on Ray) registers the nodes; the check must not wait out connect_timeout.
    common = ["federation.num_clients=3", "federation.connect_timeout=300", f"output.dir={tmp_path}"]
    plain = load_config(REPO / "configs" / "quickstart.yaml", common)
    secure = load_config(REPO / "configs" / "quickstart.yaml", [*common, "privacy.secure_aggregation.enabled=true"])
    seen: list[tuple[str, float]] = []
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:  # noqa: ANN001
        for cfg in (plain, secure):
            started = time.monotonic()
            try:
                check_simulated_node_count(grid, cfg)
                seen.append(("no error", time.monotonic() - started))
            except RuntimeError as error:
                seen.append((str(error), time.monotonic() - started))

    run_simulation(server_app=app, client_app=ClientApp(), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}})
    [(plain_message, _), (message, seconds)] = seen
    assert plain_message == "no error"
    assert message.startswith("2 nodes are connected but federation.num_clients is 3")
    assert '--federation-config "num-supernodes=3"' in message
    assert seconds < 10
