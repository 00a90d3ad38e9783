"""One registry convention: each name filed once, unknown names refused with the known ones."""

from __future__ import annotations

import pytest

from fedtune.backbones import BACKBONES
from fedtune.data import SOURCES
from fedtune.registry import Registry
from fedtune.strategies.registry import STRATEGIES


def test_a_name_filed_twice_is_refused_naming_the_first_and_the_first_stays() -> None:
    registry: Registry[object] = Registry("widget")

    @registry.register("round")
    def make_round() -> str:
        return "first"

    with pytest.raises(ValueError, match=r"widget 'round' is already registered \(by .*make_round\)"):
        registry.add("round", lambda: "second")
    assert registry["round"] is make_round and len(registry) == 1


def test_an_unknown_name_is_refused_with_the_known_ones_sorted() -> None:
    registry: Registry[int] = Registry("widget")
    registry.add("b", 2)
    registry.add("a", 1)
    with pytest.raises(ValueError, match=r"^unknown widget 'c'; known: a, b$"):
        registry.get_known("c")
    assert registry.get_known("a") == 1 and list(registry) == ["b", "a"] and "a" in registry


@pytest.mark.parametrize(("registry", "kind"), [(BACKBONES, "backbone"), (SOURCES, "data source"),
                                                (STRATEGIES, "strategy")])
def test_backbones_sources_and_strategies_follow_it(registry: Registry[object], kind: str) -> None:
    name = next(iter(registry))
    with pytest.raises(ValueError, match=f"{kind} {name!r} is already registered"):
        registry.add(name, object())
    with pytest.raises(ValueError, match=f"unknown {kind} 'no-such-thing'; known: "):
        registry.get_known("no-such-thing")
