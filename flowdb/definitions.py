"""Reading a definition file: YAML → models → whole-definition checks → a compiled definition.

Every problem is reported as FILE:LINE:COL with what to fix; all problems found are reported at
once. Each phase checks what the phases before it could read: a step that fails its model is left
out of the graph but stays known by its id (no "unknown step" for it), and the checks that need the
whole graph (joins, "runs after", loops) skip only the steps whose parents it hides. A
CompiledDefinition holds the step graph and every template compiled, so nothing is parsed again
while instances run.

Nothing here recurses over the step graph, and nothing costs more than linear time in the steps and
edges but the check that a template reads only steps that run before its own (bit sets over the
topological order, built only for the steps that need them): a definition of MAX_STEPS steps of any
shape is checked in seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from pydantic import ValidationError

from flowdb.errors import DefinitionError, Located
from flowdb.expressions import (
    FAILURE_NAMES,
    FEEDBACK_NAMES,
    GATHER_NAMES,
    ITEM_NAMES,
    ROOT_NAMES,
    Condition,
    References,
    Template,
    compile_condition,
    compile_template,
)
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
)
from flowdb.problems import Locator, failed_paths, kind_of, shown, sorted_problems, suggest
from flowdb.yamlsafe import Path, load_yaml

MAX_STEPS = 10_000  # steps in one process
_LISTED = 20  # names listed in a message before "... (N more)"
_CYCLE_SHOWN = 5  # steps shown at each end of a long cycle
_SUGGEST_BUDGET = 200_000  # names compared for "did you mean" suggestions in one definition



@dataclass(frozen=True)
class Edge:
    from_step: str
    to_step: str
    kind: str  # dependency | route | loop (a route back to an ancestor: it starts a new round)


@dataclass(frozen=True)
class JoinRule:
    """When a step with several parents starts (DESIGN.md, R6): once `needed` parents completed, and,
    for `join: all`, every parent settled. It is skipped once `needed` completions can no longer come."""

    needed: int = 1
    waits_for_all: bool = True
    cancel_others: bool = False  # when it starts, cancel the parents still open (a race)

    @classmethod
    def of(cls, model: Any) -> JoinRule:
        join = model.join
        if join == "all":
            return cls(1, True, model.cancel_others)
        if join == "any":
            return cls(1, False, model.cancel_others)
        return cls(join.at_least, False, model.cancel_others)


@dataclass(frozen=True)
class Loop:
    """A gateway's route back to an ancestor (R1): taking it starts a new round of `body`, every step
    on a path from `target` to the gateway (both included), in topological order (R4)."""

    gateway: str
    target: str
    body: tuple[str, ...]


@dataclass
class CompiledStep:
    model: Any  # one of the step models
    parents: list[str] = field(default_factory=list)  # through depends_on and forward routes (no loop-backs)
    children: list[str] = field(default_factory=list)
    loops: dict[str, Loop] = field(default_factory=dict)  # a gateway's loop-backs, by target
    join: JoinRule = JoinRule()
    message: Template | None = None
    condition: Condition | None = None
    templates: dict[str, Template] = field(default_factory=dict)  # other text fields by name
    route_conditions: list[Condition | None] = field(default_factory=list)
    position: tuple[int, int] = (1, 1)  # line and column of the step in its file
    for_each: Condition | None = None  # a for_each given as an expression (a list literal is on the model)
    complete_when: Condition | None = None
    reviewed: bool = False  # an approval `reviews` it: its claims load the feedback given on its output
    # Its error boundary (on_error), in order: (error type, or None for any error; the handler step).
    error_routes: list[tuple[str | None, str]] = field(default_factory=list)
    error_targets: frozenset[str] = frozenset()  # the handlers among its children (taken only by an error)

    def error_handler(self, error_type: str) -> str | None:
        """The step an error of this type goes to (the first entry that matches), or None: it fails the instance."""
        return next((target for wanted, target in self.error_routes if wanted is None or wanted == error_type), None)

    @property
    def id(self) -> str:
        return str(self.model.id)

    @property
    def type(self) -> str:
        return str(self.model.type)

    @functools.cached_property
    def evaluates(self) -> bool:
        """Whether running the step evaluates user expressions: a condition, a route condition or a
        template with {{ }} parts (what the worker renders off the event loop, under the limits)."""
        templates = [*self.templates.values(), *([self.message] if self.message is not None else [])]
        return self.condition is not None or any(c is not None for c in self.route_conditions) \
            or any(not t.static for t in templates) or self.for_each is not None or self.complete_when is not None

    @functools.cached_property
    def references(self) -> References:
        """Union of what this step's templates and condition read (to load only that)."""
        parts = [t.refs for t in self.templates.values()]
        parts += [c.refs for c in self.route_conditions if c is not None]
        if self.message is not None:
            parts.append(self.message.refs)
        for expression in (self.condition, self.for_each, self.complete_when):
            if expression is not None:
                parts.append(expression.refs)
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

    @functools.cached_property
    def has_budgets(self) -> bool:
        """The process or one of its steps has a budget (checked before each agent task starts)."""
        return self.process.budget is not None or any(
            getattr(step.model, "budget", None) is not None for step in self.steps.values())

    @functools.cached_property
    def has_loops(self) -> bool:
        return any(step.loops for step in self.steps.values())

    @functools.cached_property
    def loop_bodies(self) -> dict[str, frozenset[str]]:
        """For each step, the steps that share a loop body with it (they may run again together)."""
        return loop_peers(self.steps)

    @property
    def name(self) -> str:
        return self.process.name

    @classmethod
    def unloadable(cls, name: str) -> CompiledDefinition:
        """A stand-in for a stored definition this flowdb cannot compile: no steps and no output
        actions, which is all the engine needs to fail the steps claimed from it."""
        return cls(Process.model_construct(name=name, steps=[]), "", "", {}, [], [], [])

    def roots(self) -> list[str]:
        return [sid for sid, step in self.steps.items() if not step.parents]

    def parsed_json(self) -> dict[str, Any]:
        return self.process.model_dump(mode="json", exclude_none=True)


