"""Operator actions on instances that the command line, the HTTP API and the web UI share: cancel,
cancel a step, retry a step, pause and resume."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, case, false, func, literal, select, update
from sqlalchemy.exc import DBAPIError

from flowdb.db.clock import Clock
from flowdb.db.connectivity import is_conflict
from flowdb.db.events import EventRow, EventWriter, event_row
from flowdb.db.instances import DefinitionCache
from flowdb.db.progress import ProgressStatements
from flowdb.db.tables import events, process_instances, step_instances
from flowdb.db.timings import CLEARED
from flowdb.definitions import CompiledDefinition
from flowdb.engine.pause import Pauser
from flowdb.engine.settle import Settled
from flowdb.engine.status import OPEN_STEP, InstanceStatus, StepStatus, sql_in, word
from flowdb.engine.stop import Stopper
from flowdb.errors import FlowdbError, NotFound
from flowdb.models import effective_retry
from flowdb.notify import Wakeups

I, S, E = process_instances, step_instances, events  # noqa: E741
T = TypeVar("T")


def locked_instance(conn: Connection, instance_id: int) -> Any:
    """The instance's status, definition and pause, its row locked on PostgreSQL (as the workers'
    writers lock it), so an operator action and a step's outcome serialize."""
    query = select(I.c.status, I.c.definition_id, I.c.paused_at, I.c.paused_by).where(I.c.id == instance_id)
    row = conn.execute(query.with_for_update() if conn.dialect.name == "postgresql" else query).first()
    if row is None:
        raise NotFound(f"instance {instance_id} does not exist")
    return row


class InstanceNotRunning(FlowdbError):
    """The instance already finished (completed, failed or cancelled)."""


def cancel_instance(engine: Engine, instance_id: int, reason: str = "cancelled by an operator",
                    wakeups: Wakeups | None = None) -> list[str]:
    """Cancel a running instance in one transaction (engine/stop.py): its unfinished steps become
    `cancelled` through their step types (a pending approval is cancelled too), their leases are
    cleared (a worker still running one loses it; its late result is dropped). Returns the ids of
    the steps that were cancelled; the event streams are woken after the commit. Run again when
    PostgreSQL makes it a deadlock's loser against a worker's claim."""
    cancelled = again_on_conflict(lambda: _cancel(engine, instance_id, reason))
    (wakeups or Wakeups(None)).notify(events=True)
    return cancelled


def _cancel(engine: Engine, instance_id: int, reason: str) -> list[str]:
    stopper = Stopper(engine.dialect.name)
    events: list[EventRow] = []
    cancelled: list[str] = []

    def record(iid: int, kind: str, payload: dict[str, Any] | None = None, sid: int | None = None) -> None:
        events.append(event_row(iid, kind, payload, sid))
        if kind == "step.cancelled":
            cancelled.append(steps_by_id[sid])

    with engine.begin() as conn:
        status = locked_instance(conn, instance_id).status
        if status != InstanceStatus.RUNNING:
            raise InstanceNotRunning(f"instance {instance_id} is already {status}; only running instances can be "
                                     "cancelled")
        steps_by_id = dict(conn.execute(select(S.c.id, S.c.step_id).where(S.c.instance_id == instance_id)).all())
        stopper.finish_instance(conn, instance_id, InstanceStatus.CANCELLED, record, error=reason)
        EventWriter(engine.dialect.name).write(conn, events)
    return cancelled


class StepNotCancellable(FlowdbError):
    """The step is not open (it finished already), or its instance is not running."""


