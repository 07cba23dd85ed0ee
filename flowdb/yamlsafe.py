"""YAML loading for definitions: safe, strict, and with the line and column of every value.

Stricter than yaml.safe_load: duplicate keys are refused, aliases are bounded (no billion laughs),
nesting is bounded, only plain YAML types are built (no python/* or other tags), and scalars follow
YAML 1.2 rules (`no` stays a string, `9:30` stays a string, `017` is 17, dates stay strings) so what
people write is what they get.

Nothing here recurses over the document: the events of the parser (libyaml's when PyYAML has it, the
same grammar in pure Python otherwise) are composed into nodes and the nodes built into values with
explicit stacks, so a document of any shape gets an answer or a located error, never a RecursionError.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import yaml
import yaml.composer
import yaml.parser
import yaml.reader
import yaml.scanner
from yaml.events import (
    AliasEvent,
    CollectionStartEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    StreamEndEvent,
)
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


# A 10,000-step process (flowdb.definitions.MAX_STEPS) written out plainly takes 1.4 MB; this leaves
# room for longer messages. FLOWDB_API_MAX_BODY_BYTES defaults to the same, so the API takes it too.
MAX_BYTES = 4 * 1024 * 1024
MAX_ALIASES = 100  # alias uses in one document
MAX_EXPANDED_NODES = 20_000  # nodes that aliases add beyond the document's own nodes
MAX_DEPTH = 100  # nested lists and mappings, counting what aliases bring in
MAX_NUMBER_DIGITS = 100  # longer integers are surely not meant as numbers (and Python caps int parsing)

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_STD_TAGS = {_STR, _INT, _FLOAT, _BOOL, _NULL, _MAP, _SEQ}

# YAML 1.2 core schema: what a plain (unquoted) scalar means.
_IMPLICIT: list[tuple[str, re.Pattern[str]]] = [
    (_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")),
    (_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")),
    (_FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")),
    (_NULL, re.compile(r"^(?:~|null|Null|NULL|)$")),
]


class _EventSource(Protocol):
    def get_event(self) -> Any: ...  # a yaml.events.Event

    def dispose(self) -> None: ...


class _PyParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's pure-Python parser on its own (events only; composing is done here, without recursion)."""

    def __init__(self, text: str) -> None:
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


def _parsers(text: str) -> list[Callable[[str], _EventSource]]:
    """libyaml's parser first (ten times faster), PyYAML's after it: when libyaml refuses a document,
    PyYAML's words for the problem are the ones reported (the same as without libyaml).

    libyaml, the reference parser, takes a few corners of YAML that PyYAML's own parser refuses (a tab
    as the space after ':' or ',', '?' inside a plain scalar in [...] or {...}); where they differ in
    the other direction, PyYAML's reading is taken. Values and positions are otherwise the same.
    """
    fast = _libyaml_parser()
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: libyaml cannot be given it; PyYAML's reader refuses it
        fast = None
    return [fast, _PyParser] if fast is not None else [_PyParser]


def _libyaml_parser() -> Callable[[str], _EventSource] | None:
    try:
        from yaml._yaml import CParser  # PyYAML built with libyaml (its wheels are)
    except ImportError:  # pragma: no cover - PyYAML without libyaml
        return None
    return cast(Callable[[str], _EventSource], CParser)


def load_yaml(text: str, filename: str) -> tuple[Any, Positions]:
    """Parse one YAML document; return its data and the (line, col) of every path in it."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise DefinitionError([Located(filename, 1, 1, f"the file is {size} bytes, larger than the limit of "
                                       f"{MAX_BYTES} bytes; shorten it or split the process into smaller "
                                       "ones")])
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        col = nul - (text.rfind("\n", 0, nul) + 1) + 1
        raise DefinitionError([Located(filename, line, col, "the text holds a NUL character; remove it")])
    node = _parse(text, filename)
    if node is None:
        raise DefinitionError([Located(filename, 1, 1, "the file is empty; expected a 'process:' mapping")])
    return _build(node, filename)


def _parse(text: str, filename: str) -> Node | None:
    parsers = _parsers(text)
    first_error: yaml.YAMLError | None = None
    for parser_class in parsers:
        parser: _EventSource | None = None
        try:
            parser = parser_class(text)  # the reader refuses control characters YAML does not allow: inside the try
            return _Composer(parser, filename).document()
        except yaml.MarkedYAMLError as exc:
            first_error = first_error or exc
            if parser_class is parsers[-1]:
                raise DefinitionError([_syntax_error(exc, text, filename)]) from None
        except yaml.YAMLError as exc:
            first_error = first_error or exc
            if parser_class is parsers[-1]:
                raise DefinitionError([Located(filename, 1, 1, _one_line(f"YAML error: {exc}"))]) from None
        finally:
            if parser is not None:
                parser.dispose()
    # libyaml refused what PyYAML took (they differ on a few corners such as unknown directives).
    assert first_error is not None
    if isinstance(first_error, yaml.MarkedYAMLError):
        raise DefinitionError([_syntax_error(first_error, text, filename)])
    raise DefinitionError([Located(filename, 1, 1, _one_line(f"YAML error: {first_error}"))])


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


def _mark(node: Node | Event) -> Mark:
    mark: Any = node.start_mark  # every node and event here has one
    return mark.line + 1, mark.column + 1


@dataclass
class _Size:
    """A composed node's size once its aliases are expanded."""

    nodes: int  # the nodes it expands to, itself included
    from_aliases: int  # how many of those aliases bring in (beyond the document's own nodes)
    depth: int  # nested lists and mappings (0 for a scalar)


