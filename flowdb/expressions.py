"""Templates and conditions: sandboxed Jinja2, compiled once per definition version.

A template is text with `{{ ... }}` parts. A condition is one expression: each `{{ x }}` in it is
evaluated as a value (so numbers compare as numbers), and a bare expression without braces works too.

Templates come from definitions anyone with the API may submit, so they are bounded (TemplateLimits;
the worker sets them from settings with `set_limits`):
- compiling never evaluates anything: Jinja's constant folding is off, so `flowdb validate` and
  `POST /v1/definitions` of `{{ 'a' * 10000000000 }}` are safe and fast (the error comes at run time);
- `Template.render` stops once its text passes `max_bytes`;
- no single operation builds a value far past `max_bytes`: repetition and concatenation (`*`, `+`, `~`),
  printf and str.format formatting (widths and precisions included), padding, joining, replacing and the
  filters that do the same are measured before they run; numbers are capped at MAX_INT_BITS; a value that
  repeats one part many times (`[x, x]` nested in a loop) may not be turned into text, compared or hashed
  when that would walk more than `max_bytes` parts;
- str, int, float, list, tuple and dict offer templates an allowlist of methods (below); attributes of
  classes are refused; `lipsum` is not a global;
- time is bounded by the caller: flowdb.bounded.BoundedRunner runs renders on a thread and interrupts one
  that runs past `timeout_seconds`.
Every failure is a TemplateError (TemplateLimitError for a limit), never another exception.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import wraps
from itertools import chain
from types import BuiltinMethodType, MethodType
from typing import TYPE_CHECKING, Any, NoReturn

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import TemplateExpression
from jinja2.filters import make_attrgetter, sync_do_join, sync_do_slice, sync_do_sum
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, Macro, markup_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace
from markupsafe import EscapeFormatter, Markup

from flowdb.errors import TemplateError, TemplateLimitError

if TYPE_CHECKING:
    from jinja2 import Environment

    from flowdb.settings import Settings

_BRACES = re.compile(r"\{\{(.*?)\}\}", re.S)

# -- Limits ---------------------------------------------------------------------------------------------

MAX_INT_BITS = 65_536  # about 19,700 digits; Python itself refuses to print an int of more than 4,300


@dataclass(frozen=True)
class TemplateLimits:
    """How far one render or condition may go. Read at run time, so `set_limits` applies to compiled templates."""

    max_bytes: int = 1_000_000  # the rendered text, and any one value built on the way (characters or items)
    # Enforced by flowdb.bounded.BoundedRunner, which callers run renders through:
    timeout_seconds: float = 1.0
    max_memory_bytes: int = 256 * 2**20  # how much one call may grow the process's resident memory

    @classmethod
    def from_settings(cls, settings: Settings) -> TemplateLimits:
        return cls(max_bytes=settings.template_max_bytes, timeout_seconds=settings.template_timeout_seconds,
                   max_memory_bytes=settings.template_max_memory_bytes)


_limits = TemplateLimits()


def set_limits(new: TemplateLimits) -> None:
    """Set the limits every template and condition of this process runs under (the worker calls it at start)."""
    global _limits
    _limits = new


def limits() -> TemplateLimits:
    return _limits


def _too_big(what: str, size: float, unit: str = "characters") -> NoReturn:
    limit = _limits.max_bytes
    raise TemplateLimitError(f"{what} would build a value of {int(size):,} {unit}, past the {limit:,}-byte limit "
                             "(FLOWDB_TEMPLATE_MAX_BYTES)")


def _check(what: str, size: float, unit: str = "characters") -> None:
    if size > _limits.max_bytes:
        _too_big(what, size, unit)


def _passed(what: str) -> NoReturn:
    raise TemplateLimitError(f"{what} passed the {_limits.max_bytes:,}-byte limit (FLOWDB_TEMPLATE_MAX_BYTES)")


def _check_bits(what: str, bits: float) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateLimitError(f"{what} would make a number of about {int(bits):,} bits; numbers in templates "
                                 f"are limited to {MAX_INT_BITS:,} bits (about 19,700 digits)")


# -- Measuring values -------------------------------------------------------------------------------------

_PLAIN = frozenset({str, int, float, bool, type(None)})
_SEQUENCES: tuple[type[Collection[Any]], ...] = (list, tuple, set, frozenset, type({}.keys()), type({}.values()),
                                                  type({}.items()))


def _parts(value: Any) -> Iterable[Any] | None:
    """The values inside a container that str(), JSON, == and hash() walk into; None for anything else."""
    if isinstance(value, str):
        return None
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, _SEQUENCES):
        return value
    if isinstance(value, Namespace):
        return [value._Namespace__attrs]  # its repr shows them
    return None


def _own_size(value: Any) -> int:
    """About how many characters `value` itself adds to its text (a container: brackets and separators)."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if isinstance(value, float | type(None)):
        return 24
    if isinstance(value, dict):
        return 2 + 4 * len(value)
    if isinstance(value, _SEQUENCES):
        return 2 + 2 * len(value)
    return 64  # a short repr (<generator ...>, range(0, 3), <LoopContext 1/3>) or a Namespace's brackets


