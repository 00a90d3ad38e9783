"""Named entries of one kind (backbones, data sources, strategies): each name filed once.

One convention for every registry: `@REGISTRY.register(name)` files what it decorates, a name
filed twice is an error naming both (never a silent overwrite), and an unknown name is refused
with the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


def _origin(entry: object) -> str:
    module, name = getattr(entry, "__module__", None), getattr(entry, "__qualname__", None)
    return f" (by {module}.{name})" if module and name else ""


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping of names to entries, filled by `register` at import time."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "backbone", "data source", "strategy": how errors name an entry
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered{_origin(self._entries[name])}")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: file the decorated object under `name`."""
        return lambda entry: self.add(name, entry)

    def get_known(self, name: str) -> T:
        """The entry; ValueError naming the known ones for an unknown name."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