def loop_peers(steps: dict[str, CompiledStep]) -> dict[str, frozenset[str]]:
    """For each step in a loop body, every step of the bodies it is in."""
    together: dict[str, set[str]] = {}
    for step in steps.values():
        for loop in step.loops.values():
            for member in loop.body:
                together.setdefault(member, set()).update(loop.body)
    return {sid: frozenset(peers) for sid, peers in together.items()}


def load_definition_file(path: str | FsPath) -> CompiledDefinition:
    """Read and check a definition file, as `flowdb validate` and `deploy` do: a step of a type this
    flowdb cannot run yet is one more problem, reported with the others."""
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
    return parse_definition(text, str(path), runnable=True)


def parse_definition(text: str, filename: str = "<definition>", *, runnable: bool = False) -> CompiledDefinition:
    """Check a definition's text completely; raise DefinitionError listing every problem. With
    `runnable`, a step of a type this flowdb cannot run yet is a problem too."""
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
    _check_step_count(data, locator)
    problems: list[Located] = []
    data, unreadable = _merge_config(data, locator, problems)
    valid = _validate(data, unreadable, locator, problems)
    if valid is None:
        raise DefinitionError(sorted_problems(problems))
    steps, edges, on_success, on_failure = _compile(valid, locator, problems)
    if runnable:
        from flowdb.steptypes.registry import STEP_TYPES  # the types import this module

        problems += STEP_TYPES.unrunnable(filename, steps.values())
    if problems:
        raise DefinitionError(sorted_problems(problems))
    canonical = dict(data["process"])
    canonical.pop("version", None)
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()
    return CompiledDefinition(valid.process, text, digest, steps, edges, on_success, on_failure, filename)


def _check_step_count(data: dict[str, Any], locator: Locator) -> None:
    """Refuse more than MAX_STEPS steps before looking at any of them."""
    process = data["process"]
    steps = process.get("steps") if isinstance(process, dict) else None
    if isinstance(steps, list) and len(steps) > MAX_STEPS:
        raise DefinitionError([locator.at(("process", "steps"), f"the process has {len(steps)} steps, more than "
                                          f"the limit of {MAX_STEPS}; split it into smaller processes")])


def _merge_config(data: dict[str, Any], locator: Locator, problems: list[Located]) -> tuple[dict[str, Any], set[int]]:
    """Move each step's `config:` fields onto the step; refuse a field given in both places. Also the
    steps whose `config:` is not a mapping, by index: their fields are unknown, so their model is not checked."""
    process = data.get("process")
    if not isinstance(process, dict) or not isinstance(process.get("steps"), list):
        return data, set()
    unreadable: set[int] = set()
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
            unreadable.add(index)
            steps.append(step)
            continue
        merged = {k: v for k, v in step.items() if k != "config"}
        for key, value in config.items():
            if key in COMMON_FIELDS:
                problems.append(locator.at((*base, "config", key),
                                           f"{key!r} belongs on the step itself, not under 'config:'"))
                if key not in merged and key != "config":  # read it where it is, to check the rest of the step
                    merged[key] = value
                    locator.moved[(*base, key)] = (*base, "config", key)
            elif key in merged:
                problems.append(locator.at((*base, "config", key), f"{key!r} is given both on the step (line "
                                           f"{locator.line_of((*base, key))}) and under 'config:'; keep one"))
            else:
                merged[key] = value
                locator.moved[(*base, key)] = (*base, "config", key)
        steps.append(merged)
    return {**data, "process": {**process, "steps": steps}}, unreadable


_ACTION_KINDS = ("on_success", "on_failure")


@dataclass(frozen=True)
class _Validated:
    """The parts of a definition that passed their models, and what is known of the others: enough to
    check the rest without reporting a failed part again (say, as an unknown step or input)."""

    process: Process  # without the parts that failed
    step_index: list[int]  # where each of process.steps stands in the file's list of steps
    action_index: dict[str, list[int]]  # the same for the output actions, by kind
    failed_steps: dict[int, str] = field(default_factory=dict)  # the id of each failed step, where it is readable
    failed_routes: frozenset[str] | None = frozenset()  # the steps failed steps may route to; None: any
    failed_inputs: frozenset[str] | None = frozenset()  # inputs that failed their model; None: all of them

    @classmethod
    def whole(cls, process: Process) -> _Validated:
        return cls(process, list(range(len(process.steps))),
                   {kind: list(range(len(getattr(process.output, kind)))) for kind in _ACTION_KINDS})