def cancel_step(engine: Engine, instance_id: int, step_id: str, reason: str = "cancelled by an operator",
                wakeups: Wakeups | None = None) -> list[str]:
    """Cancel one step of a running instance (its latest round, and its for_each items): a running
    step loses its lease, a waiting approval becomes `cancelled`; its successors go on as after a
    skipped parent (engine/settle.py). Returns the step ids that the cancellation settled in turn
    (skipped or cancelled successors), the step itself first."""
    dialect = engine.dialect.name
    progress = ProgressStatements(dialect)
    events: list[EventRow] = []

    class _Sink:
        made_ready = 0

        def event(self, iid: int, kind: str, payload: dict[str, Any] | None = None, sid: int | None = None) -> None:
            events.append(event_row(iid, kind, payload, sid))

        def close(self, iid: int, steps: int = 1) -> None:
            closed[0] += steps

    closed = [0]
    sink = _Sink()
    with engine.begin() as conn:
        found = locked_instance(conn, instance_id)
        if found.status != InstanceStatus.RUNNING:
            raise StepNotCancellable(f"instance {instance_id} is {found.status}; steps can be cancelled only in a "
                                     "running instance")
        definition = DefinitionCache().get(conn, found.definition_id)
        if step_id not in definition.steps:
            raise NotFound(f"instance {instance_id} has no step {step_id!r} (its steps: "
                           f"{', '.join(definition.steps)})")
        rows = conn.execute(select(S.c.id, S.c.round, S.c.item, S.c.status).where(
            S.c.instance_id == instance_id, S.c.step_id == step_id)).all()
        latest = max(r.round for r in rows)
        targets = [r.id for r in rows if r.round == latest]
        own = next(r for r in rows if r.round == latest and r.item is None)
        if own.status not in OPEN_STEP:
            raise StepNotCancellable(f"step {step_id!r} of instance {instance_id} is {own.status}; only a pending, "
                                     "ready, running or waiting step can be cancelled")
        stopped = progress.stopper.cancel_steps(conn, reason, sink.event, rows=targets)
        sink.close(instance_id, len(stopped))
        progress.settler.settle(conn, [Settled(instance_id, step_id, False, None, found.definition_id, latest)],
                                {instance_id: definition}, sink)
        conn.execute(progress.account, {"iid": instance_id, "closed": closed[0], "cost": 0.0})
        if conn.execute(select(I.c.open_steps).where(I.c.id == instance_id)).scalar_one() == 0:
            outputs = _leaf_outputs(conn, instance_id, definition)
            progress.stopper.finish_instance(conn, instance_id, InstanceStatus.COMPLETED, sink.event, outputs=outputs,
                                             reason=f"its last open step {step_id!r} was cancelled")
        EventWriter(dialect).write(conn, events)
    (wakeups or Wakeups(None)).notify(workers=sink.made_ready > 0, events=True)
    return [step_id]


def _leaf_outputs(conn: Connection, instance_id: int, definition: CompiledDefinition) -> dict[str, Any]:
    leaves = [sid for sid, step in definition.steps.items() if not step.children]
    rows = conn.execute(select(S.c.step_id, S.c.output).where(
        S.c.instance_id == instance_id, S.c.step_id.in_(leaves), S.c.item.is_(None),
        S.c.status == StepStatus.COMPLETED.value).order_by(S.c.round)).all()
    return {row.step_id: row.output for row in rows}


def restore_halted(conn: Connection, instance_id: int, reason: str, keep: frozenset[str] = frozenset(),
                   definition_id: int | None = None) -> list[EventRow]:
    """The steps a failure or a cancel stopped (`halted`; not those cancelled for their own sake: by an
    operator, a race, a loop going back) get back what they were waiting on, with as many attempts
    again as their policy gives (a run the stop cut short does not count against them); a for_each
    step whose items had started waits on them again (its items start afresh). Rows of the steps in
    `keep` stay as they are (a rerun runs them anew); `definition_id`: the version they run on now
    (a rerun on another version). The events to write."""
    clock = Clock(conn.dialect.name)
    waits_on_items = S.c.item.is_(None) & S.c.items_total.is_not(None)
    waits_on_parents = S.c.item.is_(None) & (S.c.pending_parents > literal(0))
    restored = conn.execute(
        update(S).where(S.c.instance_id == instance_id, S.c.status == word(StepStatus.CANCELLED), S.c.halted,
                        S.c.step_id.not_in(sorted(keep)))
        .values(status=case((waits_on_items, word(StepStatus.WAITING)),
                            (waits_on_parents, word(StepStatus.PENDING)), else_=word(StepStatus.READY)),
                claimable_at=case((waits_on_items | waits_on_parents, None), else_=clock.now),
                ready_at=case((waits_on_items | waits_on_parents, S.c.ready_at), else_=clock.now),
                woken=waits_on_items, halted=false(), finished_at=None, paused=false(),
                max_attempts=S.c.attempt + S.c.max_attempts, releases=literal(0), agent_execution=None,
                definition_id=S.c.definition_id if definition_id is None else literal(definition_id),
                input=case((waits_on_items, S.c.input), else_=None), **CLEARED)
        .returning(S.c.id, S.c.step_id)).all()
    if keep:
        conn.execute(update(S).where(S.c.instance_id == instance_id, S.c.halted, S.c.step_id.in_(sorted(keep)))
                     .values(halted=false()))
    return [event_row(instance_id, "step.restored", {"reason": reason}, row.id) for row in restored]


