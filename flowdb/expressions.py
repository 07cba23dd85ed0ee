"""Templates and conditions: sandboxed Jinja2, compiled once per definition version.

A template is text with `{{ ... }}` parts. A condition is one expression: each `{{ x }}` in it is
evaluated as a value (so numbers compare as numbers), and a bare expression without braces works too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flowdb.errors import TemplateError

_BRACES = re.compile(r"\{\{(.*?)\}\}", re.S)


def _finalize(value: Any) -> Any:
    # Objects and lists render as JSON, not as Python reprs, so an agent gets readable data.
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return value


_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, finalize=_finalize, autoescape=False)


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


@dataclass
class Template:
    """A compiled text template."""

    source: str
    refs: References
    _compiled: Any = field(repr=False, default=None)

    def render(self, context: Mapping[str, Any]) -> str:
        if self._compiled is None:
            return self.source
        try:
            return str(self._compiled.render(context))
        except (UndefinedError, SecurityError, TypeError, ValueError, ArithmeticError,
                LookupError, AttributeError) as exc:
            raise TemplateError(f"template {self.source!r} failed: {exc}") from None


@dataclass
class Condition:
    """A compiled condition: one expression whose value decides true or false."""

    source: str
    expression: str
    refs: References
    _compiled: Any = field(repr=False, default=None)

    def evaluate(self, context: Mapping[str, Any]) -> bool:
        try:
            return bool(self._compiled(**context))
        except (UndefinedError, SecurityError, TypeError, ValueError, ArithmeticError,
                LookupError, AttributeError) as exc:
            raise TemplateError(f"condition {self.source!r} failed: {exc}") from None


def compile_template(source: str) -> Template:
    """Compile text with {{ }} parts; raise ValueError with the reason when it does not parse."""
    if "{{" not in source and "{%" not in source and "{#" not in source:
        return Template(source, References())
    try:
        ast = _ENV.parse(source)
        compiled = _ENV.from_string(source)
    except TemplateSyntaxError as exc:
        raise ValueError(f"template does not parse: {_syntax_reason(exc)}; write values as "
                         "{{ inputs.NAME }} or {{ steps.ID.output }}, each '{{' closed by '}}'") from None
    return Template(source, _references(ast), compiled)


def _syntax_reason(exc: TemplateSyntaxError) -> str:
    return (exc.message or "syntax error").rstrip(".")


def condition_expression(source: str) -> str:
    """The one Jinja expression a condition stands for: each {{ x }} becomes (x)."""
    return _BRACES.sub(lambda m: f"({m.group(1).strip()})", source).strip()


def compile_condition(source: str) -> Condition:
    """Compile a condition; raise ValueError with the reason when it is not one expression."""
    if "{%" in source or "{#" in source:
        raise ValueError("a condition is one expression; {% %} and {# #} blocks are not allowed, "
                         "write it like {{ steps.ID.output.ok }} == true")
    expression = condition_expression(source)
    if not expression:
        raise ValueError("the condition is empty")
    try:
        ast = _ENV.parse("{{ " + expression + " }}")
        compiled = _ENV.compile_expression(expression, undefined_to_none=False)
    except TemplateSyntaxError as exc:
        raise ValueError(f"condition is not a valid expression ({_syntax_reason(exc)}); write one expression "
                         "such as {{ steps.ID.output.score }} >= 80 or {{ inputs.NAME }} == 'yes'") from None
    return Condition(source, expression, _references(ast), compiled)


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