@dataclass
class _Open:
    """A list or mapping being composed."""

    node: SequenceNode | MappingNode
    size: _Size
    anchor: str | None
    key: Node | None = None  # a mapping's key waiting for its value


class _Composer:
    """Events → nodes, like PyYAML's composer, with an explicit stack and the alias bounds checked as
    each list or mapping closes (the innermost value past a limit is the one reported)."""

    def __init__(self, parser: _EventSource, filename: str) -> None:
        self.parser = parser
        self.filename = filename
        self.anchors: dict[str, tuple[Node, _Size | None]] = {}  # None: still open (an alias to it recurses)
        self.alias_uses = 0

    def error(self, at: Node | Event, message: str) -> DefinitionError:
        line, col = _mark(at)
        return DefinitionError([Located(self.filename, line, col, message)])

    def document(self) -> Node | None:
        get = self.parser.get_event
        get()  # stream start
        event = get()
        if isinstance(event, StreamEndEvent):
            return None
        root = self.node()  # after the document start
        get()  # document end
        event = get()
        if not isinstance(event, StreamEndEvent):
            raise yaml.composer.ComposerError("expected a single document in the stream", root.start_mark,
                                              "but found another document", event.start_mark)
        return root

    def node(self) -> Node:
        stack: list[_Open] = []
        while True:
            event = self.parser.get_event()
            start: Any = event.start_mark  # libyaml's marks stand in for PyYAML's
            end: Any = event.end_mark
            node: Node
            if isinstance(event, SequenceEndEvent | MappingEndEvent):
                done = stack.pop()
                node, size = done.node, done.size
                node.end_mark = end
                self.check(node, size)
                if done.anchor is not None:
                    self.anchors[done.anchor] = (node, size)
                aliased = False
            elif isinstance(event, AliasEvent):
                node, size = self.alias(event)
                aliased = True
            else:
                anchor = getattr(event, "anchor", None)
                if anchor is not None and anchor in self.anchors:
                    first = self.anchors[anchor][0]
                    raise yaml.composer.ComposerError(f"found duplicate anchor {anchor!r}; first occurrence",
                                                      first.start_mark, "second occurrence", start)
                if isinstance(event, ScalarEvent):
                    tag = event.tag
                    if tag is None or tag == "!":
                        tag = _resolve(event.value, event.implicit)
                    # libyaml marks a plain scalar's style '', PyYAML None: one meaning, one value
                    node = ScalarNode(tag, event.value, start, end, style=event.style or None)
                    size = _Size(1, 0, 0)
                    if anchor is not None:
                        self.anchors[anchor] = (node, size)
                    aliased = False
                else:
                    assert isinstance(event, CollectionStartEvent)
                    if len(stack) >= MAX_DEPTH:
                        raise self.error(event, f"the YAML is nested more than {MAX_DEPTH} levels deep; "
                                         "flatten it")
                    tag = event.tag
                    if tag is None or tag == "!":
                        tag = _MAP if isinstance(event, MappingStartEvent) else _SEQ
                    kind = MappingNode if isinstance(event, MappingStartEvent) else SequenceNode
                    opened = kind(tag, [], start, None, flow_style=event.flow_style)
                    if anchor is not None:
                        self.anchors[anchor] = (opened, None)
                    stack.append(_Open(opened, _Size(1, 0, 1), anchor))
                    continue
            if not stack:
                return node
            parent = stack[-1]
            parent.size.nodes += size.nodes
            parent.size.from_aliases += size.nodes if aliased else size.from_aliases
            parent.size.depth = max(parent.size.depth, size.depth + 1)
            if isinstance(parent.node, SequenceNode):
                parent.node.value.append(node)
            elif parent.key is None:
                parent.key = node
            else:
                parent.node.value.append((parent.key, node))
                parent.key = None

    def alias(self, event: Any) -> tuple[Node, _Size]:
        if event.anchor not in self.anchors:
            raise yaml.composer.ComposerError(None, None, f"found undefined alias {event.anchor!r}",
                                              event.start_mark)
        node, size = self.anchors[event.anchor]
        if size is None:
            raise self.error(node, "recursive YAML alias: this anchor is used inside its own value; write the "
                             "value out instead")
        self.alias_uses += 1
        if self.alias_uses > MAX_ALIASES:
            raise self.error(node, f"YAML aliases are used more than {MAX_ALIASES} times (this anchor is one of "
                             "those used); write the values out instead")
        return node, size

    def check(self, node: Node, size: _Size) -> None:
        if size.from_aliases > MAX_EXPANDED_NODES:
            raise self.error(node, f"YAML aliases expand too far: this value expands to {size.nodes} nodes, "
                             f"{size.from_aliases} of them through aliases, and aliases may add at most "
                             f"{MAX_EXPANDED_NODES} (a 'billion laughs'?); write them out")
        if size.depth > MAX_DEPTH:
            raise self.error(node, f"the YAML is nested more than {MAX_DEPTH} levels deep once its aliases are "
                             "expanded; flatten it")


