"""YAML loading for definitions: safe, strict, and with the line and column of every value.

Stricter than yaml.safe_load: duplicate keys are refused, aliases are bounded (no billion laughs),
only plain YAML types are built (no python/* or other tags), and scalars follow YAML 1.2 rules
(`no` stays a string, `9:30` stays a string, dates stay strings) so what people write is what they get.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from flowdb.errors import DefinitionError, Located

Path = tuple[str | int, ...]
Positions = dict[Path, tuple[int, int]]

MAX_BYTES = 1_000_000
MAX_ALIASES = 100
MAX_EXPANDED_NODES = 20_000

_STD_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
}


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars."""


_Loader.yaml_implicit_resolvers = {}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])


def load_yaml(text: str, filename: str) -> tuple[Any, Positions]:
    """Parse one YAML document; return its data and the (line, col) of every path in it."""
    if len(text.encode()) > MAX_BYTES:
        raise DefinitionError([Located(filename, 1, 1, f"file is larger than {MAX_BYTES} bytes")])
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise DefinitionError([Located(filename, line, col, f"YAML syntax error: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise DefinitionError([Located(filename, 1, 1, f"YAML error: {exc}")]) from None
    finally:
        loader.dispose()
    if node is None:
        raise DefinitionError([Located(filename, 1, 1, "the file is empty; expected a 'process:' mapping")])
    _check_size(node, filename)
    positions: Positions = {}
    data = _build(node, (), positions, filename, loader)
    return data, positions


def _mark(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _check_size(root: Node, filename: str) -> None:
    """Refuse documents whose aliases expand to too many nodes, and recursive aliases."""
    sizes: dict[int, int] = {}
    refs: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        refs[key] = refs.get(key, 0) + 1
        if key in sizes:
            return sizes[key]
        if key in visiting:
            line, col = _mark(node)
            raise DefinitionError([Located(filename, line, col, "recursive YAML alias is not allowed")])
        visiting.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        visiting.discard(key)
        sizes[key] = total
        return total

    expanded = size(root)
    aliases = sum(count - 1 for count in refs.values())
    if aliases > MAX_ALIASES or expanded > MAX_EXPANDED_NODES:
        raise DefinitionError(
            [Located(filename, 1, 1, f"YAML aliases expand too far ({aliases} alias uses, {expanded} nodes); "
                     f"at most {MAX_ALIASES} alias uses and {MAX_EXPANDED_NODES} nodes are allowed")]
        )


def _build(node: Node, path: Path, positions: Positions, filename: str, loader: _Loader) -> Any:
    if node.tag not in _STD_TAGS:
        line, col = _mark(node)
        raise DefinitionError([Located(filename, line, col, f"YAML tag {node.tag!r} is not allowed; "
                                       "write plain mappings, lists and scalars")])
    if isinstance(node, ScalarNode):
        try:
            return loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            line, col = _mark(node)
            raise DefinitionError([Located(filename, line, col, f"bad YAML value: {exc}")]) from None
    if isinstance(node, SequenceNode):
        items = []
        for index, child in enumerate(node.value):
            positions[(*path, index)] = _mark(child)
            items.append(_build(child, (*path, index), positions, filename, loader))
        return items
    assert isinstance(node, MappingNode)
    result: dict[str, Any] = {}
    for key_node, value_node in node.value:
        line, col = _mark(key_node)
        if not isinstance(key_node, ScalarNode) or key_node.tag not in _STD_TAGS:
            raise DefinitionError([Located(filename, line, col, "mapping keys must be plain scalars")])
        key = loader.construct_object(key_node)
        if not isinstance(key, str):
            key = str(key).lower() if isinstance(key, bool) else str(key)
        if key in result:
            first = positions[(*path, key)]
            raise DefinitionError([Located(filename, line, col,
                                           f"duplicate key {key!r} (first given at line {first[0]})")])
        positions[(*path, key)] = (line, col)
        result[key] = _build(value_node, (*path, key), positions, filename, loader)
    return result
