"""What `pip install .` puts into site-packages: the fedtune package only, with all of its code."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """The wheel `pip install .` would install, built from a copy of the checkout (no network:
    the build uses this environment's setuptools)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for folder in ("fedtune", "server", "client", "strategies", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(source)], check=True, timeout=300)
    (built,) = out.glob("fedtune-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def test_the_wheel_installs_fedtune_alone(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert tops == {"fedtune", "fedtune-0.1.0.dist-info"}  # no top-level server, client or strategies


def test_the_wheel_holds_the_server_client_and_strategies_code(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    repo_sources = {path.relative_to(REPO).as_posix() for path in (REPO / "fedtune").rglob("*.py")
                    if "__pycache__" not in path.parts}
    assert repo_sources <= names  # every module, fedtune/server/, fedtune/client/, fedtune/strategies/ included
    assert {"fedtune/server/round.py", "fedtune/client/app.py", "fedtune/strategies/robust.py"} <= names
    entry_points = wheel.read("fedtune-0.1.0.dist-info/entry_points.txt").decode()
    assert "fedtune = fedtune.cli:main" in entry_points
