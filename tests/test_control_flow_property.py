"""Control flow as a property: random acyclic definitions (conditions, gateways, join modes) end with the
step statuses a small reference model of the rules predicts, on both databases.

The reference (`expected_statuses`) is written from DESIGN.md "Control flow", not from flowdb/engine/settle.py:
with agents that always complete and no `cancel_others`, a step's final status does not depend on timing,
so it evaluates the steps once, in topological order.
- An edge parent -> child is taken when the parent completed and either it is not a gateway, or the child
  is one of the routes it chose, or the child reaches it through depends_on; otherwise it is skipped.
- A step with parents runs once `needed` of them (1 for `all` and `any`, N for `at_least: N`) came through
  taken edges; otherwise it is skipped (dead-path elimination). A step without parents runs at the start.
- A step that runs is skipped by its own false `condition`, else it completes (a gateway then chooses:
  exclusive the first route whose condition holds, else the default; inclusive every route whose condition
  holds, the default only when none does; parallel every route).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from flowdb.db.tables import process_instances, step_instances
from flowdb.definitions import parse_definition

from conftest import Database
from helpers import drive, instance, start, steps, work

AGENTS = Path(__file__).resolve().parent / "agents_control_flow.yaml"
INPUTS = 6  # boolean inputs c0..c5
MAX_STEPS = 10
MAX_ROUTES = 3
MAX_DEPENDS_ON = 3
EXAMPLES = 120  # per database; an example is 1-3 definitions, each started with 1-4 input sets, worked at once

GATEWAY_TYPES = ("exclusive", "inclusive", "parallel")


# -- the generated definitions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Cond:
    """`{{ inputs.cK }}`, or `{{ not inputs.cK }}` when negated."""

    input: int
    negated: bool

    def holds(self, inputs: dict[str, bool]) -> bool:
        return inputs[f"c{self.input}"] != self.negated

    def text(self) -> str:
        return "{{ " + ("not " if self.negated else "") + f"inputs.c{self.input}" + " }}"


@dataclass(frozen=True)
class Route:
    target: int  # index of a later step
    condition: Cond | None  # None on a default route and on every route of a parallel gateway
    default: bool = False


@dataclass(frozen=True)
class StepSpec:
    index: int  # position in generation order, which is topological (parents come earlier)
    gateway_type: str | None  # None: an agent_task
    routes: tuple[Route, ...]
    depends_on: tuple[int, ...]
    join: str | int | None  # None: not written (all); "all" | "any"; an int: at_least
    condition: Cond | None

    @property
    def id(self) -> str:
        return f"s{self.index}"


@dataclass(frozen=True)
class Flow:
    steps: tuple[StepSpec, ...]
    file_order: tuple[int, ...]  # the order the steps are written in (any order: the graph decides)

    def parents(self, index: int) -> list[int]:
        """depends_on, and every gateway that routes to the step."""
        routed_from = [s.index for s in self.steps if any(r.target == index for r in s.routes)]
        return [*self.steps[index].depends_on, *routed_from]


conditions = st.builds(Cond, st.integers(0, INPUTS - 1), st.booleans())


@st.composite
def flows(draw: st.DrawFn) -> Flow:
    count = draw(st.integers(2, MAX_STEPS))
    # Gateways need a later step to route to; tasks shrink first.
    kinds: list[str | None] = [draw(st.sampled_from([None, *GATEWAY_TYPES])) if i < count - 1 else None
                               for i in range(count)]
    routes: dict[int, tuple[Route, ...]] = {}
    for i, kind in enumerate(kinds):
        if kind is None:
            continue
        targets = draw(st.lists(st.integers(i + 1, count - 1), min_size=1,
                                max_size=min(MAX_ROUTES, count - 1 - i), unique=True))
        if kind == "parallel":
            routes[i] = tuple(Route(t, None) for t in targets)
            continue
        default_at = draw(st.none() | st.integers(0, len(targets) - 1))  # anywhere in the list, or none
        routes[i] = tuple(Route(t, None, True) if k == default_at else Route(t, draw(conditions))
                          for k, t in enumerate(targets))
    specs = []
    for i, kind in enumerate(kinds):
        # A step may not depend on a gateway that routes to it.
        routed_from = [g for g, rs in routes.items() if any(r.target == i for r in rs)]
        candidates = [p for p in range(i) if p not in routed_from]
        depends_on = tuple(draw(st.lists(st.sampled_from(candidates), max_size=MAX_DEPENDS_ON, unique=True))) \
            if candidates else ()
        parents = len(depends_on) + len(routed_from)
        join: str | int | None = None
        if parents >= 2:
            join = draw(st.sampled_from([None, "all", "any"]) | st.integers(1, parents))
        condition = draw(st.none() | conditions)
        specs.append(StepSpec(i, kind, routes.get(i, ()), depends_on, join, condition))
    order = tuple(draw(st.permutations(range(count))))
    return Flow(tuple(specs), order)


input_sets = st.lists(st.tuples(*[st.booleans()] * INPUTS).map(lambda bits: {f"c{k}": b for k, b in enumerate(bits)}),
                      min_size=1, max_size=4)


def render(flow: Flow, name: str = "property-flow") -> str:
    """The definition as YAML text, steps in the flow's file order."""
    written = []
    for spec in (flow.steps[i] for i in flow.file_order):
        step: dict[str, Any] = {"id": spec.id}
        if spec.gateway_type is None:
            step.update(type="agent_task", agent="noop", message=spec.id)
        else:
            step.update(type="gateway", gateway_type=spec.gateway_type)
        if spec.depends_on:
            step["depends_on"] = [f"s{p}" for p in spec.depends_on]
        if spec.join is not None:
            step["join"] = spec.join if isinstance(spec.join, str) else {"at_least": spec.join}
        if spec.condition is not None:
            step["condition"] = spec.condition.text()
        if spec.routes:
            step["routes"] = [{"default": True, "next": f"s{r.target}"} if r.default else
                              {"next": f"s{r.target}"} if r.condition is None else
                              {"condition": r.condition.text(), "next": f"s{r.target}"} for r in spec.routes]
        written.append(step)
    process = {"name": name, "inputs": {f"c{k}": {"type": "boolean"} for k in range(INPUTS)}, "steps": written}
    return yaml.safe_dump({"process": process}, sort_keys=False, width=1000)