_SCALAR_SIZE = {int: 8, float: 24, bool: 5, type(None): 4}  # what a plain number takes, about (big ints: below)


def _size(value: Any, budget: int) -> int:
    """About len(str(value)) (or its JSON), each shared part counted each time; stops once past `budget`.

    Runs for every object or list a template outputs, so the plain JSON types are measured inline.
    """
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict or kind is StepView or kind is list:
            total += 2 + 2 * len(item)
            for part in (item if kind is list else chain(item.keys(), item.values())):
                part_kind = type(part)
                if part_kind is str:
                    total += len(part) + 2
                elif part_kind in _SCALAR_SIZE and not (part_kind is int and part.bit_length() > 64):
                    total += _SCALAR_SIZE[part_kind]
                else:
                    stack.append(part)
        elif kind is str:
            total += len(item) + 2
        else:
            total += _own_size(item)
            parts = _parts(item)
            if parts is not None:
                stack.extend(parts)
        if total > budget:
            return total
    return total


def _laid_out_size(value: Any, indent: int, budget: int) -> int:
    """About the length of `value` pretty-printed (JSON with an indent, pprint): each part on a line of its own,
    indented `indent` characters a level."""
    size = parts_count = depth = 0
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        size += _own_size(item)
        parts_count += 1
        depth = max(depth, level)
        if size + parts_count * depth * indent > budget:
            break
        parts = _parts(item)
        if parts is not None:
            stack.extend((part, level + 1) for part in parts)
    return size + parts_count * (depth * indent + 1)


def _dag_sizes(value: Any) -> tuple[int, int]:
    """(size counting shared parts each time they appear, size counting each distinct container once)."""
    done: dict[int, int] = {}
    distinct = 0
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, finished = stack.pop()
        key = id(item)
        parts = _parts(item)
        if parts is None:
            continue
        if finished:
            total = _own_size(item)
            for part in parts:
                total += done.get(id(part), 1) if _parts(part) is not None else _own_size(part)
            done[key] = total
            continue
        if key in done:
            continue
        done[key] = 1  # in progress: a cycle (a namespace holding itself) counts once
        distinct += _own_size(item) + sum(_own_size(p) for p in parts if _parts(p) is None)
        stack.append((item, True))
        stack.extend((p, False) for p in parts if _parts(p) is not None and id(p) not in done)
    return done.get(id(value), 0), distinct


def _check_text(value: Any, what: str) -> None:
    """Refuse turning `value` into text when the text would pass the limit."""
    if type(value) in _PLAIN:
        return
    limit = _limits.max_bytes
    size = _size(value, limit)
    if size > limit:
        _too_big(what, size)


def _check_operand(value: Any, what: str) -> None:
    """Refuse comparing or hashing a value that repeats its parts so often that == or hash() would run for long.

    A large value that is a plain tree (data from the instance) is fine: comparing it takes time in proportion
    to its memory. Only sharing multiplies the work, and that is what is refused.
    """
    if type(value) in _PLAIN:
        return
    limit = _limits.max_bytes
    if _size(value, limit) <= limit:
        return
    walked, distinct = _dag_sizes(value)
    if walked > 4 * distinct:
        raise TemplateLimitError(f"{what} would walk {walked:,} parts of a value that repeats the same parts, past "
                                 f"the {limit:,}-byte limit (FLOWDB_TEMPLATE_MAX_BYTES)")


def _text_size(value: Any, budget: int) -> int:
    return len(value) if isinstance(value, str) else _size(value, budget)


def _texts_size(values: Iterable[Any], budget: int) -> int:
    total = 0
    for value in values:
        total += _text_size(value, budget - total)
        if total > budget:
            break
    return total


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    _check_text(value, what)
    return str(value)


# -- Operators ------------------------------------------------------------------------------------------

def _times(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int):
        _check_bits("'*'", left.bit_length() + right.bit_length())
    elif isinstance(right, int) and hasattr(left, "__len__") and not isinstance(left, dict):
        _check("'*'", len(left) * right, "characters" if isinstance(left, str) else "items")
    elif isinstance(left, int) and hasattr(right, "__len__") and not isinstance(right, dict):
        _check("'*'", len(right) * left, "characters" if isinstance(right, str) else "items")
    return left * right


def _plus(left: Any, right: Any) -> Any:
    if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
        _check("'+'", len(left) + len(right), "characters" if isinstance(left, str) else "items")
    return left + right