def _validate(data: dict[str, Any], unreadable: set[int], locator: Locator,
              problems: list[Located]) -> _Validated | None:
    """Validate the document; when parts of it fail, report them and validate the rest without them
    (None when nothing can be checked further: the process or its list of steps is unreadable)."""
    try:
        document = Document.model_validate(data)
    except ValidationError as exc:
        problems += locator.pydantic(exc, data, unreadable)
        return _without_failed(data, failed_paths(exc), unreadable)
    if unreadable:
        return _without_failed(data, [], unreadable)
    return _Validated.whole(document.process)


def _without_failed(data: dict[str, Any], failed_at: list[Path], bad_steps: set[int]) -> _Validated | None:
    """The document validated again without the parts at `failed_at` and the steps `bad_steps`."""
    process = data["process"]
    if not isinstance(process, dict) or not isinstance(process.get("steps"), list):
        return None
    bad_steps = set(bad_steps)
    bad_actions: dict[str, set[int]] = {kind: set() for kind in _ACTION_KINDS}
    bad_inputs: set[str] | None = set()
    dropped: set[str] = set()  # process fields left out whole
    for loc in failed_at:
        if not loc or loc == ("process",):
            return None
        if loc[0] != "process":
            continue  # a top-level field besides `process`: left out below
        name = loc[1]
        if name == "steps":
            if len(loc) < 3 or not isinstance(loc[2], int):
                return None
            bad_steps.add(loc[2])
        elif name == "inputs" and len(loc) >= 3 and bad_inputs is not None:
            bad_inputs.add(str(loc[2]))
        elif name == "inputs":
            bad_inputs = None
            dropped.add(name)
        elif name == "output" and len(loc) >= 4 and loc[2] in bad_actions and isinstance(loc[3], int):
            bad_actions[str(loc[2])].add(loc[3])
        else:
            dropped.add(str(name))
    raw_steps: list[Any] = process["steps"]
    step_index = [i for i in range(len(raw_steps)) if i not in bad_steps]
    pruned = {key: value for key, value in process.items() if key not in dropped}
    pruned["steps"] = [raw_steps[i] for i in step_index] or [{"id": "x", "type": "end"}]  # taken out below
    pruned.setdefault("name", "x")  # any valid name: no check reads it
    if bad_inputs:
        pruned["inputs"] = {key: value for key, value in process["inputs"].items() if str(key) not in bad_inputs}
    action_index: dict[str, list[int]] = {}
    if "output" not in dropped and isinstance(process.get("output"), dict):
        output = dict(process["output"])
        for kind in _ACTION_KINDS:
            actions = output.get(kind)
            if isinstance(actions, list):
                action_index[kind] = [i for i in range(len(actions)) if i not in bad_actions[kind]]
                output[kind] = [actions[i] for i in action_index[kind]]
        pruned["output"] = output
    try:
        validated = Document.model_validate({"process": pruned}).process
    except ValidationError:
        return None  # a problem between parts that each passed: the problems above say enough
    if not step_index:
        validated = validated.model_copy(update={"steps": []})
    action_index = {kind: action_index.get(kind, []) for kind in _ACTION_KINDS}
    failed_steps: dict[int, str] = {}
    routes: set[str] | None = set()
    for index in sorted(bad_steps):
        step = raw_steps[index]
        if not isinstance(step, dict):
            continue
        sid = step.get("id")
        if isinstance(sid, str) and sid:
            failed_steps[index] = sid
        routes = _may_route_to(step, routes)
    return _Validated(validated, step_index, action_index, failed_steps,
                      None if routes is None else frozenset(routes),
                      None if bad_inputs is None else frozenset(bad_inputs))


def _may_route_to(step: dict[str, Any], targets: set[str] | None) -> set[str] | None:
    """`targets` and where a step that failed its model routes to (None: it cannot be read)."""
    if targets is None or "routes" not in step:
        return targets
    routes = step["routes"]
    if not isinstance(routes, list):
        return None
    for route in routes:
        target = route.get("next") if isinstance(route, dict) else None
        if not isinstance(target, str):
            return None
        targets.add(target)
    return targets


class _Suggestions:
    """"Did you mean ...?" for names among the steps, within a budget of names compared per definition:
    difflib takes about 10 µs a name, so 10,000 misspelt references among 10,000 steps would take
    many minutes. Past the budget a problem is reported without a suggestion."""

    def __init__(self) -> None:
        self.budget = _SUGGEST_BUDGET

    def __call__(self, name: str, known: Collection[str]) -> str:
        if len(known) > self.budget:
            return ""
        self.budget -= len(known)
        return suggest(name, known)


def _listed(names: Collection[str]) -> str:
    """Names for a message: all of them, or the first few and how many more."""
    shown_names = ", ".join(itertools.islice(names, _LISTED))
    return shown_names if len(names) <= _LISTED else f"{shown_names}, ... ({len(names) - _LISTED} more)"