# -- the reference model -------------------------------------------------------------------------------

def chosen_routes(spec: StepSpec, inputs: dict[str, bool]) -> set[int]:
    if spec.gateway_type == "parallel":
        return {r.target for r in spec.routes}
    holding = [r.target for r in spec.routes if r.condition is not None and r.condition.holds(inputs)]
    if spec.gateway_type == "exclusive":
        holding = holding[:1]
    defaults = [r.target for r in spec.routes if r.default]
    return set(holding or defaults)


def expected_statuses(flow: Flow, inputs: dict[str, bool]) -> dict[str, str]:
    status: dict[int, str] = {}
    chosen: dict[int, set[int]] = {}  # each completed gateway's chosen route targets
    for spec in flow.steps:  # generation order is topological
        runs = True
        parents = flow.parents(spec.index)
        if parents:
            taken = [p for p in parents if status[p] == "completed" and (
                spec.index not in {r.target for r in flow.steps[p].routes} or spec.index in chosen[p])]
            runs = len(taken) >= (spec.join if isinstance(spec.join, int) else 1)
        if runs and (spec.condition is None or spec.condition.holds(inputs)):
            status[spec.index] = "completed"
            if spec.gateway_type is not None:
                chosen[spec.index] = chosen_routes(spec, inputs)
        else:
            status[spec.index] = "skipped"
    return {f"s{i}": s for i, s in status.items()}


# -- running it ----------------------------------------------------------------------------------------

Case = tuple[Flow, list[dict[str, bool]]]  # a definition and the inputs of each instance started from it
cases = st.lists(st.tuples(flows(), input_sets), min_size=1, max_size=3)


def check(db: Database, flow_cases: list[Case]) -> None:
    """Deploy each flow, start one instance per input set, work them all in one go, and compare each
    instance's step statuses with the reference."""
    started = []
    for n, (flow, input_list) in enumerate(flow_cases):
        text = render(flow, f"property-flow-{n}")
        parse_definition(text)  # every generated definition is valid (raises DefinitionError otherwise)
        started += [(flow, text, inputs, iid) for inputs in input_list for iid in start(db.engine, text, inputs)]
    # Until these instances end (not every running one: a stuck instance of a failed example would hold
    # up each example Hypothesis tries while shrinking).
    ids = [iid for _, _, _, iid in started]
    S, P = step_instances, process_instances

    def ended() -> bool:
        with db.engine.connect() as conn:
            return conn.execute(select(P.c.id).where(P.c.id.in_(ids), P.c.status == "running").limit(1)).first() is None

    drive(db.engine, ended, AGENTS)
    with db.engine.connect() as conn:  # no loops here: one row per step, whatever the joins
        rows: dict[int, int] = dict(conn.execute(
            select(S.c.instance_id, func.count()).where(S.c.instance_id.in_(ids)).group_by(S.c.instance_id)).all())
    for flow, text, inputs, iid in started:
        got = {sid: row.status for sid, row in steps(db.engine, iid).items()}
        assert got == expected_statuses(flow, inputs), f"inputs {inputs}\n{text}"
        assert instance(db.engine, iid).status == "completed", text
        assert rows[iid] == len(flow.steps), text


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(flow_cases=cases)
def test_random_acyclic_flows_match_the_reference(db: Database, flow_cases: list[Case]) -> None:
    check(db, flow_cases)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(flow=flows())
