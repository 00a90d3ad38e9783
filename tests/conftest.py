"""Shared fixtures: the shared test photographs, an isolated cache per test, Ray workers that import tests/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"


@pytest.fixture
def hymenoptera_root() -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"the ants/bees photographs are not at {HYMENOPTERA} (they live in ../shared/data)")
    return HYMENOPTERA


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own node caches, so no test sees another's cached models."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The identity Flower's ServerApp runtime sets before the strategy runs.

    An instruction Message takes run_id, src_node_id and src_task_id from TaskIdentity (see
    flwr/server/compat/app.py, which sets exactly these three); a reply built with
    Message(content, reply_to=instruction) derives its metadata from the instruction, as a
    ClientApp's reply does. monkeypatch restores the unset identity after each test.
    """
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)  # the SuperLink's node
    yield


@pytest.fixture
def ray_can_import_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray workers inherit the environment: let them import the probe ClientApps (tests/probe_clients.py) by name."""
    tests = str(REPO / "tests")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, str(REPO), os.environ.get("PYTHONPATH", "")]))
