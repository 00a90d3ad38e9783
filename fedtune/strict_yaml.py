"""YAML as experiment files need it: duplicate keys, deep nesting and alias bombs are errors; 1e-3 is a number.

PyYAML's SafeLoader keeps the last of two equal keys without a word (a `train:` section written twice
silently loses the first), recurses once per nesting level (5,000 levels end in RecursionError),
expands aliases without limit (a few KB of nested `*a` aliases become billions of nodes), and, as
YAML 1.1 says, reads `1e-3` or `1.0e5` as strings. `StrictLoader` subclasses it through the hooks
PyYAML's own loaders use (Composer.compose_node, SafeConstructor.construct_mapping, and
Resolver.add_implicit_resolver), so every document is checked while it is read.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# An experiment file nests 4 levels deep (privacy.dp_sgd.target_epsilon; train.unfreeze[0].from_round).
MAX_DEPTH = 32
# Nodes of a document once every alias is expanded: a config has about a hundred.
MAX_NODES = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, nesting past MAX_DEPTH and documents past MAX_NODES nodes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its node count, aliases expanded
        self._paths: dict[int, str] = {}  # id(mapping node) -> its dotted key, for messages
        self._composing: list[str] = []  # dotted keys of the nodes being composed, outermost first

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                # Its anchor is still being read: the alias sits inside the node it names.
                raise ComposerError(None, None, f"alias *{event.anchor} refers to a node that contains it",
                                    event.start_mark)
            return node
        if len(self._composing) >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
        path = self._path_of(parent, index)
        self._composing.append(path)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._composing.pop()
        size = 1 + sum(self._sizes[id(child)] for child in _children(node))
        if size > MAX_NODES:
            raise ComposerError(None, None, f"more than {MAX_NODES} values once its aliases are expanded",
                                node.start_mark)
        self._sizes[id(node)] = size
        if isinstance(node, MappingNode):
            self._paths[id(node)] = path
        return node

    def _path_of(self, parent: Node | None, index: Any) -> str:
        base = self._composing[-1] if parent is not None else ""
        if isinstance(index, ScalarNode):  # a mapping's value: index is its key
            return f"{base}.{index.value}" if base else index.value
        if isinstance(index, int):  # a sequence's item
            return f"{base}[{index}]"
        return base

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                # `<<: *defaults` merges keys that the mapping's own keys may override: that is YAML's
                # meaning of a merge, not a duplicate.
                if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    where = self._paths.get(id(node), "")
                    dotted = f"{where}.{key}" if where else str(key)
                    raise ConstructorError(None, None, f"duplicate key {dotted} (lines {seen[key]} and {line}): "
                                           "the second would silently replace the first", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


# YAML 1.2's floats that YAML 1.1 (PyYAML) reads as strings: an exponent without a dot (1e-3) or
# without a sign (1.5e3). Added to the float resolver, so that a config's numbers are numbers.
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load(text: str) -> Any:
    """One YAML document; yaml.YAMLError (one of its subclasses) for anything refused."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def describe_error(error: yaml.YAMLError) -> str:
    """A YAML error on one line: `line L, column C: problem`."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        problem = " ".join(part for part in (error.context, error.problem) if part)
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(error).split())
