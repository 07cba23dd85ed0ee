"""Reading a definition file: YAML → models → whole-definition checks → a compiled definition.

Every problem is reported as FILE:LINE:COL with what to fix; all problems found are reported at
once. A CompiledDefinition holds the step graph and every template compiled, so nothing is parsed
again while instances run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import zoneinfo
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path as FsPath
from typing import Any

from pydantic import ValidationError

from flowdb.errors import DefinitionError, Located
from flowdb.expressions import ROOT_NAMES, Condition, References, Template, compile_condition, compile_template
from flowdb.inputs import check_defaults
from flowdb.models import (
    COMMON_FIELDS,
    Action,
    AgentTask,
    Document,
    Gateway,
    HumanApproval,
    Notification,
    Process,
    SubProcess,
    Timer,
)
from flowdb.problems import Locator, kind_of, shown, sorted_problems, suggest
from flowdb.yamlsafe import Path, load_yaml

_HHMM = re.compile(r"^([01]?[0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?$")


@dataclass(frozen=True)
class Edge:
    from_step: str
    to_step: str
    kind: str  # dependency | route


@dataclass
class CompiledStep:
    model: Any  # one of the step models
    parents: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    message: Template | None = None
    condition: Condition | None = None
    templates: dict[str, Template] = field(default_factory=dict)  # other text fields by name
    route_conditions: list[Condition | None] = field(default_factory=list)
    upstream: frozenset[str] = frozenset()
    position: tuple[int, int] = (1, 1)  # line and column of the step in its file

    @property
    def id(self) -> str:
        return str(self.model.id)

    @property
    def type(self) -> str:
        return str(self.model.type)

    @functools.cached_property
    def references(self) -> References:
        """Union of what this step's templates and condition read (to load only that)."""
        parts = [t.refs for t in self.templates.values()]
        parts += [c.refs for c in self.route_conditions if c is not None]
        if self.message is not None:
            parts.append(self.message.refs)
        if self.condition is not None:
            parts.append(self.condition.refs)
        return References(
            frozenset().union(*(p.inputs for p in parts)),
            frozenset().union(*(p.steps for p in parts)),
            frozenset(),
            any(p.dynamic_steps for p in parts),
            frozenset().union(*(p.roots for p in parts)),
        )


@dataclass
class CompiledDefinition:
    process: Process
    source: str
    content_hash: str
    steps: dict[str, CompiledStep]
    edges: list[Edge]
    on_success: list[tuple[Action, Template]]  # each output action with its compiled message
    on_failure: list[tuple[Action, Template]]
    filename: str = "<definition>"

    @property
    def name(self) -> str:
        return self.process.name

    def roots(self) -> list[str]:
        return [sid for sid, step in self.steps.items() if not step.parents]

    def parsed_json(self) -> dict[str, Any]:
        return self.process.model_dump(mode="json", exclude_none=True)