def running_again(conn: Connection, instance_id: int, **changes: Any) -> None:
    """A finished instance runs again: its open steps counted afresh, its end undone."""
    open_steps = conn.execute(select(func.count()).where(
        S.c.instance_id == instance_id, sql_in("step_instances.status", OPEN_STEP))).scalar_one()
    conn.execute(update(I).where(I.c.id == instance_id).values(
        status=word(InstanceStatus.RUNNING), error=None, finished_at=None, outputs=None, open_steps=open_steps,
        **changes))


class StepNotRetryable(FlowdbError):
    """The step is not failed, or its instance cannot run again."""


def retry_step(engine: Engine, instance_id: int, step_id: str) -> str:
    """Make a failed step ready again, with a fresh set of attempts, and its failed instance running
    again from that step on: the steps the failure cancelled go back to pending (parents still
    open) or ready. Returns the instance's status afterwards."""
    clock = Clock(engine.dialect.name)
    with engine.begin() as conn:
        found = locked_instance(conn, instance_id)
        step = conn.execute(select(S.c.id, S.c.status, S.c.attempt).where(  # its latest round
            S.c.instance_id == instance_id, S.c.step_id == step_id, S.c.item.is_(None))
            .order_by(S.c.round.desc()).limit(1)).first()
        if step is None:
            raise NotFound(f"instance {instance_id} has no step {step_id!r}")
        if step.status != "failed":
            raise StepNotRetryable(f"step {step_id!r} of instance {instance_id} is {step.status}; only failed "
                                   "steps can be retried")
        caught = conn.execute(select(E.c.payload).where(
            E.c.instance_id == instance_id, E.c.step_instance_id == step.id, E.c.type == "step.error_caught")).first()
        if caught is not None:
            handler = caught.payload.get("handler") if isinstance(caught.payload, dict) else None
            raise StepNotRetryable(f"step {step_id!r} of instance {instance_id} failed and its error went to "
                                   f"{handler!r} (on_error), which carried the instance on; to run it again "
                                   f"when the instance has finished: flowdb rerun {instance_id} --from {step_id}")
        if found.status not in ("failed", "running"):
            raise StepNotRetryable(f"instance {instance_id} is {found.status}; only failed or running instances "
                                   "can be retried")
        definition = DefinitionCache().get(conn, found.definition_id)
        if definition.steps[step_id].model.for_each is not None:
            raise StepNotRetryable(f"step {step_id!r} of instance {instance_id} runs for_each items; retrying a "
                                   "for_each step is not supported yet: start a new instance for it")
        policy = effective_retry(definition.steps[step_id].model)
        fresh = policy.max_attempts if policy else 1
        conn.execute(update(S).where(S.c.id == step.id).values(
            status=word(StepStatus.READY), max_attempts=S.c.attempt + fresh, error=None, finished_at=None,
            ready_at=clock.now, claimable_at=clock.now, releases=literal(0), **CLEARED))
        rows = [event_row(instance_id, "step.retry_requested", {"attempt": step.attempt, "fresh_attempts": fresh},
                          step.id)]
        if found.status == "failed":
            rows += restore_halted(conn, instance_id, "retry")
            running_again(conn, instance_id)
            rows.append(event_row(instance_id, "instance.resumed", {"from_step": step_id}))
        else:
            conn.execute(update(I).where(I.c.id == instance_id).values(open_steps=I.c.open_steps + literal(1)))
        if found.paused_at is not None:  # a paused instance's retried step waits for the resume
            Pauser(engine.dialect.name).hold(conn, [instance_id])
        EventWriter(engine.dialect.name).write(conn, rows)
    return "running"