def _resolve(value: str, implicit: tuple[bool, bool]) -> str:
    if implicit[0]:
        for tag, pattern in _IMPLICIT:
            if pattern.match(value):
                return tag
    return _STR


def _scalar(node: ScalarNode, filename: str) -> Any:
    """A scalar's value by the YAML 1.2 core schema (the tag is one of _STD_TAGS, not a collection's)."""
    value: str = node.value
    tag = node.tag
    try:
        if tag == _NULL:
            return None
        if tag == _BOOL:
            if value.lower() not in ("true", "false"):
                raise ValueError("expected true or false")
            return value.lower() == "true"
        if tag == _INT:
            digits = value.lstrip("+-")
            if len(digits) > MAX_NUMBER_DIGITS:
                raise ValueError(f"the number is {len(digits)} characters long, more than {MAX_NUMBER_DIGITS}; "
                                 "put it in quotes if it is text")
            if digits.startswith(("0o", "0x")):
                return int(digits[2:], 8 if digits[1] == "o" else 16) * (-1 if value.startswith("-") else 1)
            return int(value, 10)
        if tag == _FLOAT:
            lowered = value.lower()
            if lowered.endswith(".inf"):
                return -math.inf if lowered.startswith("-") else math.inf
            if lowered == ".nan":
                return math.nan
            return float(value)
    except ValueError as exc:
        line, col = _mark(node)
        raise DefinitionError([Located(filename, line, col, _one_line(f"bad YAML value {value[:40]!r}: "
                                                                      f"{exc}"))]) from None
    if "\x00" in value:  # a "\0" escape: no database text column takes it
        line, col = _mark(node)
        raise DefinitionError([Located(filename, line, col, "the value holds a NUL character (\\0); remove it")])
    return value


def _build(root: Node, filename: str) -> tuple[Any, Positions]:
    """Nodes → plain values, in document order, with an explicit stack; the first problem is reported.

    A node reached through an alias is built again where the alias stands (its positions are its
    anchor's), which the composer has bounded.
    """
    positions = Positions()
    positions[()] = positions.value_marks[()] = _mark(root)
    out: list[Any] = []
    # Each task puts one value into its container: (node, path, container, key or None to append).
    # A mapping entry is a task of its own (key_node given) so keys are checked in document order.
    tasks: list[tuple[Node, Path, Any, Any, Node | None]] = [(root, (), out, None, None)]
    while tasks:
        node, path, container, key, key_node = tasks.pop()
        if key_node is not None:
            key = _key(key_node, path, container, positions, filename)
            path = (*path, key)
            # An empty value (`agent:`) has no text of its own: its key is the place to point at.
            empty = isinstance(node, ScalarNode) and node.value == "" and node.style is None
            positions[path] = _mark(key_node)
            positions.value_marks[path] = _mark(key_node) if empty else _mark(node)
        if node.tag not in _STD_TAGS:
            line, col = _mark(node)
            raise DefinitionError([Located(filename, line, col, f"YAML tag {node.tag!r} is not allowed; "
                                           "write plain mappings, lists and scalars")])
        value: Any
        if isinstance(node, ScalarNode):
            value = _scalar(node, filename)
        elif isinstance(node, SequenceNode):
            value = []
            for index in range(len(node.value) - 1, -1, -1):
                child = node.value[index]
                positions[(*path, index)] = positions.value_marks[(*path, index)] = _mark(child)
                tasks.append((child, (*path, index), value, None, None))
        else:
            assert isinstance(node, MappingNode)
            value = {}
            for key_child, value_child in reversed(node.value):
                tasks.append((value_child, path, value, None, key_child))
        if isinstance(container, list):
            container.append(value)
        else:
            container[key] = value
    return out[0], positions


def _key(node: Node, path: Path, mapping: dict[str, Any], positions: Positions, filename: str) -> str:
    line, col = _mark(node)
    if not isinstance(node, ScalarNode) or node.tag not in _STD_TAGS:
        raise DefinitionError([Located(filename, line, col, "mapping keys must be plain scalars (a name "
                                       "such as 'message'), not lists, mappings or tagged values")])
    value = _scalar(node, filename)
    key = str(value).lower() if isinstance(value, bool) else str(value)
    if "\x00" in key:
        raise DefinitionError([Located(filename, line, col, "the key holds a NUL character (\\0); remove it")])
    if key in mapping:
        first = positions[(*path, key)]
        raise DefinitionError([Located(filename, line, col, f"duplicate key {key!r} (first given at "
                                       f"line {first[0]}); keep one of them")])
    return key
