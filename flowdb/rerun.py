"""Rerun a finished instance from a step: that step and everything after it run again as new rounds;
what ran before it is kept (its outputs are what the new rounds read) and not run again.

`--version N` runs the rest on another deployed version of the process, when it keeps the steps
that are not rerun: each of them must be in it with the same type (their rows and outputs are kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from flowdb.control import locked_instance, restore_halted, running_again
from flowdb.db.events import EventRow, EventWriter, event_row
from flowdb.db.instances import DefinitionCache, find_definition
from flowdb.db.progress import ProgressStatements
from flowdb.db.tables import events, process_instances, step_edges, step_instances
from flowdb.definitions import CompiledDefinition
from flowdb.engine.status import EdgeState, InstanceStatus, StepStatus
from flowdb.errors import FlowdbError, NotFound
from flowdb.notify import Wakeups
from flowdb.problems import suggest

I, S, E, EV = process_instances, step_instances, step_edges, events  # noqa: E741


class RerunRefused(FlowdbError):
    """The instance is running, or the version asked for cannot take it over."""


@dataclass
class Rerun:
    instance_id: int
    version: int
    steps: list[str]  # the steps that run again, as new rounds


@dataclass
class _Sink:
    """What opening the rounds reports (settle.Sink): events to write, steps opened."""

    instance_id: int
    events: list[EventRow] = field(default_factory=list)
    made_ready: int = 0

    def event(self, instance_id: int, kind: str, payload: dict[str, Any] | None = None,
              step_instance_id: int | None = None) -> None:
        self.events.append(event_row(instance_id, kind, payload, step_instance_id))

    def close(self, instance_id: int, steps: int = 1) -> None:
        pass  # the open steps are counted afresh (control.running_again)


def downstream(definition: CompiledDefinition, start: str) -> list[str]:
    """`start` and every step after it (through depends_on, routes and error boundaries), in file order."""
    seen = {start}
    todo = [start]
    while todo:
        for child in definition.steps[todo.pop()].children:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return [sid for sid in definition.steps if sid in seen]


def rerun_instance(engine: Engine, instance_id: int, from_step: str, by: str, version: int | None = None,
                   wakeups: Wakeups | None = None) -> Rerun:
    """Run a finished instance again from `from_step` (on `version` when given); see the module's doc."""
    with engine.begin() as conn:
        found = locked_instance(conn, instance_id)
        if found.status == InstanceStatus.RUNNING:
            raise RerunRefused(f"instance {instance_id} is running; a rerun starts from a finished instance: let it "
                               f"finish, or cancel it first (flowdb cancel {instance_id})")
        cache = DefinitionCache()
        old = cache.get(conn, found.definition_id)
        process, current = conn.execute(select(I.c.process_name, I.c.version).where(I.c.id == instance_id)).one()
        definition_id, definition, to_version = found.definition_id, old, current
        if version is not None and version != current:
            definition_id, to_version = find_definition(conn, process, version)
            definition = cache.get(conn, definition_id)
        if from_step not in definition.steps:
            raise NotFound(f"process {process} version {to_version} has no step {from_step!r}"
                           f"{suggest(from_step, list(definition.steps))}; its steps: {', '.join(definition.steps)}")
        if definition.has_loops or old.has_loops:
            raise RerunRefused(f"process {process} has loops: a rerun of such a process is not supported yet; "
                               f"retry a failed step in place (flowdb retry {instance_id} STEP) or start a new "
                               "instance")
        body = downstream(definition, from_step)
        _check_failures_rerun(conn, instance_id, set(body), from_step)
        if definition_id != found.definition_id:
            _check_compatible(old, definition, set(body), process, to_version, from_step)
            _edges_for(conn, instance_id, definition, set(body))
            conn.execute(update(I).where(I.c.id == instance_id).values(definition_id=definition_id, version=to_version))
        sink = _Sink(instance_id)
        if found.status in (InstanceStatus.FAILED, InstanceStatus.CANCELLED):
            # What the failure (or the cancel) stopped beside the rerun runs again too, on the version it runs on.
            sink.events += restore_halted(conn, instance_id, "rerun", keep=frozenset(body),
                                          definition_id=definition_id)
        settler = ProgressStatements(engine.dialect.name).settler
        rounds, ready = settler.open_round(conn, instance_id, definition_id, definition, body, [from_step], sink,
                                           waits_outside=True)
        running_again(conn, instance_id)
        sink.event(instance_id, "instance.rerun", {"from_step": from_step, "round": rounds[from_step], "by": by,
                                                   "version": to_version, "steps": body})
        sink.events += [event_row(instance_id, "step.ready", None, ready_id) for ready_id in ready]
        EventWriter(engine.dialect.name).write(conn, sink.events)
    if wakeups is not None:
        wakeups.notify(workers=True, events=True)
    return Rerun(instance_id, to_version, body)


