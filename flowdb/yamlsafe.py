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
Mark = tuple[int, int]


class Positions(dict[Path, Mark]):
    """Where each path of a document is written, 1-based (line, column).

    The mapping itself gives the key of a mapping entry (or the item of a list), which is where an
    unknown, duplicate or missing field is reported; `value_marks` gives where the value starts,
    which is where a bad value is reported. The empty path is the document's root.
    """

    def __init__(self) -> None:
        super().__init__()
        self.value_marks: dict[Path, Mark] = {}

    def value_at(self, path: Path) -> Mark | None:
        return self.value_marks.get(path)


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
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)


def load_yaml(text: str, filename: str) -> tuple[Any, Positions]:
    """Parse one YAML document; return its data and the (line, col) of every path in it."""
    if len(text.encode()) > MAX_BYTES:
        raise DefinitionError([Located(filename, 1, 1, f"file is larger than {MAX_BYTES} bytes")])
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        col = nul - (text.rfind("\n", 0, nul) + 1) + 1
        raise DefinitionError([Located(filename, line, col, "the text holds a NUL character; remove it")])
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader refuses control characters YAML does not allow: inside the try
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        raise DefinitionError([_syntax_error(exc, text, filename)]) from None
    except yaml.YAMLError as exc:
        raise DefinitionError([Located(filename, 1, 1, _one_line(f"YAML error: {exc}"))]) from None
    except RecursionError:
        raise DefinitionError([Located(filename, 1, 1, "the YAML is nested too deeply; flatten it")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        raise DefinitionError([Located(filename, 1, 1, "the file is empty; expected a 'process:' mapping")])
    _check_size(node, filename)
    positions = Positions()
    positions[()] = positions.value_marks[()] = _mark(node)
    data = _build(node, (), positions, filename, loader)
    return data, positions


def _one_line(message: str) -> str:
    """Messages are printed one per line as FILE:LINE:COL: message, so they never span lines."""
    return " ".join(message.split())


def _syntax_error(exc: yaml.MarkedYAMLError, text: str, filename: str) -> Located:
    """Where a syntax error is and what it is, in one line.

    PyYAML notices an unclosed quote or bracket only at the end of the file; then the place where
    the unclosed construct starts (the context mark) is the useful one to report.
    """
    problem = exc.problem or "invalid YAML"
    if problem == "but found another document":
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return Located(filename, line, col, "a definition file holds one YAML document; "
                       "remove this '---' and what follows it, or put it in a file of its own")
    mark = exc.problem_mark or exc.context_mark
    at_end = mark is not None and mark.index >= len(text.rstrip())
    if exc.context_mark is not None and (mark is None or at_end):
        mark = exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    message = f"YAML syntax error: {problem}"
    if exc.context and exc.context_mark is not None:
        started = exc.context_mark
        message += f" ({exc.context} that starts at line {started.line + 1}, column {started.column + 1})"
    if at_end:
        message += "; is a closing quote or bracket missing?"
    return Located(filename, line, col, _one_line(message))


def _mark(node: Node) -> Mark:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _check_size(root: Node, filename: str) -> None:
    """Refuse recursive aliases and aliases that expand too far ("billion laughs").

    Nodes reached through an alias are the same objects as their anchor, so the expanded size of
    each node is computed once; the first (innermost) node that grows past the limit is reported.
    """
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    alias_uses = 0

    def size(node: Node) -> int:
        nonlocal alias_uses
        key = id(node)
        if key in visiting:
            line, col = _mark(node)
            raise DefinitionError([Located(filename, line, col, "recursive YAML alias: this anchor is used "
                                           "inside its own value; write the value out instead")])
        if key in sizes:
            alias_uses += 1
            if alias_uses > MAX_ALIASES:
                line, col = _mark(node)
                raise DefinitionError([Located(filename, line, col, f"YAML aliases are used more than "
                                               f"{MAX_ALIASES} times (this anchor is one of those used); "
                                               "write the values out instead")])
            return sizes[key]
        visiting.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        visiting.discard(key)
        if total > MAX_EXPANDED_NODES:
            line, col = _mark(node)
            message = (f"YAML aliases expand too far: this value expands to {total} nodes, at most "
                       f"{MAX_EXPANDED_NODES} are allowed (a 'billion laughs'?); write them out")
            raise DefinitionError([Located(filename, line, col, message)])
        sizes[key] = total
        return total

    size(root)


def _build(node: Node, path: Path, positions: Positions, filename: str, loader: _Loader) -> Any:
    if node.tag not in _STD_TAGS:
        line, col = _mark(node)
        raise DefinitionError([Located(filename, line, col, f"YAML tag {node.tag!r} is not allowed; "
                                       "write plain mappings, lists and scalars")])
    if isinstance(node, ScalarNode):
        try:
            value = loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            line, col = _mark(node)
            problem = _one_line(f"bad YAML value: {exc}")
            raise DefinitionError([Located(filename, line, col, problem)]) from None
        if isinstance(value, str) and "\x00" in value:  # a "\0" escape: no database text column takes it
            line, col = _mark(node)
            raise DefinitionError([Located(filename, line, col, "the value holds a NUL character (\\0); remove it")])
        return value
    if isinstance(node, SequenceNode):
        items = []
        for index, child in enumerate(node.value):
            positions[(*path, index)] = positions.value_marks[(*path, index)] = _mark(child)
            items.append(_build(child, (*path, index), positions, filename, loader))
        return items
    assert isinstance(node, MappingNode)
    result: dict[str, Any] = {}
    for key_node, value_node in node.value:
        line, col = _mark(key_node)
        if not isinstance(key_node, ScalarNode) or key_node.tag not in _STD_TAGS:
            raise DefinitionError([Located(filename, line, col, "mapping keys must be plain scalars (a name "
                                           "such as 'message'), not lists, mappings or tagged values")])
        key = loader.construct_object(key_node)
        if not isinstance(key, str):
            key = str(key).lower() if isinstance(key, bool) else str(key)
        if "\x00" in key:
            raise DefinitionError([Located(filename, line, col, "the key holds a NUL character (\\0); remove it")])
        if key in result:
            first = positions[(*path, key)]
            raise DefinitionError([Located(filename, line, col, f"duplicate key {key!r} (first given at "
                                           f"line {first[0]}); keep one of them")])
        positions[(*path, key)] = (line, col)
        # An empty value (`agent:`) has no text of its own: its key is the place to point at.
        empty = isinstance(value_node, ScalarNode) and value_node.value == "" and value_node.style is None
        positions.value_marks[(*path, key)] = (line, col) if empty else _mark(value_node)
        result[key] = _build(value_node, (*path, key), positions, filename, loader)
    return result