def _compile(
    valid: _Validated, locator: Locator, problems: list[Located]
) -> tuple[dict[str, CompiledStep], list[Edge], list[tuple[Action, Template]], list[tuple[Action, Template]]]:
    process = valid.process
    suggestions = _Suggestions()
    steps, step_path, known = _collect_steps(valid, locator, problems)
    edges: list[Edge] = []
    hidden: set[str] = set()  # steps with a parent the graph lacks: a failed or unknown step
    exits: set[str] = set()  # gateways with a route the graph lacks
    if valid.failed_routes is None:
        hidden.update(steps)
    else:
        hidden.update(valid.failed_routes & steps.keys())
    for sid, step in steps.items():
        path = step_path[sid]
        seen: set[str] = set()
        for i, parent in enumerate(step.model.depends_on):
            where = (*path, "depends_on", i)
            if parent == sid:
                problems.append(locator.value(where, f"step {sid!r} depends on itself; remove {sid!r} "
                                              "from its depends_on"))
            elif parent not in known:
                problems.append(locator.value(where, f"step {sid!r} depends on unknown step {parent!r}"
                                              f"{suggestions(parent, known)}; known steps: {_listed(known)}"))
                hidden.add(sid)
            elif parent in seen:
                problems.append(locator.value(where, f"step {sid!r} lists {parent!r} twice in depends_on"))
            else:
                seen.add(parent)
                if parent in steps:
                    edges.append(Edge(parent, sid, "dependency"))
                else:
                    hidden.add(sid)
        if isinstance(step.model, Gateway) and not _gateway_edges(sid, step.model, path, steps, known, edges,
                                                                   suggestions, locator, problems):
            exits.add(sid)
        if step.model.on_error is not None and not _error_edges(sid, step, path, steps, known, edges, suggestions,
                                                                 locator, problems):
            hidden.add(sid)
    edges = _without_doubles(edges, step_path, steps, locator, problems)
    _check_handlers(edges, steps, step_path, locator, problems)
    for edge in edges:
        steps[edge.to_step].parents.append(edge.from_step)
        steps[edge.from_step].children.append(edge.to_step)
    # The steps whose ancestors (and loops) the graph may not show whole: whether they run after what they
    # read is not checked.
    unsure = _reach(steps, hidden, lambda step: step.children)

    order: _Precedence | None = None
    cycle, loop_backs = _find_cycle(steps, edges)
    if cycle:
        problems.append(_cycle_problem(cycle, step_path, steps, locator))
        # Which routes loop back is not settled: a route's target may count a parent too many.
        hidden.update(edge.to_step for edge in edges if edge.kind == "route")
    else:
        edges = _loops(steps, edges, loop_backs, step_path, locator, problems, unsure | exits)
        order = _Precedence(steps)
        _check_boundaries_in_loops(steps, step_path, locator, problems)
    handlers = {edge.to_step for edge in edges if edge.kind == "error"}
    for sid, step in steps.items():
        step.join = JoinRule.of(step.model)
        if sid in handlers:  # it starts at the first error routed to it; a step that did not fail passes it by
            step.join = JoinRule(1, False, False)
        elif sid not in hidden:
            _check_join(step, step_path[sid], locator, problems)

    scope = _Scope(process, steps, known, order, unsure, loop_peers(steps), valid.failed_inputs, suggestions,
                   locator, problems)
    for sid, step in steps.items():
        _compile_step(step, step_path[sid], scope)
    _check_agent_links(steps, step_path, known, locator, problems)

    for name, problem in check_defaults(process.inputs):
        problems.append(locator.value(("process", "inputs", name, "default"), problem))

    outputs = dataclasses.replace(scope, order=None)  # they run after every step

    def actions(kind: str) -> list[tuple[Action, Template]]:
        out = []
        for i, action in zip(valid.action_index[kind], getattr(process.output, kind), strict=True):
            where: Path = ("process", "output", kind, i, "message")
            template = _template(action.message, where, locator, problems)
            if template is not None:
                _check_refs(template.refs, where, None, outputs,
                            FAILURE_NAMES if kind == "on_failure" else frozenset())
                out.append((action, template))
        return out

    return steps, edges, actions("on_success"), actions("on_failure")


def _check_agent_links(steps: dict[str, CompiledStep], step_path: dict[str, Path], known: dict[str, Path],
                       locator: Locator, problems: list[Located]) -> None:
    """What ties agent tasks together: an approval's `reviews` names an agent task (which is then marked
    reviewed: its claims load feedback), a context restored is saved by some agent task."""
    agent_tasks = {sid for sid, step in steps.items() if isinstance(step.model, AgentTask)}
    saved = {step.model.context.save for step in steps.values()
             if isinstance(step.model, AgentTask) and step.model.context is not None and step.model.context.save}
    for sid, step in steps.items():
        model = step.model
        if isinstance(model, HumanApproval) and model.reviews is not None:
            where = (*step_path[sid], "reviews")
            if model.reviews in agent_tasks:
                steps[model.reviews].reviewed = True
            elif model.reviews in steps:
                problems.append(locator.value(where, f"approval {sid!r} reviews step {model.reviews!r}, which is a "
                                              f"{steps[model.reviews].type}; reviews names an agent task, whose "
                                              "agent is given the approvers' feedback when it runs again"))
            elif model.reviews not in known:
                problems.append(locator.value(where, f"approval {sid!r} reviews unknown step {model.reviews!r}"
                                              f"{suggest(model.reviews, agent_tasks)}"))
        if isinstance(model, AgentTask) and model.context is not None and model.context.restore is not None \
                and model.context.restore not in saved:
            problems.append(locator.value((*step_path[sid], "context", "restore"),
                                          f"step {sid!r} restores context {model.context.restore!r}, which no step "
                                          f"saves{suggest(model.context.restore, saved)}; "
                                          + (f"saved contexts: {', '.join(sorted(saved))}" if saved
                                             else "save one with context: {save: NAME} on an earlier agent task")))