class NotPausable(FlowdbError):
    """The instance is not running, or is paused already."""


class NotPaused(FlowdbError):
    """The instance is not paused."""


def again_on_conflict(action: Callable[[], T], tries: int = 5) -> T:
    """Run a transaction again when PostgreSQL chose it as the loser of a deadlock or a serialization
    conflict (a worker's claim holds step rows and waits for the instance row an operator's action holds)."""
    for attempt in range(1, tries + 1):
        try:
            return action()
        except DBAPIError as exc:
            if attempt == tries or not is_conflict(exc):
                raise
            time.sleep(0.02 * attempt)
    raise AssertionError("unreachable")


def pause_instance(engine: Engine, instance_id: int, by: str, wakeups: Wakeups | None = None) -> None:
    """Pause a running instance: no new step of it is claimed until it resumes (flowdb/engine/pause.py)."""
    again_on_conflict(lambda: _pause(engine, instance_id, by))
    if wakeups is not None:
        wakeups.notify(events=True)


def _pause(engine: Engine, instance_id: int, by: str) -> None:
    with engine.begin() as conn:
        found = locked_instance(conn, instance_id)
        if found.status != InstanceStatus.RUNNING:
            raise NotPausable(f"instance {instance_id} is {found.status}; only running instances can be paused")
        if found.paused_at is not None:
            raise NotPausable(f"instance {instance_id} is paused already (by {found.paused_by}); "
                              f"resume it with flowdb resume {instance_id}")
        rows: list[EventRow] = []
        Pauser(engine.dialect.name).pause(conn, instance_id, by, "paused by an operator",
                                          lambda *args: rows.append(event_row(*args)))
        EventWriter(engine.dialect.name).write(conn, rows)


def resume_instance(engine: Engine, instance_id: int, by: str, wakeups: Wakeups | None = None) -> None:
    """Resume a paused instance: its held steps are claimed as they are due (a timer past its time at once)."""
    again_on_conflict(lambda: _resume(engine, instance_id, by))
    if wakeups is not None:
        wakeups.notify(workers=True, events=True)


def _resume(engine: Engine, instance_id: int, by: str) -> None:
    with engine.begin() as conn:
        found = locked_instance(conn, instance_id)
        if found.paused_at is None:
            raise NotPaused(f"instance {instance_id} is not paused ({found.status})")
        rows: list[EventRow] = []
        Pauser(engine.dialect.name).resume(conn, instance_id, by, lambda *args: rows.append(event_row(*args)))
        EventWriter(engine.dialect.name).write(conn, rows)


def instances_of(engine: Engine, process: str, paused: bool) -> list[int]:
    """The running instances of a process that are paused (or not): what `--process` pauses or resumes."""
    with engine.connect() as conn:
        known = conn.execute(select(I.c.id).where(I.c.process_name == process).limit(1)).first()
        if known is None:
            raise NotFound(f"no instance of process {process!r}")
        flag = I.c.paused_at.is_not(None) if paused else I.c.paused_at.is_(None)
        return list(conn.execute(select(I.c.id).where(I.c.process_name == process,
                                                      I.c.status == word(InstanceStatus.RUNNING), flag)
                                 .order_by(I.c.id)).scalars())


def pause_process(engine: Engine, process: str, by: str, wakeups: Wakeups | None = None) -> list[int]:
    """Pause every running instance of a process; the ids paused (one transaction each: an instance that
    finished meanwhile is passed by)."""
    paused = []
    for instance_id in instances_of(engine, process, paused=False):
        try:
            pause_instance(engine, instance_id, by)
        except NotPausable:
            continue
        paused.append(instance_id)
    if wakeups is not None and paused:
        wakeups.notify(events=True)
    return paused


def resume_process(engine: Engine, process: str, by: str, wakeups: Wakeups | None = None) -> list[int]:
    """Resume every paused instance of a process; the ids resumed."""
    resumed = []
    for instance_id in instances_of(engine, process, paused=True):
        try:
            resume_instance(engine, instance_id, by)
        except NotPaused:
            continue
        resumed.append(instance_id)
    if wakeups is not None and resumed:
        wakeups.notify(workers=True, events=True)
    return resumed
