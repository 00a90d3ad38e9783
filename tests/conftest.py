"""Shared fixtures: where the shared test photographs are, and an isolated cache per test."""

from __future__ import annotations

from pathlib import Path

import pytest

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