def _collect_steps(valid: _Validated, locator: Locator, problems: list[Located]
                   ) -> tuple[dict[str, CompiledStep], dict[str, Path], dict[str, Path]]:
    """The steps that passed their models, where each is, and every step id read (those of the steps that
    failed too), in file order; a second step with an id is refused."""
    models = dict(zip(valid.step_index, valid.process.steps, strict=True))
    indices = sorted([*models, *valid.failed_steps]) if valid.failed_steps else valid.step_index
    steps: dict[str, CompiledStep] = {}
    step_path: dict[str, Path] = {}
    known: dict[str, Path] = {}
    for index in indices:
        path: Path = ("process", "steps", index)
        model = models.get(index)
        sid = valid.failed_steps[index] if model is None else model.id
        if sid in known:
            first = locator.line_of(known[sid])
            problems.append(locator.value((*path, "id"), f"duplicate step id {sid!r} (first used at line "
                                          f"{first}); give each step its own id"))
            continue
        known[sid] = path
        if model is not None:
            step_path[sid] = path
            at = locator.at(path, "")
            steps[sid] = CompiledStep(model, position=(at.line, at.col))
    return steps, step_path, known


def _gateway_edges(sid: str, model: Gateway, path: Path, steps: dict[str, CompiledStep], known: dict[str, Path],
                   edges: list[Edge], suggestions: _Suggestions, locator: Locator, problems: list[Located]) -> bool:
    """Add a gateway's routes to `edges`; whether each of them is in the graph (none leads to a step that
    failed its model, or to an unknown one)."""
    whole = True
    targets: set[str] = set()
    defaults = 0
    for i, route in enumerate(model.routes):
        where = (*path, "routes", i, "next")
        if model.gateway_type == "parallel" and (route.condition is not None or route.default):
            field_name = "condition" if route.condition is not None else "default"
            problems.append(locator.at((*path, "routes", i, field_name),
                                       f"gateway {sid!r} is parallel: it takes every route, so a route has no "
                                       f"{field_name}; use gateway_type: inclusive to choose routes by condition"))
        elif model.gateway_type != "parallel" and route.condition is None and not route.default:
            problems.append(locator.at((*path, "routes", i), f"route {i + 1} of {model.gateway_type} gateway "
                                       f"{sid!r} needs a condition or `default: true`"))
        if route.default:
            defaults += 1
            if defaults == 2:
                problems.append(locator.at((*path, "routes", i, "default"),
                                           f"gateway {sid!r} has more than one default route; keep one"))
        if route.next == sid:
            problems.append(locator.value(where, f"gateway {sid!r} routes to itself"))
        elif route.next not in known:
            problems.append(locator.value(where, f"gateway {sid!r} routes to unknown step {route.next!r}"
                                          f"{suggestions(route.next, known)}; known steps: {_listed(known)}"))
            whole = False
        elif route.next in targets:
            problems.append(locator.value(where, f"gateway {sid!r} routes to {route.next!r} twice"))
        else:
            targets.add(route.next)
            if route.next in steps:
                edges.append(Edge(sid, route.next, "route"))
            else:
                whole = False
    return whole


def _error_edges(sid: str, step: CompiledStep, path: Path, steps: dict[str, CompiledStep], known: dict[str, Path],
                 edges: list[Edge], suggestions: _Suggestions, locator: Locator, problems: list[Located]) -> bool:
    """Add a step's error boundary (on_error) to `edges` and to the step; whether each handler is in the graph."""
    on_error = step.model.on_error
    entries = [(None, on_error, (*path, "on_error"))] if isinstance(on_error, str) else [
        (route.error, route.next, (*path, "on_error", i, "next")) for i, route in enumerate(on_error)]
    whole = True
    linked: set[str] = set()
    for error, target, where in entries:
        if target == sid:
            problems.append(locator.value(where, f"step {sid!r} sends its errors to itself; name another step "
                                          "to handle them (or give it a retry policy)"))
        elif target not in known:
            problems.append(locator.value(where, f"step {sid!r} sends its errors to unknown step {target!r}"
                                          f"{suggestions(target, known)}; known steps: {_listed(known)}"))
            whole = False
        elif target not in steps:
            whole = False
        else:
            step.error_routes.append((error, target))
            if target not in linked:
                linked.add(target)
                edges.append(Edge(sid, target, "error"))
    step.error_targets = frozenset(linked)
    return whole