def _power(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        _check_bits("'**'", right * math.log2(abs(left)))
    return left**right


def _modulo(left: Any, right: Any) -> Any:
    if isinstance(left, str):
        _check("'%' formatting", _printf_size(left, right))
    return left % right


MAX_RANGE = 100_000  # numbers one range() may count (Jinja's sandbox has the same bound)


def _range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise TemplateLimitError(f"range() would count {len(numbers):,} numbers; a range in a template counts at "
                                 f"most {MAX_RANGE:,}")
    return numbers


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {"*": _times, "+": _plus, "**": _power, "%": _modulo}


def _number_size(value: Any, precision: int) -> int:
    """Characters a number takes in a printf or format() field: digits (a float in fixed notation up to 310)."""
    digits = value.bit_length() // 3 + 2 if isinstance(value, int) else 330
    return 2 * (digits + precision)


def _printf_size(fmt: str, values: Any) -> int:
    """An upper bound of len(fmt % values): each conversion's width, precision and value, read like Python does."""
    args = values if isinstance(values, tuple) else (values,)
    mapping = values if isinstance(values, Mapping) else None
    total = len(fmt)
    budget = _limits.max_bytes
    index, position, end = 0, fmt.find("%"), len(fmt)

    def number(at: int) -> tuple[int, int]:
        nonlocal index
        if at < end and fmt[at] == "*":
            value = args[index] if index < len(args) else 0
            index += 1
            return (abs(value) if isinstance(value, int) else 0), at + 1
        start = at
        while at < end and fmt[at].isdigit():
            at += 1
        return (int(fmt[start:at]) if at > start else 0), at

    while position != -1 and total <= budget:
        at = position + 1
        key = None
        if at < end and fmt[at] == "(":
            depth, at = 1, at + 1
            start = at
            while at < end and depth:
                depth += {"(": 1, ")": -1}.get(fmt[at], 0)
                at += 1
            key = fmt[start:at - 1]
        while at < end and fmt[at] in "#0- +":
            at += 1
        width, at = number(at)
        precision = 0
        if at < end and fmt[at] == ".":
            precision, at = number(at + 1)
        while at < end and fmt[at] in "hlL":
            at += 1
        kind = fmt[at] if at < end else ""
        if kind and kind != "%":
            if key is not None and mapping is not None:
                value = mapping.get(key)
            else:
                value = args[index] if index < len(args) else None
                index += 1
            if kind in "sra":
                size = min(_text_size(value, budget), precision) if precision else _text_size(value, budget)
            elif kind == "c":
                size = 1
            else:
                size = _number_size(value, precision)
            total += max(width, size)
        position = fmt.find("%", at + 1)
    return total


_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d+))?[a-zA-Z%]?\Z", re.S)


def _field_size(value: Any, spec: str, budget: int) -> int:
    """An upper bound of len(format(value, spec)) for str.format."""
    match = _SPEC.match(spec)
    if match is None:  # not a standard spec: take any number in it as a width
        width, precision = max((int(n) for n in re.findall(r"\d+", spec)), default=0), 0
    else:
        width, precision = int(match["width"] or 0), int(match["precision"] or 0)
    if isinstance(value, int | float) and not isinstance(value, bool):
        size = _number_size(value, precision)
    else:
        size = _text_size(value, budget)
    return max(width, size)


class _BoundedFormatter(SandboxedFormatter):
    """str.format / format_map in templates: counts what each field adds, refuses before building too much."""

    _total = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._total = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:
            _check_text(value, "str.format")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        limit = _limits.max_bytes
        self._total += _field_size(value, format_spec, limit)
        if self._total > limit:
            _too_big("str.format", self._total)
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    pass


# -- Methods templates may call -----------------------------------------------------------------------------

_STR_SAFE = frozenset({
    "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha", "isascii", "isdecimal",
    "isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace", "istitle", "isupper", "lower",
    "lstrip", "partition", "removeprefix", "removesuffix", "rfind", "rindex", "rpartition", "rsplit", "rstrip",
    "split", "splitlines", "startswith", "strip", "swapcase", "title", "upper",
})


