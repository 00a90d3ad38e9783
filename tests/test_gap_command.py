"""`fedtune gap` end to end: a real simulated federation's per-client statistics become the domain-gap report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedtune.cli import cli
from fedtune.client.task import NodeIdentity, local_data
from fedtune.config import load_config
from fedtune.domain_gap import GAP_JSON, GAP_PNG, LABEL_SKEW_THRESHOLD
from fedtune.protocol import ClientSettings

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
CLIENTS = 4
# Dirichlet(0.1) over 10 digit classes: every client lacks several classes.
SKEWED = ["data.image_size=32", f"federation.num_clients={CLIENTS}", "data.partition.alpha=0.1", "train.unfreeze=[]"]


def test_gap_reports_each_clients_own_data_and_flags_its_label_skew(tmp_path: Path, isolated_cache: Path) -> None:
    from fedtune.simulation import gap

    cfg = load_config(QUICKSTART, [*SKEWED, f"output.dir={tmp_path / 'runs'}"])

    report, folder = gap(cfg, at="blocks_5")

    settings = ClientSettings.of(cfg, num_classes=10, run_key="here")
    assert [client.name for client in report.clients] == [f"client {n}" for n in range(CLIENTS)]
    assert report.dimensions == 192  # blocks_5's channels, average-pooled
    for number, client in enumerate(report.clients):
        node = NodeIdentity(partition_id=number, num_partitions=CLIENTS, cache_root=Path("unused"), simulated=True)
        labels = np.array([label for _, label in local_data(settings, node).train])  # type: ignore[attr-defined]
        assert client.class_counts.tolist() == np.bincount(labels, minlength=10).tolist()
    skewed = [c.name for c in report.clients if c.hellinger >= LABEL_SKEW_THRESHOLD]
    assert skewed and report.flagged("label_skew") == skewed
    assert report.reference_counts is not None and report.reference_counts.sum() == 360  # the server's test split
    written = json.loads((folder / GAP_JSON).read_text())
    assert len(written["clients"]) == CLIENTS
    assert (folder / GAP_PNG).read_bytes().startswith(b"\x89PNG")


def test_gap_is_refused_under_secure_aggregation_before_anything_starts(tmp_path: Path) -> None:
    done = CliRunner().invoke(cli, ["gap", str(QUICKSTART), "--set", "privacy.secure_aggregation.enabled=true",
                                    "--set", f"output.dir={tmp_path}"])

    assert done.exit_code == 2
    assert "each client's statistics, which privacy.secure_aggregation keeps from the server" in done.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("at", ["pool", "../etc"])
def test_gap_refuses_a_block_the_backbone_lacks(tmp_path: Path, at: str) -> None:
    done = CliRunner().invoke(cli, ["gap", str(QUICKSTART), "--at", at, "--set", f"output.dir={tmp_path}"])

    assert done.exit_code == 2
    assert "--at" in done.output


@pytest.mark.slow
def test_server_gap_reports_on_real_nodes_over_tls(tmp_path: Path) -> None:
    from real_nodes import serve_once

    runs = tmp_path / "runs"
    serve_once(tmp_path, QUICKSTART, ["--gap", "blocks_3"], ["federation.num_clients=2", "data.image_size=32",
                                                           "train.unfreeze=[]", f"output.dir={runs}"])
    (folder,) = runs.glob("quickstart-gap-*")
    report = json.loads((folder / GAP_JSON).read_text())
    assert len(report["clients"]) == 2 and report["feature_dimensions"] == 80  # blocks_3 of Lite0: 80 channels
    assert (folder / GAP_PNG).is_file()


def test_server_refuses_select_and_gap_together(tmp_path: Path) -> None:
    done = CliRunner().invoke(cli, ["server", str(QUICKSTART), "--select", "efficientnet_lite0", "--gap", "head",
                                    "--set", f"output.dir={tmp_path}"])

    assert done.exit_code == 2
    assert "--select and --gap: choose one" in done.output