def _check_handlers(edges: list[Edge], steps: dict[str, CompiledStep], step_path: dict[str, Path],
                    locator: Locator, problems: list[Located]) -> None:
    """A step that handles errors starts only when an error is routed to it: nothing else may lead to it."""
    handled_by: dict[str, list[str]] = {}
    for edge in edges:
        if edge.kind == "error":
            handled_by.setdefault(edge.to_step, []).append(edge.from_step)
    for edge in edges:
        if edge.to_step in handled_by and edge.kind != "error":
            sources = ", ".join(map(repr, handled_by[edge.to_step]))
            path = step_path[edge.to_step]
            if edge.kind == "dependency":
                problems.append(locator.at((*path, "depends_on"), f"step {edge.to_step!r} handles the errors of "
                                           f"{sources} (on_error): it starts from an error, so it has no depends_on"))
            else:
                problems.append(locator.at(step_path[edge.from_step], f"gateway {edge.from_step!r} routes to "
                                           f"{edge.to_step!r}, which handles the errors of {sources} (on_error): "
                                           "a handler starts only from an error; route to another step"))


def _check_boundaries_in_loops(steps: dict[str, CompiledStep], step_path: dict[str, Path], locator: Locator,
                               problems: list[Located]) -> None:
    """An error boundary on a step of a loop body must send its errors into that body (its handler then
    runs again with each round); a handler outside the body would take the error of the first round only."""
    peers = loop_peers(steps)
    for sid, step in steps.items():
        outside = [handler for _, handler in step.error_routes if sid in peers and handler not in peers[sid]]
        if outside:
            problems.append(locator.at((*step_path[sid], "on_error"), f"step {sid!r} runs in a loop, and its "
                                       f"errors go to {', '.join(map(repr, sorted(set(outside))))} outside it: an "
                                       "error boundary inside a loop is not supported yet; give the step a retry "
                                       "policy, or let its failure end the loop"))


def _without_doubles(edges: list[Edge], step_path: dict[str, Path], steps: dict[str, CompiledStep],
                     locator: Locator, problems: list[Located]) -> list[Edge]:
    """A step that depends on a gateway and is one of its routes too: refused (the route decides)."""
    routes = {(e.from_step, e.to_step) for e in edges if e.kind == "route"}
    kept = []
    for edge in edges:
        if edge.kind == "dependency" and (edge.from_step, edge.to_step) in routes:
            model = steps[edge.to_step].model
            where = (*step_path[edge.to_step], "depends_on", model.depends_on.index(edge.from_step))
            problems.append(locator.value(where, f"step {edge.to_step!r} depends on gateway {edge.from_step!r} and "
                                          f"is one of its routes too; remove {edge.from_step!r} from its depends_on "
                                          "(a route's target waits for the gateway to choose it)"))
            continue
        kept.append(edge)
    return kept


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
    shown_steps = cycle
    if len(cycle) > 2 * _CYCLE_SHOWN + 1:  # a long cycle: its two ends, where it closes
        shown_steps = [*cycle[:_CYCLE_SHOWN], f"... ({len(cycle) - 2 * _CYCLE_SHOWN} more steps)",
                       *cycle[-_CYCLE_SHOWN:]]
    chain = " -> ".join([*shown_steps, first])
    return locator.value(where, f"steps form a cycle: {chain} (each runs after the one before it); "
                         "remove one of these dependencies")


@dataclass(frozen=True)
class _Scope:
    """What checking a step's templates needs."""

    process: Process
    steps: dict[str, CompiledStep]
    known: dict[str, Path]  # every step id, those of steps that failed their model too
    order: _Precedence | None  # None: not checked (what is checked runs after every step, or there is a cycle)
    unsure: set[str]  # steps whose ancestors the graph may not show whole: their order is not checked
    loop_peers: dict[str, frozenset[str]]  # steps sharing a loop body: each may read the others' last round
    failed_inputs: frozenset[str] | None  # inputs that failed their model (None: all): known, not checked
    suggestions: _Suggestions
    locator: Locator
    problems: list[Located]


def _compile_step(step: CompiledStep, path: Path, scope: _Scope) -> None:
    model = step.model
    sid = step.id
    locator, problems = scope.locator, scope.problems

    per_item = ITEM_NAMES if model.for_each is not None else frozenset()

    def text(name: str, value: str | None, where: Path) -> Template | None:
        if value is None:
            return None
        template = _template(value, where, locator, problems)
        if template is not None:
            _check_refs(template.refs, where, sid, scope, per_item)
        return template

    _compile_for_each(step, path, scope)

    if model.condition is not None:
        where = (*path, "condition")
        condition = _condition(model.condition, where, locator, problems)
        if condition is not None:
            _check_refs(condition.refs, where, sid, scope)
            step.condition = condition
    if isinstance(model, AgentTask):  # an agent task's message may quote the feedback on its earlier output
        template = _template(model.message, (*path, "message"), locator, problems)
        if template is not None:
            _check_refs(template.refs, (*path, "message"), sid, scope, per_item | FEEDBACK_NAMES)
        step.message = template
    if isinstance(model, Notification):
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
                    _check_refs(compiled.refs, where, sid, scope)
            step.route_conditions.append(compiled)
    from flowdb.steptypes.registry import STEP_TYPES  # the types import this module

    step_type = STEP_TYPES.get(model.type)
    for where, problem, at_value in step_type.check(model) if step_type is not None else ():
        problems.append(locator.value((*path, *where), problem) if at_value else locator.at((*path, *where), problem))