def load_definition_file(path: str | FsPath) -> CompiledDefinition:
    """Read and check a definition file."""
    file = FsPath(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DefinitionError([Located(str(path), 1, 1, "file not found")]) from None
    except UnicodeDecodeError as exc:
        raise DefinitionError([Located(str(path), 1, 1, f"the file is not UTF-8 text ({exc.reason} at byte "
                                       f"{exc.start}); save it as UTF-8")]) from None
    except OSError as exc:
        raise DefinitionError([Located(str(path), 1, 1, f"cannot read the file: {exc.strerror or exc}")]) from None
    return parse_definition(text, str(path))


def parse_definition(text: str, filename: str = "<definition>") -> CompiledDefinition:
    """Check a definition's text completely; raise DefinitionError listing every problem."""
    data, positions = load_yaml(text, filename)
    locator = Locator(filename, positions)
    if data is None:
        raise DefinitionError([Located(filename, 1, 1, "the file has no content; expected a 'process:' mapping")])
    if not isinstance(data, dict):
        raise DefinitionError([locator.at((), "expected a mapping with a top-level 'process:' key, "
                                          f"not {kind_of(data)}")])
    if "process" not in data:
        hint = ("; indent name, steps and the other fields under 'process:'"
                if {"name", "steps"} & set(data) else "")
        raise DefinitionError([locator.at((), f"expected a top-level 'process:' key{hint}")])
    data = _merge_config(data, locator)
    try:
        document = Document.model_validate(data)
    except ValidationError as exc:
        raise DefinitionError(locator.pydantic(exc, data)) from None
    problems: list[Located] = []
    compiled = _compile(document.process, locator, problems)
    if problems:
        raise DefinitionError(sorted_problems(problems))
    canonical = dict(data["process"])
    canonical.pop("version", None)
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()
    steps, edges, on_success, on_failure = compiled
    return CompiledDefinition(document.process, text, digest, steps, edges, on_success, on_failure, filename)


def _merge_config(data: dict[str, Any], locator: Locator) -> dict[str, Any]:
    """Move each step's `config:` fields onto the step; refuse a field given in both places."""
    process = data.get("process")
    if not isinstance(process, dict) or not isinstance(process.get("steps"), list):
        return data
    problems: list[Located] = []
    steps = []
    for index, step in enumerate(process["steps"]):
        if not isinstance(step, dict) or "config" not in step:
            steps.append(step)
            continue
        config = step["config"]
        base: Path = ("process", "steps", index)
        if not isinstance(config, dict):
            problems.append(locator.value((*base, "config"), "'config' must be a mapping of the step type's "
                                          f"fields, got {shown(config)}"))
            continue
        merged = {k: v for k, v in step.items() if k != "config"}
        for key, value in config.items():
            if key in COMMON_FIELDS:
                problems.append(locator.at((*base, "config", key),
                                           f"{key!r} belongs on the step itself, not under 'config:'"))
            elif key in merged:
                problems.append(locator.at((*base, "config", key), f"{key!r} is given both on the step (line "
                                           f"{locator.line_of((*base, key))}) and under 'config:'; keep one"))
            else:
                merged[key] = value
                locator.moved[(*base, key)] = (*base, "config", key)
        steps.append(merged)
    if problems:
        raise DefinitionError(sorted_problems(problems))
    return {**data, "process": {**process, "steps": steps}}


def _compile(
    process: Process, locator: Locator, problems: list[Located]
) -> tuple[dict[str, CompiledStep], list[Edge], list[tuple[Action, Template]], list[tuple[Action, Template]]]:
    step_path: dict[str, Path] = {}
    steps: dict[str, CompiledStep] = {}
    for index, model in enumerate(process.steps):
        path: Path = ("process", "steps", index)
        if model.id in steps:
            first = locator.line_of(step_path[model.id])
            problems.append(locator.value((*path, "id"), f"duplicate step id {model.id!r} (first used at line "
                                          f"{first}); give each step its own id"))
            continue
        step_path[model.id] = path
        at = locator.at(path, "")
        steps[model.id] = CompiledStep(model, position=(at.line, at.col))

    edges: list[Edge] = []
    for sid, step in steps.items():
        path = step_path[sid]
        seen: set[str] = set()
        for i, parent in enumerate(step.model.depends_on):
            where = (*path, "depends_on", i)
            if parent == sid:
                problems.append(locator.value(where, f"step {sid!r} depends on itself; remove {sid!r} "
                                              "from its depends_on"))
            elif parent not in steps:
                problems.append(locator.value(where, f"step {sid!r} depends on unknown step {parent!r}"
                                              f"{suggest(parent, steps)}; known steps: {', '.join(steps)}"))
            elif parent in seen:
                problems.append(locator.value(where, f"step {sid!r} lists {parent!r} twice in depends_on"))
            else:
                seen.add(parent)
                edges.append(Edge(parent, sid, "dependency"))
        if isinstance(step.model, Gateway):
            _gateway_edges(sid, step.model, path, steps, seen, edges, locator, problems)
    for edge in edges:
        steps[edge.to_step].parents.append(edge.from_step)
        steps[edge.from_step].children.append(edge.to_step)

    cycle = _find_cycle(steps)
    if cycle:
        problems.append(_cycle_problem(cycle, step_path, steps, locator))
        return steps, edges, [], []

    for sid, step in steps.items():
        step.upstream = frozenset(_ancestors(sid, steps))
        _compile_step(step, step_path[sid], process, steps, locator, problems)

    for name, problem in check_defaults(process.inputs):
        problems.append(locator.value(("process", "inputs", name, "default"), problem))

    def actions(kind: str) -> list[tuple[Action, Template]]:
        out = []
        for i, action in enumerate(getattr(process.output, kind)):
            where: Path = ("process", "output", kind, i, "message")
            template = _template(action.message, where, locator, problems)
            if template is not None:
                _check_refs(template.refs, where, None, frozenset(steps), process, steps, locator, problems)
                out.append((action, template))
        return out

    return steps, edges, actions("on_success"), actions("on_failure")


def _gateway_edges(sid: str, model: Gateway, path: Path, steps: dict[str, CompiledStep], seen: set[str],
                   edges: list[Edge], locator: Locator, problems: list[Located]) -> None:
    targets: set[str] = set()
    defaults = 0
    for i, route in enumerate(model.routes):
        where = (*path, "routes", i, "next")
        if route.default:
            defaults += 1
            if defaults == 2:
                problems.append(locator.at((*path, "routes", i, "default"),
                                           f"gateway {sid!r} has more than one default route; keep one"))
        if route.next == sid:
            problems.append(locator.value(where, f"gateway {sid!r} routes to itself"))
        elif route.next not in steps:
            problems.append(locator.value(where, f"gateway {sid!r} routes to unknown step {route.next!r}"
                                          f"{suggest(route.next, steps)}; known steps: {', '.join(steps)}"))
        elif route.next in targets:
            problems.append(locator.value(where, f"gateway {sid!r} routes to {route.next!r} twice"))
        elif route.next in seen or Edge(route.next, sid, "dependency") in edges:
            problems.append(locator.value(where, f"gateway {sid!r} routes to {route.next!r}, which it also "
                                          "depends on"))
        else:
            targets.add(route.next)
            edges.append(Edge(sid, route.next, "route"))


def _cycle_problem(cycle: list[str], step_path: dict[str, Path], steps: dict[str, CompiledStep],
                   locator: Locator) -> Located:
    """Report a cycle where it closes: the depends_on entry (or route) from its last step to its first."""
    first, last = cycle[0], cycle[-1]
    where: Path = (*step_path[first], "depends_on")
    model = steps[first].model
    if last in model.depends_on:
        where = (*where, model.depends_on.index(last))
    else:
        gateway = steps[last].model
        for i, route in enumerate(getattr(gateway, "routes", [])):
            if route.next == first:
                where = (*step_path[last], "routes", i, "next")
    chain = " -> ".join([*cycle, first])
    return locator.value(where, f"steps form a cycle: {chain} (each runs after the one before it); "
                         "remove one of these dependencies")


def _compile_step(step: CompiledStep, path: Path, process: Process, steps: dict[str, CompiledStep],
                  locator: Locator, problems: list[Located]) -> None:
    model = step.model
    sid = step.id

    def text(name: str, value: str | None, where: Path) -> Template | None:
        if value is None:
            return None
        template = _template(value, where, locator, problems)
        if template is not None:
            _check_refs(template.refs, where, sid, step.upstream, process, steps, locator, problems)
        return template

    if model.condition is not None:
        where = (*path, "condition")
        condition = _condition(model.condition, where, locator, problems)
        if condition is not None:
            _check_refs(condition.refs, where, sid, step.upstream, process, steps, locator, problems)
            step.condition = condition
    if isinstance(model, AgentTask | Notification):
        step.message = text("message", model.message, (*path, "message"))
    if isinstance(model, HumanApproval | Notification):
        for name in ("title", "instructions"):
            value = getattr(model, name, None)
            template = text(name, value, (*path, name))
            if template is not None:
                step.templates[name] = template
    if isinstance(model, HumanApproval):
        for i, artifact in enumerate(model.artifacts):
            template = text("artifact", artifact, (*path, "artifacts", i))
            if template is not None:
                step.templates[f"artifacts.{i}"] = template
    if isinstance(model, SubProcess):
        for key, value in model.inputs.items():
            if isinstance(value, str):
                template = text(key, value, (*path, "inputs", key))
                if template is not None:
                    step.templates[f"inputs.{key}"] = template
    if isinstance(model, Gateway):
        # A route's condition reads what the gateway can see: the gateway's own upstream.
        # Without a default route, when no route matches every target is skipped.
        for i, route in enumerate(model.routes):
            where = (*path, "routes", i, "condition")
            compiled = None
            if route.condition is not None:
                compiled = _condition(route.condition, where, locator, problems)
                if compiled is not None:
                    _check_refs(compiled.refs, where, sid, step.upstream, process, steps, locator, problems)
            step.route_conditions.append(compiled)
    if isinstance(model, Timer):
        _check_timer(model, path, locator, problems)


def _check_timer(model: Timer, path: Path, locator: Locator, problems: list[Located]) -> None:
    given = [name for name in ("duration", "wait_until", "until") if getattr(model, name) is not None]
    if not given:
        problems.append(locator.at(path, f"timer {model.id!r} needs one of duration, wait_until, until"))
    elif len(given) > 1:
        problems.append(locator.at((*path, given[1]), f"timer {model.id!r} needs exactly one of duration, "
                                   f"wait_until, until (got {', '.join(given)}); keep one"))
    if model.timezone is not None:
        try:
            zoneinfo.ZoneInfo(model.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            problems.append(locator.value((*path, "timezone"), f"unknown time zone {model.timezone!r}"
                                          f"{suggest(model.timezone, _zones())}; use an IANA name such as "
                                          "Europe/Paris or America/New_York"))
    if model.wait_until is not None and not _HHMM.match(model.wait_until):
        problems.append(locator.value((*path, "wait_until"), f"wait_until {model.wait_until!r} is not a time "
                                      "of day; write it as HH:MM or HH:MM:SS (24-hour), in quotes"))
    if model.until is not None:
        try:
            datetime.fromisoformat(model.until)
        except ValueError:
            problems.append(locator.value((*path, "until"), f"until {model.until!r} is not an ISO 8601 "
                                          "date-time such as 2026-12-01T09:30:00+01:00"))


def _zones() -> set[str]:
    try:
        return zoneinfo.available_timezones()
    except (OSError, ValueError):  # no tz database to list: no suggestion
        return set()


def _template(value: str, where: Path, locator: Locator, problems: list[Located]) -> Template | None:
    try:
        return compile_template(value)
    except ValueError as exc:
        problems.append(locator.value(where, str(exc)))
        return None


def _condition(value: str, where: Path, locator: Locator, problems: list[Located]) -> Condition | None:
    try:
        return compile_condition(value)
    except ValueError as exc:
        problems.append(locator.value(where, str(exc)))
        return None


def _check_refs(refs: References, where: Path, sid: str | None, upstream: frozenset[str], process: Process,
                steps: dict[str, CompiledStep], locator: Locator, problems: list[Located]) -> None:
    for root in sorted(refs.unknown_roots):
        problems.append(locator.value(where, f"unknown name {root!r} in template"
                                      f"{suggest(root, ROOT_NAMES)}; templates can use inputs, steps and "
                                      "process"))
    for name in sorted(refs.inputs - set(process.inputs)):
        declared = ", ".join(sorted(process.inputs)) or "none are declared"
        problems.append(locator.value(where, f"template uses unknown input {name!r}"
                                      f"{suggest(name, process.inputs)} (declared inputs: {declared})"))
    for ref in sorted(refs.steps):
        if ref not in steps:
            problems.append(locator.value(where, f"template uses unknown step {ref!r}{suggest(ref, steps)}"))
        elif ref == sid:
            problems.append(locator.value(where, f"step {sid!r} uses its own steps.{ref}, which has no value "
                                          "before the step has run; use an earlier step's output"))
        elif sid is not None and ref not in upstream:
            problems.append(locator.value(where, f"step {sid!r} uses steps.{ref} but does not run after it; "
                                          f"add {ref!r} to its depends_on"))


def _ancestors(sid: str, steps: dict[str, CompiledStep]) -> set[str]:
    found: set[str] = set()
    stack = list(steps[sid].parents)
    while stack:
        parent = stack.pop()
        if parent not in found:
            found.add(parent)
            stack.extend(steps[parent].parents)
    return found


def _find_cycle(steps: dict[str, CompiledStep]) -> list[str] | None:
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(steps, white)
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        trail.append(node)
        for child in steps[node].children:
            if color[child] == grey:
                return trail[trail.index(child):]
            if color[child] == white:
                found = visit(child)
                if found:
                    return found
        trail.pop()
        color[node] = black
        return None

    for node in steps:
        if color[node] == white:
            found = visit(node)
            if found:
                return found
    return None