def test_generated_definitions_are_valid(flow: Flow) -> None:
    """The generator against the validator alone (no database: cheap, so many more shapes)."""
    parse_definition(render(flow))


# -- regression examples -------------------------------------------------------------------------------

# The property found no disagreement with the engine. These pin, written out, the rules whose breaking (tried
# as mutations of the reference) the property caught: an inclusive gateway takes its default only when no
# condition holds (wherever the default is listed), a gateway's depends_on child runs whichever routes it
# chose, a route not taken does not count toward `at_least`, and `join: all` needs one completed parent
# (once every parent settled), not all of them.

INCLUSIVE_DEFAULT_FIRST = """
process:
  name: inclusive-default-first
  inputs: {c0: {type: boolean}, c1: {type: boolean}}
  steps:
    - {id: s0, type: agent_task, agent: noop, message: s0}
    - id: g
      type: gateway
      gateway_type: inclusive
      depends_on: [s0]
      routes:
        - {default: true, next: d}
        - {condition: "{{ inputs.c0 }}", next: a}
        - {condition: "{{ not inputs.c1 }}", next: b}
    - {id: a, type: agent_task, agent: noop, message: a}
    - {id: b, type: agent_task, agent: noop, message: b}
    - {id: d, type: agent_task, agent: noop, message: d}
    - {id: after, type: agent_task, agent: noop, message: after, depends_on: [g]}
    - {id: two, type: agent_task, agent: noop, message: two, depends_on: [a, b, d], join: {at_least: 2}}
"""


@pytest.mark.parametrize(("c0", "c1", "taken", "two"), [
    (False, True, "d", "skipped"),  # no condition holds: the default, listed first, is taken alone
    (True, True, "a", "skipped"),  # one route: at_least 2 can no longer be met
    (True, False, "ab", "completed"),  # two routes and not the default
    (False, False, "b", "skipped"),
])
def test_inclusive_default_first_and_at_least(db: Database, c0: bool, c1: bool, taken: str, two: str) -> None:
    [iid] = start(db.engine, INCLUSIVE_DEFAULT_FIRST, {"c0": c0, "c1": c1})
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    expected = {"s0": "completed", "g": "completed", "after": "completed", "two": two}
    expected |= {target: "completed" if target in taken else "skipped" for target in "abd"}
    assert {sid: row.status for sid, row in steps(db.engine, iid).items()} == expected


SKIPPED_GATEWAY = """
process:
  name: skipped-gateway
  inputs: {c0: {type: boolean}, c1: {type: boolean}}
  steps:
    - {id: root, type: agent_task, agent: noop, message: root}
    - id: g
      type: gateway
      gateway_type: exclusive
      condition: "{{ inputs.c0 }}"
      routes:
        - {condition: "{{ inputs.c1 }}", next: a}
        - {default: true, next: b}
    - {id: a, type: agent_task, agent: noop, message: a}
    - {id: b, type: agent_task, agent: noop, message: b, depends_on: [root]}
    - {id: c, type: agent_task, agent: noop, message: c, depends_on: [g]}
    - {id: d, type: agent_task, agent: noop, message: d, depends_on: [a, c], join: any}
"""


@pytest.mark.parametrize(("c0", "c1", "expected"), [
    # The gateway's own condition is false: it is skipped, so are its route targets and its depends_on
    # child, except b, whose other parent completed (join: all needs one completion once all settled).
    (False, True, {"a": "skipped", "b": "completed", "c": "skipped", "d": "skipped", "g": "skipped"}),
    (True, True, {"a": "completed", "b": "completed", "c": "completed", "d": "completed", "g": "completed"}),
    (True, False, {"a": "skipped", "b": "completed", "c": "completed", "d": "completed", "g": "completed"}),
])
def test_skipped_gateway_and_a_route_target_with_parents_of_its_own(db: Database, c0: bool, c1: bool,
                                                                     expected: dict[str, str]) -> None:
    [iid] = start(db.engine, SKIPPED_GATEWAY, {"c0": c0, "c1": c1})
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    assert {sid: row.status for sid, row in steps(db.engine, iid).items()} == {"root": "completed", **expected}