def _compile_for_each(step: CompiledStep, path: Path, scope: _Scope) -> None:
    """for_each (R7): an expression (or a list), complete_when, and the fields that need them."""
    model, sid = step.model, step.id
    locator, problems = scope.locator, scope.problems
    if isinstance(model.for_each, str):
        where = (*path, "for_each")
        expression = _condition(model.for_each, where, locator, problems)
        if expression is not None:
            _check_refs(expression.refs, where, sid, scope)
            step.for_each = expression
    if model.complete_when is not None:
        where = (*path, "complete_when")
        expression = _condition(model.complete_when, where, locator, problems)
        if expression is not None:
            _check_refs(expression.refs, where, sid, scope, GATHER_NAMES)
            step.complete_when = expression
    if model.for_each is not None and model.type in ("gateway", "end"):
        problems.append(locator.at((*path, "for_each"), f"step {sid!r} is a {model.type}, which runs once: it cannot "
                                   "have for_each; put for_each on the steps it leads to"))
    needs = {"max_parallel": model.max_parallel is not None, "complete_when": model.complete_when is not None}
    for name, given in needs.items():
        if given and model.for_each is None:
            problems.append(locator.at((*path, name), f"step {sid!r} has {name} but no for_each; {name} says how "
                                       "a for_each runs its items"))
    if model.cancel_remaining and model.complete_when is None:
        problems.append(locator.at((*path, "cancel_remaining"), f"step {sid!r} has cancel_remaining but no "
                                   "complete_when: its items are never cut short; add complete_when"))


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


def _check_refs(refs: References, where: Path, sid: str | None, scope: _Scope,
                extra: frozenset[str] = frozenset()) -> None:
    """Check what a template reads; `extra` names it may use besides inputs, steps and process."""
    process, steps, locator, problems = scope.process, scope.steps, scope.locator, scope.problems
    for root in sorted(refs.unknown_roots - extra):
        usable = ", ".join(sorted(ROOT_NAMES | extra))
        problems.append(locator.value(where, f"unknown name {root!r} in template"
                                      f"{suggest(root, ROOT_NAMES | extra)}; templates here can use {usable}"))
    failed_inputs = scope.failed_inputs  # known by name: not reported as unknown
    unknown_inputs = set() if failed_inputs is None else refs.inputs - process.inputs.keys() - failed_inputs
    for name in sorted(unknown_inputs):
        declared = _listed(sorted(process.inputs)) or "none are declared"
        problems.append(locator.value(where, f"template uses unknown input {name!r}"
                                      f"{suggest(name, process.inputs)} (declared inputs: {declared})"))
    for ref in sorted(refs.steps):
        if ref not in steps:
            if ref not in scope.known:
                problems.append(locator.value(where, f"template uses unknown step {ref!r}"
                                              f"{scope.suggestions(ref, scope.known)}"))
        elif ref == sid:
            problems.append(locator.value(where, f"step {sid!r} uses its own steps.{ref}, which has no value "
                                          "before the step has run; use an earlier step's output"))
        elif sid is not None and scope.order is not None and sid not in scope.unsure \
                and not scope.order.runs_before(ref, sid) \
                and ref not in scope.loop_peers.get(sid, ()):  # a loop's later step, from the round before
            problems.append(locator.value(where, f"step {sid!r} uses steps.{ref} but does not run after it; "
                                          f"add {ref!r} to its depends_on"))


class _Precedence:
    """Whether one step runs before another: is it an ancestor, through depends_on and routes?

    A step that comes later in a topological order is not; a parent is. Otherwise the step's ancestors
    are a bit set over the topological positions, built on first use from its parents' (iteratively).
    A 10,000-step chain whose every template reads the first step takes 6 MB of bit sets and well under
    a second; the per-step sets of names this replaces took O(n²) time and gigabytes.
    """

    def __init__(self, steps: dict[str, CompiledStep]) -> None:
        self.steps = steps
        self.position = {sid: i for i, sid in enumerate(_topological_order(steps))}
        self.parents: dict[str, frozenset[str]] = {}
        self.ancestors: dict[str, int] = {}

    def runs_before(self, ref: str, sid: str) -> bool:
        if self.position[ref] >= self.position[sid]:
            return False
        parents = self.parents.get(sid)
        if parents is None:
            parents = self.parents[sid] = frozenset(self.steps[sid].parents)
        return ref in parents or bool(self._ancestors(sid) >> self.position[ref] & 1)

    def _ancestors(self, sid: str) -> int:
        known = self.ancestors
        stack = [sid]
        while stack:
            top = stack[-1]
            if top in known:
                stack.pop()
                continue
            parents = self.steps[top].parents
            missing = [parent for parent in parents if parent not in known]
            if missing:
                stack.extend(missing)
                continue
            bits = 0
            for parent in parents:
                bits |= known[parent] | 1 << self.position[parent]
            known[top] = bits
            stack.pop()
        return known[sid]


def _topological_order(steps: dict[str, CompiledStep]) -> list[str]:
    """Every step after all of its parents (the graph has no cycle)."""
    waiting = {sid: len(step.parents) for sid, step in steps.items()}
    ready = [sid for sid, count in waiting.items() if count == 0]
    order: list[str] = []
    while ready:
        sid = ready.pop()
        order.append(sid)
        for child in steps[sid].children:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    return order


