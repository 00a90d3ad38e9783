"""Imports run one way: the core serves the server and the clients, which never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedtune"
SIDES = ("fedtune.server", "fedtune.client", "fedtune.strategies")
# The commands that start a run: they put the two sides together, so they may import both.
ENTRY_POINTS = {"fedtune.cli", "fedtune.simulation", "fedtune.worker", "fedtune.__main__"}
# What each side must never import (the strategies belong to the server).
FORBIDDEN = {
    "fedtune.server": ("fedtune.client",),
    "fedtune.client": ("fedtune.server", "fedtune.strategies"),
    "fedtune.strategies": ("fedtune.server", "fedtune.client"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in path.parts}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module: str) -> None:
    imported = _imports(MODULES[module])
    side = next((s for s in SIDES if _within(module, s)), None)
    if side is not None:
        forbidden = FORBIDDEN[side]
    elif module in ENTRY_POINTS:
        forbidden = ()
    else:  # the core: configs, protocol, data, backbones, engine, results, ...
        forbidden = SIDES
    wrong = sorted(name for name in imported for package in forbidden if _within(name, package))
    assert not wrong, f"{module} imports {wrong}"
    # Nothing installed imports the Flower app's components, which are not installed.
    assert not {name for name in imported if name.split(".")[0] in ("server", "client", "strategies")}


def test_the_rules_see_every_side() -> None:
    # The walk finds the modules it judges: a rename that hid them would make the test above vacuous.
    assert {"fedtune.server.round", "fedtune.client.app", "fedtune.strategies.robust", "fedtune.config"} <= set(
        MODULES)