def _padded(name: str, text: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    width = args[0] if args else kwargs.get("width", 0)
    if isinstance(width, int):
        _check(f"str.{name}", max(len(text), width))


def _tabs(name: str, text: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    size = args[0] if args else kwargs.get("tabsize", 8)
    if isinstance(size, int):
        _check(f"str.{name}", len(text) + text.count("\t") * max(size, 0))


def _replaced_size(text: str, old: Any, new: Any, count: Any) -> int:
    if not (isinstance(old, str) and isinstance(new, str)):
        return len(text)
    times = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    return len(text) + times * max(len(new) - len(old), 0)


def _replacing(name: str, text: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if len(args) >= 2:
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        _check(f"str.{name}", _replaced_size(text, args[0], args[1], count))


def _joined_size(separator: str, items: list[Any]) -> int:
    budget = _limits.max_bytes
    return _texts_size(items, budget) + len(separator) * max(len(items) - 1, 0)


_STR_GUARDS: dict[str, Callable[[str, str, tuple[Any, ...], dict[str, Any]], None]] = {
    "center": _padded, "ljust": _padded, "rjust": _padded, "zfill": _padded,
    "expandtabs": _tabs, "replace": _replacing,
}
_STR_ATTRIBUTES = _STR_SAFE | set(_STR_GUARDS) | {"join", "format", "format_map"}
_MARKUP_ATTRIBUTES = _STR_ATTRIBUTES | {"unescape", "striptags", "escape"}
_INT_ATTRIBUTES = frozenset({"bit_length", "bit_count", "conjugate", "real", "imag", "numerator", "denominator",
                             "as_integer_ratio", "is_integer"})
_FLOAT_ATTRIBUTES = frozenset({"as_integer_ratio", "conjugate", "real", "imag", "is_integer", "hex"})
_LIST_ATTRIBUTES = frozenset({"copy", "count", "index"})
_TUPLE_ATTRIBUTES = frozenset({"count", "index"})
_DICT_ATTRIBUTES = frozenset({"copy", "get", "items", "keys", "values"})


def _allowed_attributes(obj: Any) -> frozenset[str] | None:
    """The attributes templates may use on a builtin value (None: not restricted beyond Jinja's sandbox)."""
    if isinstance(obj, str):
        return _MARKUP_ATTRIBUTES if isinstance(obj, Markup) else _STR_ATTRIBUTES
    if isinstance(obj, int):
        return _INT_ATTRIBUTES
    if isinstance(obj, float):
        return _FLOAT_ATTRIBUTES
    if isinstance(obj, dict):
        return _DICT_ATTRIBUTES
    if isinstance(obj, list):
        return _LIST_ATTRIBUTES
    if isinstance(obj, tuple):
        return _TUPLE_ATTRIBUTES
    if isinstance(obj, type):  # classes (dict, namespace, ...): no attributes at all (dict.fromkeys, ...)
        return frozenset()
    return None


# -- Filters and tests ------------------------------------------------------------------------------------

_TEXT_FILTERS = frozenset({  # turn their value (or arguments) into text
    "string", "safe", "e", "escape", "forceescape", "upper", "lower", "capitalize", "title", "trim", "striptags",
    "truncate", "wordcount", "urlize", "urlencode", "xmlattr",
})
_COMPARING_FILTERS = frozenset({"sort", "unique", "dictsort", "groupby", "min", "max"})  # compare or hash items


def _checking(name: str, f: Callable[..., Any], check: Callable[[Any, str], None]) -> Callable[..., Any]:
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0
    what = f"|{name}"

    @wraps(f)  # keeps jinja_pass_arg (pass_environment / pass_eval_context)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        for arg in args[skip:]:
            check(arg, what)
        for arg in kwargs.values():
            check(arg, what)
        return f(*args, **kwargs)

    return guarded


def _guarded_filters(filters: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    original = dict(filters)
    guarded: dict[str, Callable[..., Any]] = {}
    for name, f in original.items():
        if name in _TEXT_FILTERS:
            guarded[name] = _checking(name, f, _check_text)
        elif name in _COMPARING_FILTERS:
            guarded[name] = _checking(name, f, _check_operand)
        else:
            guarded[name] = f

    def center(value: Any, width: int = 80) -> str:
        text = _text(value, "|center")
        if isinstance(width, int):
            _check("|center", max(len(text), width))
        return original["center"](text, width)  # type: ignore[no-any-return]

    def indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
        text = _text(s, "|indent")
        prefix = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _check("|indent", len(text) + prefix * (text.count("\n") + 2))
        return original["indent"](s if isinstance(s, Markup) else text, width, first, blank)  # type: ignore[no-any-return]

    @pass_environment
    def wordwrap(env: Environment, s: Any, width: int = 79, break_long_words: bool = True,
                 wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:
        text = _text(s, "|wordwrap")
        joint = len(_text(wrapstring, "|wordwrap")) if wrapstring is not None else 1
        lines = 2 * (len(text) // max(width, 1) if isinstance(width, int) else len(text)) + text.count("\n") + 2
        _check("|wordwrap", len(text) + joint * min(lines, len(text) + 1))
        return original["wordwrap"](env, text, width, break_long_words, wrapstring,  # type: ignore[no-any-return]
                                    break_on_hyphens)

    @pass_eval_context
    def replace(eval_ctx: EvalContext, s: Any, old: Any, new: Any, count: int | None = None) -> str:
        text, old_text, new_text = _text(s, "|replace"), _text(old, "|replace"), _text(new, "|replace")
        _check("|replace", _replaced_size(text, old_text, new_text, count))
        return original["replace"](eval_ctx, s, old, new, count)  # type: ignore[no-any-return]

    @pass_eval_context
    def join(eval_ctx: EvalContext, value: Iterable[Any], d: Any = "", attribute: str | int | None = None) -> str:
        items = list(value)
        if attribute is not None:
            items = list(map(make_attrgetter(eval_ctx.environment, attribute), items))
        _check("|join", _joined_size(_text(d, "|join"), items))
        return sync_do_join(eval_ctx, items, d)

    def format_(value: Any, *args: Any, **kwargs: Any) -> str:
        text = _text(value, "|format")
        _check("|format", _printf_size(text, kwargs or args))
        return original["format"](text, *args, **kwargs)  # type: ignore[no-any-return]

    @pass_eval_context
    def tojson(eval_ctx: EvalContext, value: Any, indent: int | str | None = None) -> Markup:
        width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        limit = _limits.max_bytes
        _check("|tojson", _laid_out_size(value, width, limit) if width > 0 else _size(value, limit))
        return original["tojson"](eval_ctx, value, indent)  # type: ignore[no-any-return]

    def pprint(value: Any) -> str:
        _check("|pprint", _laid_out_size(value, 1, _limits.max_bytes))  # pprint indents one space a level
        return original["pprint"](value)  # type: ignore[no-any-return]

    def batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Any:
        if fill_with is not None and isinstance(linecount, int):
            _check("|batch", linecount, "items")
        return original["batch"](value, linecount, fill_with)

    def slice_(value: Collection[Any], slices: int, fill_with: Any = None) -> Any:
        if isinstance(slices, int):
            _check("|slice", slices, "lists")
        return sync_do_slice(value, slices, fill_with)

    @pass_environment
    def sum_(env: Environment, iterable: Iterable[Any], attribute: str | int | None = None, start: Any = 0) -> Any:
        items = list(iterable)
        if attribute is not None:
            items = list(map(make_attrgetter(env, attribute), items))
        if not all(isinstance(i, int | float) for i in (start, *items)):
            limit = _limits.max_bytes
            _check("|sum", _size(start, limit) + _texts_size(items, limit), "items")
        return sync_do_sum(env, items, None, start)

    guarded.update({"center": center, "indent": indent, "wordwrap": wordwrap, "replace": replace, "join": join,
                    "format": format_, "tojson": tojson, "pprint": pprint, "batch": batch, "slice": slice_,
                    "sum": sum_})
    return guarded


def _guarded_tests(tests: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    return {name: _checking(f"is {name}", f, _check_operand) for name, f in tests.items()}


# -- The environment -----------------------------------------------------------------------------------------

class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, changed so that compiling evaluates nothing and `~` and comparisons are measured.

    With `optimized=False` and a finalize that takes the eval context, Jinja folds no constants; the
    overrides below close the two remaining paths (`{% autoescape expr %}` and Output children).
    """

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()  # a macro's, call block's or {% set %} block's output
        self.writeline(f"{frame.buffer} = environment.new_buffer()")

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: Any) -> str:
        if not isinstance(node, nodes.TemplateData):
            raise nodes.Impossible()
        return super()._output_child_to_const(node, frame, finalize)

    def visit_EvalContextModifier(self, node: nodes.EvalContextModifier, frame: Frame) -> None:
        for keyword in node.options:  # decided at run time, never evaluated here
            self.writeline(f"context.eval_ctx.{keyword.key} = ")
            self.visit(keyword.value, frame)
        frame.eval_ctx.volatile = True

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            self.write("environment.join_values((")
        else:
            self.write("environment.join_text((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("), context.eval_ctx)" if frame.eval_ctx.volatile or frame.eval_ctx.autoescape else "))")

    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        self.write("(environment.operand(")
        self.visit(node.expr, frame)
        self.write(")")
        for op in node.ops:
            self.visit(op, frame)
        self.write(")")

    def visit_Operand(self, node: nodes.Operand, frame: Frame) -> None:
        self.write(f" {_OPERATORS[node.op]} environment.operand(")
        self.visit(node.expr, frame)
        self.write(")")

    def visit_Pair(self, node: nodes.Pair, frame: Frame) -> None:
        self.write("environment.operand(")  # a dict literal hashes its keys
        self.visit(node.key, frame)
        self.write("): ")
        self.visit(node.value, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("{")
        for idx, item in enumerate(node.items):
            if idx:
                self.write(", ")
            self.visit(item, frame)
        self.write("}")


_OPERATORS = {"eq": "==", "ne": "!=", "gt": ">", "gteq": ">=", "lt": "<", "lteq": "<=", "in": "in",
              "notin": "not in"}


class _Buffer(list[str]):
    """Output collected inside a macro or block: measured as it grows, not once it is complete."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def append(self, text: str) -> None:
        self.size += len(text)
        if self.size > _limits.max_bytes:
            _passed("the output of a macro or block")
        super().append(text)

    def extend(self, texts: Iterable[str]) -> None:
        texts = tuple(texts)
        self.size += sum(map(len, texts))
        if self.size > _limits.max_bytes:
            _passed("the output of a macro or block")
        super().extend(texts)


def _concat(parts: Iterable[str]) -> str:
    """Joins a macro's, block's or `{% set %}` block's output: measured before it is joined."""
    if not isinstance(parts, list):
        parts = list(parts)
    if sum(map(len, parts)) > _limits.max_bytes:
        _passed("the output of a macro or block")
    return "".join(parts)


@pass_eval_context
def _finalize(eval_ctx: EvalContext, value: Any) -> Any:
    # Objects and lists render as JSON, not as Python reprs, so an agent gets readable data.
    if type(value) is str:
        return value
    if isinstance(value, ErrorView):  # on_failure's `{{ error }}`: the instance's error, as text
        return str(value)
    if isinstance(value, dict | list):
        limit = _limits.max_bytes
        size = _size(value, limit)
        if size > limit:
            _too_big("rendering a value as JSON", size)
        return json.dumps(value, default=str)
    _check_text(value, "rendering a value")
    return value


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(_BINOPS)

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, finalize=_finalize, autoescape=False, optimized=False)
        self.concat = _concat  # type: ignore[method-assign]
        self.globals.pop("lipsum", None)
        self.globals["range"] = _range
        self.filters = _guarded_filters(self.filters)
        self.tests = _guarded_tests(self.tests)  # type: ignore[assignment]

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        guard = _BINOPS.get(operator)
        return guard(left, right) if guard is not None else self.binop_table[operator](left, right)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if not super().is_safe_attribute(obj, attr, value):
            return False
        allowed = _allowed_attributes(obj)
        return allowed is None or attr in allowed

    def getitem(self, obj: Any, argument: Any) -> Any:
        if type(argument) not in _PLAIN:
            _check_operand(argument, "a subscript")
        return super().getitem(obj, argument)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        if type(obj) is BuiltinMethodType or type(obj) is MethodType:
            owner = getattr(obj, "__self__", None)
            name = getattr(obj, "__name__", "")
            if isinstance(owner, str):
                if name in ("format", "format_map"):  # however a template got hold of it: sandboxed and measured
                    return super().call(context, self.wrap_str_format(obj), *args, **kwargs)
                if name == "join" and len(args) == 1:
                    items = list(args[0])
                    _check("str.join", _joined_size(owner, items))
                    args = (items,)
                guard = _STR_GUARDS.get(name)
                if guard is not None:
                    guard(name, owner, args, kwargs)
        if not isinstance(obj, Macro):  # dict(pairs), loop.changed(x), list.count(x): hash or compare their arguments
            for arg in chain(args, kwargs.values()):
                if type(arg) not in _PLAIN:
                    _check_operand(arg, f"calling {getattr(obj, '__name__', 'a function')}()")
        return super().call(context, obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if not isinstance(value, MethodType | BuiltinMethodType) or value.__name__ not in ("format", "format_map"):
            return None
        text = value.__self__
        if not isinstance(text, str):
            return None
        kind = type(text)
        formatter: _BoundedFormatter
        if isinstance(text, Markup):
            formatter = _BoundedEscapeFormatter(self, escape=text.escape)
        else:
            formatter = _BoundedFormatter(self)
        is_format_map = value.__name__ == "format_map"

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs, args = args[0], ()
            return kind(formatter.vformat(text, args, kwargs))

        return bounded_format

    # Called by the generated code (see _BoundedCodeGenerator).

    new_buffer = _Buffer

    @staticmethod
    def operand(value: Any) -> Any:
        if type(value) not in _PLAIN:
            _check_operand(value, "comparing")
        return value

    @staticmethod
    def join_text(values: tuple[Any, ...]) -> str:
        parts = [v if type(v) is str else _text(v, "'~'") for v in values]
        _check("'~'", sum(map(len, parts)))
        return "".join(parts)

    @staticmethod
    def join_values(values: tuple[Any, ...], eval_ctx: EvalContext) -> str:
        parts = [v if isinstance(v, str) else _text(v, "'~'") for v in values]
        _check("'~'", sum(map(len, parts)))
        return markup_join(parts) if eval_ctx.autoescape else "".join(parts)


_ENV = _BoundedEnvironment()


# -- Templates and conditions ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class References:
    """What a template or condition reads: input names and step ids (None = every step)."""

    inputs: frozenset[str] = frozenset()
    steps: frozenset[str] = frozenset()
    unknown_roots: frozenset[str] = frozenset()
    dynamic_steps: bool = False
    roots: frozenset[str] = frozenset()  # which of inputs, steps, process it reads at all

    @property
    def needs_context(self) -> bool:
        return bool(self.roots or self.inputs or self.steps or self.dynamic_steps)


ROOT_NAMES = frozenset({"inputs", "steps", "process"})
ITEM_NAMES = frozenset({"item", "index"})  # in the templates of a for_each step's items
GATHER_NAMES = frozenset({"items", "completed", "total"})  # in a for_each step's complete_when
FAILURE_NAMES = frozenset({"error"})  # in on_failure messages: why the instance failed
FEEDBACK_NAMES = frozenset({"feedback"})  # in agent tasks' messages: what reviewers said of earlier output


def _references(ast: nodes.Node) -> References:
    inputs: set[str] = set()
    steps: set[str] = set()
    dynamic = False
    # Names a template sets itself ({% for x in ... %}, {% set x = ... %}) and Jinja's globals
    # (range, dict, ...) are not references to the instance's data.
    own = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    if any(True for _ in ast.find_all(nodes.For)):
        own.add("loop")
    roots = {n.name for n in ast.find_all(nodes.Name) if n.ctx == "load"} - own - set(_ENV.globals)
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        base = node.node  # type: ignore[attr-defined]
        if not (isinstance(base, nodes.Name) and base.name in {"steps", "inputs"}):
            continue
        if isinstance(node, nodes.Getattr):
            key: Any = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            key = node.arg.value
        else:
            dynamic = dynamic or base.name == "steps"
            continue
        (steps if base.name == "steps" else inputs).add(str(key))
    bare_steps = any(
        isinstance(n, nodes.Name) and n.name == "steps" for n in _names_not_subscripted(ast)
    )
    return References(frozenset(inputs), frozenset(steps), frozenset(roots - ROOT_NAMES),
                      dynamic or bare_steps, frozenset(roots & ROOT_NAMES))


def _names_not_subscripted(ast: nodes.Node) -> list[nodes.Name]:
    """Names used as a whole (e.g. `steps | list`), not as the base of `.x` or `['x']`."""
    based = {id(n.node) for n in ast.find_all((nodes.Getattr, nodes.Getitem))}  # type: ignore[attr-defined]
    return [n for n in ast.find_all(nodes.Name) if id(n) not in based]


def _shown(source: str) -> str:
    return repr(source) if len(source) <= 200 else repr(source[:200]) + "..."


def _failure(kind: str, source: str, exc: Exception) -> TemplateError:
    """The TemplateError for any exception a template raised (a limit keeps its class)."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, TemplateLimitError):
        return TemplateLimitError(f"{kind} {_shown(source)} failed: {reason}")
    if isinstance(exc, TemplateError):
        return exc
    return TemplateError(f"{kind} {_shown(source)} failed: {reason}")


# How deep a template may nest: Jinja's code generator (and the reference reader) recurse over
# the tree and fail at about 40 {% %} blocks inside each other, or 190 nodes (measured).
MAX_BLOCK_DEPTH = 20
MAX_NODE_DEPTH = 150


def _generated(kind: str, source: str, build: Callable[[], Any]) -> Any:
    """Generate a parsed template's Python code (the first time it runs, not when it is compiled:
    a definition of 10,000 steps then validates in a few seconds instead of generating 10,000 modules)."""
    try:
        return build()
    except Exception as exc:  # the parser accepted it, so this is a limit of the code generator
        reason = _not_compiled(exc) or f"{type(exc).__name__}: {exc}"
        raise TemplateError(f"{kind} {_shown(source)} cannot run: {reason}") from None


@dataclass
class Template:
    """A parsed text template (static text when it has no {{ }}, {% %} or {# #} part)."""

    source: str
    refs: References
    _ast: Any = field(repr=False, default=None)
    _compiled: Any = field(repr=False, default=None)

    @property
    def static(self) -> bool:
        return self._ast is None

    def render(self, context: Mapping[str, Any]) -> str:
        if self._ast is None:
            return self.source
        compiled = self._compiled
        if compiled is None:
            compiled = self._compiled = _generated("template", self.source, lambda: _ENV.from_string(self._ast))
        limit = _limits.max_bytes
        parts: list[str] = []
        size = 0
        try:
            for chunk in compiled.root_render_func(compiled.new_context(context)):
                size += len(chunk) if chunk.isascii() else len(chunk.encode("utf-8", "surrogatepass"))
                if size > limit:
                    _passed("the rendered text")
                parts.append(chunk)
        except Exception as exc:  # whatever the template did, the caller gets a TemplateError
            raise _failure("template", self.source, exc) from None
        return "".join(parts)


@dataclass
class Condition:
    """A parsed condition: one expression whose value decides true or false."""

    source: str
    expression: str
    refs: References
    _ast: Any = field(repr=False, default=None)  # the expression's node
    _compiled: Any = field(repr=False, default=None)

    def evaluate(self, context: Mapping[str, Any]) -> bool:
        compiled = self._compiled
        if compiled is None:
            compiled = self._compiled = _generated("condition", self.source, self._build)
        try:
            return bool(compiled(**context))
        except Exception as exc:  # whatever the expression did, the caller gets a TemplateError
            raise _failure("condition", self.source, exc) from None

    def value(self, context: Mapping[str, Any]) -> Any:
        """The expression's value itself (a for_each list), not its truth."""
        compiled = self._compiled
        if compiled is None:
            compiled = self._compiled = _generated("expression", self.source, self._build)
        try:
            return compiled(**context)
        except Exception as exc:  # whatever the expression did, the caller gets a TemplateError
            raise _failure("expression", self.source, exc) from None

    def _build(self) -> TemplateExpression:
        # What Environment.compile_expression builds, from the node parsed once already.
        body = [nodes.Assign(nodes.Name("result", "store"), self._ast, lineno=1)]
        return TemplateExpression(_ENV.from_string(nodes.Template(body, lineno=1)), undefined_to_none=False)


def _not_compiled(exc: Exception) -> str | None:
    """Why compiling failed, for errors other than a syntax error (None: not a compile problem)."""
    if isinstance(exc, RecursionError | MemoryError) or (isinstance(exc, SyntaxError) and "nested" in str(exc)):
        return "it is nested too deeply"
    if isinstance(exc, ValueError) and "digits" in str(exc):
        return "a number in it has too many digits"
    return None


def _depths(ast: nodes.Node) -> tuple[int, int]:
    """How deep the tree's nodes, and its {% %} blocks, nest (found iteratively: the tree may be deep)."""
    deepest = deepest_block = 0
    stack: list[tuple[nodes.Node, int, int]] = [(ast, 0, 0)]
    while stack:
        node, depth, blocks = stack.pop()
        if isinstance(node, nodes.Stmt) and "body" in node.fields:
            blocks += 1
        deepest, deepest_block = max(deepest, depth), max(deepest_block, blocks)
        if deepest > MAX_NODE_DEPTH:
            break
        stack.extend((child, depth + 1, blocks) for child in node.iter_child_nodes())
    return deepest, deepest_block


def _parsed(source: str) -> nodes.Template:
    """Parse (never evaluate, never generate code); ValueError says why it cannot be a template."""
    try:
        ast = _ENV.parse(source)
    except TemplateSyntaxError:
        raise
    except (RecursionError, MemoryError, SyntaxError, ValueError) as exc:
        reason = _not_compiled(exc)
        if reason is None:
            raise
        raise ValueError(reason) from None
    depth, blocks = _depths(ast)
    if depth > MAX_NODE_DEPTH:
        raise ValueError("it is nested too deeply")
    if blocks > MAX_BLOCK_DEPTH:
        raise ValueError(f"its {{% %}} blocks nest {blocks} deep, more than {MAX_BLOCK_DEPTH}")
    return ast


def compile_template(source: str) -> Template:
    """Parse text with {{ }} parts; raise ValueError with the reason when it does not parse."""
    if "{{" not in source and "{%" not in source and "{#" not in source:
        return Template(source, References())
    try:
        ast = _parsed(source)
    except TemplateSyntaxError as exc:
        raise ValueError(f"template does not parse: {_syntax_reason(exc)}; write values as "
                         "{{ inputs.NAME }} or {{ steps.ID.output }}, each '{{' closed by '}}'") from None
    except ValueError as exc:
        raise ValueError(f"template does not parse: {exc}") from None
    return Template(source, _references(ast), ast)


def _syntax_reason(exc: TemplateSyntaxError) -> str:
    return (exc.message or "syntax error").rstrip(".")


def condition_expression(source: str) -> str:
    """The one Jinja expression a condition stands for: each {{ x }} becomes (x)."""
    return _BRACES.sub(lambda m: f"({m.group(1).strip()})", source).strip()


def compile_condition(source: str) -> Condition:
    """Parse a condition; raise ValueError with the reason when it is not one expression."""
    if "{%" in source or "{#" in source:
        raise ValueError("a condition is one expression; {% %} and {# #} blocks are not allowed, "
                         "write it like {{ steps.ID.output.ok }} == true")
    expression = condition_expression(source)
    if not expression:
        raise ValueError("the condition is empty")
    try:
        ast = _parsed("{{ " + expression + " }}")
    except TemplateSyntaxError as exc:
        raise ValueError(f"condition is not a valid expression ({_syntax_reason(exc)}); write one expression "
                         "such as {{ steps.ID.output.score }} >= 80 or {{ inputs.NAME }} == 'yes'") from None
    except ValueError as exc:
        raise ValueError(f"condition is not a valid expression ({exc})") from None
    body = ast.body
    if len(body) != 1 or not isinstance(body[0], nodes.Output) or len(body[0].nodes) != 1:
        raise ValueError("the condition is not one expression; write it like {{ steps.ID.output.ok }} == true")
    return Condition(source, expression, _references(ast), body[0].nodes[0])


class ErrorView(dict[str, Any]):
    """`error` in an on_failure template: type, message, step (item, round); `{{ error }}` alone is
    the instance's error text."""

    def __str__(self) -> str:
        return str(self.get("text", ""))


class StepView(dict[str, Any]):
    """`steps.<id>` in a template: the step record, with its output's fields reachable directly."""

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> StepView:
        view = cls()
        output = record.get("output")
        if isinstance(output, dict):
            view.update(output)
        view.update(record)  # record fields (status, output, error, ...) win over output fields
        return view