def _find_cycle(steps: dict[str, CompiledStep], edges: list[Edge]) -> tuple[list[str] | None, set[Edge]]:
    """The loop-backs (R1), and a cycle left without them (as its steps) if there is one.

    A depth-first walk from the entry steps (file order, explicit stack) meets each cycle at a back
    edge. A route there is a loop-back. When the edge closing the cycle is a depends_on, the walk
    entered the loop at a step other than its target (a step of the loop with a parent outside it):
    the last route on the cycle is then the loop-back, and the walk starts again without it. A cycle
    with no route at all is an error. The answer does not depend on the order of the steps."""
    routes = {(e.from_step, e.to_step) for e in edges if e.kind == "route"}
    back: set[Edge] = set()
    while True:
        cycle = _walk(steps, routes, back)
        if cycle is None:
            return None, back
        pairs = list(zip(cycle, [*cycle[1:], cycle[0]], strict=True))
        on_cycle = [pair for pair in pairs if pair in routes]
        if not on_cycle:
            return cycle, back
        back.add(Edge(*on_cycle[-1], "route"))


def _walk(steps: dict[str, CompiledStep], routes: set[tuple[str, str]], back: set[Edge]) -> list[str] | None:
    """One depth-first walk without the routes in `back`. The routes it meets as back edges are added
    to `back` and the walk goes on; it stops at the first back edge that is a depends_on, with that
    cycle, or at the end (None)."""
    skip = {(e.from_step, e.to_step) for e in back}
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(steps, white)
    entries = [sid for sid, step in steps.items() if not step.model.depends_on]
    for start in [*entries, *steps]:
        if color[start] != white:
            continue
        color[start] = grey
        trail = [start]  # the path being searched: grey steps
        next_child = [0]  # for each step of the trail, the index of the child to look at next
        while trail:
            node = trail[-1]
            children = steps[node].children
            i = next_child[-1]
            if i == len(children):
                color[node] = black
                trail.pop()
                next_child.pop()
                continue
            next_child[-1] = i + 1
            child = children[i]
            if (node, child) in skip:
                continue
            if color[child] == grey:
                if (node, child) not in routes:
                    return trail[trail.index(child):]
                back.add(Edge(node, child, "route"))
                skip.add((node, child))
            elif color[child] == white:
                color[child] = grey
                trail.append(child)
                next_child.append(0)
    return None


def _loops(steps: dict[str, CompiledStep], edges: list[Edge], loop_backs: set[Edge], step_path: dict[str, Path],
           locator: Locator, problems: list[Located], unsure: set[str]) -> list[Edge]:
    """Take the loop-backs out of the step graph (which is then acyclic) and give each its body; the
    edges with loop-backs marked as such. The gateways in `unsure` (the graph may not show all their
    ancestors or routes) are not checked."""
    if not loop_backs:
        return edges
    for edge in loop_backs:
        steps[edge.to_step].parents.remove(edge.from_step)
        steps[edge.from_step].children.remove(edge.to_step)
    order = {sid: i for i, sid in enumerate(_topological_order(steps))}
    for edge in sorted(loop_backs, key=lambda e: (order[e.from_step], e.to_step)):
        gateway, target = edge.from_step, edge.to_step
        after_target = _reach(steps, [target], lambda step: step.children)
        before_gateway = _reach(steps, [gateway], lambda step: step.parents)
        body = tuple(sorted(after_target & before_gateway, key=order.__getitem__))
        steps[gateway].loops[target] = Loop(gateway, target, body)
    for sid, step in steps.items():
        if sid in unsure:
            continue
        if step.loops and getattr(step.model, "gateway_type", None) == "parallel":
            problems.append(locator.at((*step_path[sid], "gateway_type"), f"parallel gateway {sid!r} routes back to "
                                       f"{', '.join(repr(t) for t in step.loops)}: it takes every route, so the loop "
                                       "would run until max_visits; use an exclusive gateway with a condition"))
        elif step.loops and not step.children:
            where = (*step_path[sid], "routes")
            problems.append(locator.at(where, f"gateway {sid!r} only routes back to "
                                       f"{', '.join(repr(t) for t in step.loops)}: the loop has no exit; add a "
                                       "route (or a default route) to a step after the loop"))
    return [Edge(e.from_step, e.to_step, "loop") if e in loop_backs else e for e in edges]


def _reach(steps: dict[str, CompiledStep], starts: Collection[str], next_of: Any) -> set[str]:
    """The steps reached from `starts` (them included) through `next_of`."""
    seen = set(starts)
    stack = list(seen)
    while stack:
        for other in next_of(steps[stack.pop()]):
            if other not in seen:
                seen.add(other)
                stack.append(other)
    return seen


def _check_join(step: CompiledStep, path: Path, locator: Locator, problems: list[Located]) -> None:
    model = step.model
    parents = len(step.parents)
    if model.join != "all" and parents < 2:
        problems.append(locator.at((*path, "join"), f"step {step.id!r} has {parents} parent(s): a join needs two "
                                   "or more; remove `join`"))
    elif not isinstance(model.join, str) and step.join.needed > parents:
        problems.append(locator.value((*path, "join", "at_least"), f"step {step.id!r} joins at least "
                                      f"{step.join.needed} of its {parents} parents; lower at_least"))
    if model.cancel_others and model.join == "all":
        problems.append(locator.at((*path, "cancel_others"), f"step {step.id!r} waits for all its parents "
                                   "(join: all), so there are none left to cancel; use join: any or "
                                   "join: {at_least: N}"))