def _check_failures_rerun(conn: Connection, instance_id: int, body: set[str], from_step: str) -> None:
    """A step that failed its instance (its error not caught by an error boundary) must run again in the
    rerun: otherwise the instance would go on past a failure."""
    latest = select(S.c.step_id, func.max(S.c.round).label("round")).where(
        S.c.instance_id == instance_id, S.c.item.is_(None)).group_by(S.c.step_id).subquery()
    failed = conn.execute(
        select(S.c.id, S.c.step_id).join(latest, (latest.c.step_id == S.c.step_id) & (latest.c.round == S.c.round))
        .where(S.c.instance_id == instance_id, S.c.item.is_(None), S.c.status == StepStatus.FAILED.value)).all()
    caught = set(conn.execute(select(EV.c.step_instance_id).where(
        EV.c.instance_id == instance_id, EV.c.type == "step.error_caught")).scalars())
    left = sorted(row.step_id for row in failed if row.id not in caught and row.step_id not in body)
    if left:
        raise RerunRefused(f"step(s) {', '.join(map(repr, left))} failed this instance and are not after "
                           f"{from_step!r}: a rerun from {from_step!r} would go on past that failure; rerun from "
                           f"{left[0]!r} (or from a step before it)")


def _check_compatible(old: CompiledDefinition, new: CompiledDefinition, body: set[str], process: str, version: int,
                      from_step: str) -> None:
    """Every step the rerun keeps must be in the new version with the same type."""
    missing = [sid for sid in new.steps if sid not in body and sid not in old.steps]
    changed = [f"{sid!r} ({old.steps[sid].type} → {new.steps[sid].type})" for sid in new.steps
               if sid not in body and sid in old.steps and old.steps[sid].type != new.steps[sid].type]
    if missing or changed:
        why = "; ".join(part for part in (
            f"it has step(s) {', '.join(map(repr, missing))} that this instance never ran" if missing else "",
            f"step(s) {', '.join(changed)} changed type" if changed else "") if part)
        raise RerunRefused(f"version {version} of {process} cannot take over this instance from {from_step!r}: {why}. "
                           f"The steps before {from_step!r} (and those beside it) must be the same; rerun from an "
                           "earlier step, or start a new instance")


def _edges_for(conn: Connection, instance_id: int, definition: CompiledDefinition, body: set[str]) -> None:
    """The instance's edge rows for the new version: an edge into the rerun from a kept step keeps its
    state (a new edge counts as taken when its parent completed); the rerun's own edges are reopened."""
    states = {(r.from_step, r.to_step): r.state for r in conn.execute(
        select(E.c.from_step, E.c.to_step, E.c.state).where(E.c.instance_id == instance_id))}
    completed = set(conn.execute(select(S.c.step_id).where(
        S.c.instance_id == instance_id, S.c.item.is_(None), S.c.status == StepStatus.COMPLETED.value)).scalars())
    rows = []
    for edge in definition.edges:
        state = states.get((edge.from_step, edge.to_step))
        if state is None:
            taken = edge.kind == "dependency" and edge.from_step in completed
            state = (EdgeState.TAKEN if taken else EdgeState.SKIPPED).value
        if edge.from_step in body:
            state = EdgeState.PENDING.value
        rows.append({"instance_id": instance_id, "from_step": edge.from_step, "to_step": edge.to_step,
                     "kind": edge.kind, "state": state})
    conn.execute(delete(E).where(E.c.instance_id == instance_id))
    if rows:
        conn.execute(insert(E), rows)
