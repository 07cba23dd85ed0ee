"""Recording outcomes: one transaction per batch, fenced by lease tokens.

A batch first checks which of its steps this worker still holds (lease token, row locked on
PostgreSQL); the others are late and dropped. Then the settled steps' rows are written, their
out-edges marked and their children counted down (`pending_parents`), each by one executemany. A child whose count
reaches 0 becomes ready when at least one parent completed, and is skipped otherwise (dead-path
elimination, which cascades). The instance row counts open steps; the update that brings it to 0
finishes the instance. On PostgreSQL the instance rows are locked first, in id order, so
concurrent completions of one instance (a fan-in) serialize and never deadlock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BindParameter,
    Connection,
    Update,
    bindparam,
    case,
    literal,
    literal_column,
    or_,
    select,
    update,
)

from flowdb.db.approvals import ApprovalStatements
from flowdb.db.claims import LEASE_DROPPED
from flowdb.db.clock import Clock
from flowdb.db.driver import DriverStatement, as_json
from flowdb.db.events import EventRow, EventWriter, event_row
from flowdb.db.tables import process_instances, step_edges, step_instances
from flowdb.db.timings import CLEARED, timing
from flowdb.definitions import CompiledDefinition
from flowdb.expressions import StepView, Template
from flowdb.models import Action
from flowdb.outcomes import Outcome

log = logging.getLogger("flowdb.progress")
S, I, E = step_instances, process_instances, step_edges  # noqa: E741
OPEN = "('pending', 'ready', 'running', 'waiting')"


def _lit(word: str) -> Any:
    return literal_column(f"'{word}'")


@dataclass
class DueActions:
    """An instance's output actions (on_success or on_failure), due once its end is committed."""

    instance_id: int
    definition: CompiledDefinition
    actions: list[tuple[Action, Template]]
    context: dict[str, Any]  # what their templates see, read in the transaction that ended the instance


@dataclass
class Progress:
    """What a batch of outcomes changed, for the caller to log and to wake other workers."""

    late: list[Outcome] = field(default_factory=list)
    made_ready: int = 0
    finished_instances: list[tuple[int, str]] = field(default_factory=list)
    actions: list[DueActions] = field(default_factory=list)  # output actions due once committed


class ProgressStatements:
    def __init__(self, dialect_name: str) -> None:
        clock = Clock(dialect_name)
        self.clock = clock
        postgres = dialect_name == "postgresql"
        ids: BindParameter[list[int]] = bindparam("ids", expanding=True)
        lock = select(I.c.id).where(I.c.id.in_(ids)).order_by(I.c.id).with_for_update()
        self.lock_instances = lock if postgres else None
        # By primary key alone: a status condition here lets PostgreSQL's planner reach for the
        # claimable index, which on a busy queue table holds many dead entries.
        held = select(S.c.id, S.c.lease_token, S.c.status).where(S.c.id.in_(ids))
        self.held = held.with_for_update() if postgres else held
        fenced = (S.c.id == bindparam("sid"), S.c.lease_token == bindparam("token"), S.c.status == _lit("running"))
        release_lease = LEASE_DROPPED
        usage = {"cost_usd": S.c.cost_usd + bindparam("cost"), "tokens_in": S.c.tokens_in + bindparam("tin"),
                 "tokens_out": S.c.tokens_out + bindparam("tout")}
        # A run time for the steps that completed or failed (db/timings.py); a skipped one has none,
        # nor one whose claim came before its ready time (a clock that went backwards).
        ran = or_(bindparam("status") == _lit("completed"), bindparam("status") == _lit("failed")) & (
            S.c.started_at >= S.c.ready_at)
        run = {column: case((ran, value)) for column, value in
               timing("run", clock.milliseconds_between(S.c.started_at)).items()}
        self.complete: Update = update(S).where(*fenced).values(
            status=bindparam("status"), output=bindparam("output"), input=bindparam("input"),
            error=bindparam("error"), finished_at=clock.now, claimable_at=None, **run, **usage, **release_lease)
        self.retry: Update = update(S).where(*fenced).values(
            status=_lit("ready"), error=bindparam("error"), ready_at=clock.plus(bindparam("delay")),
            claimable_at=clock.plus(bindparam("delay")), **CLEARED, **usage, **release_lease)
        self.park: Update = update(S).where(*fenced).values(
            status=_lit("waiting"), input=bindparam("input"), claimable_at=None, **release_lease)
        self.park_timed: Update = update(S).where(*fenced).values(
            status=_lit("waiting"), input=bindparam("input"), claimable_at=clock.plus(bindparam("wake_in")),
            **release_lease)
        instance_id: BindParameter[int] = bindparam("iid")
        self.mark_edge: Update = (
            update(E).where(E.c.instance_id == instance_id, E.c.from_step == bindparam("parent"),
                            E.c.to_step == bindparam("child"))
            .values(state=bindparam("edge_state"))
        )
        # Count a child down by one settled parent; when none is left pending, it becomes ready if a
        # parent completed, skipped if every parent was skipped (SET reads the row's old values).
        settled = S.c.pending_parents - literal(1) == literal(0)
        completed_after = S.c.completed_parents + bindparam("taken")
        becomes_ready = settled & (completed_after > literal(0))
        self.count_down: Update = (
            update(S).where(S.c.instance_id == instance_id, S.c.step_id == bindparam("child"))
            .values(
                pending_parents=S.c.pending_parents - literal(1),
                completed_parents=completed_after,
                status=case((becomes_ready, _lit("ready")), (settled, _lit("skipped")), else_=S.c.status),
                ready_at=case((becomes_ready, clock.now), else_=S.c.ready_at),
                claimable_at=case((becomes_ready, clock.now), else_=S.c.claimable_at),
                finished_at=case((settled & ~becomes_ready, clock.now), else_=S.c.finished_at),
            )
        )
        self.settled_children = select(S.c.id, S.c.instance_id, S.c.step_id, S.c.status).where(
            S.c.instance_id.in_(bindparam("iids", expanding=True)),
            S.c.step_id.in_(bindparam("children", expanding=True)),
            S.c.pending_parents == literal(0),
            literal_column("step_instances.status IN ('ready', 'skipped')"),
        )
        self.account: Update = (
            update(I).where(I.c.id == instance_id)
            .values(open_steps=I.c.open_steps - bindparam("closed"), cost_usd=I.c.cost_usd + bindparam("cost"))
        )
        self.instance_state = select(I.c.id, I.c.open_steps, I.c.status).where(
            I.c.id.in_(bindparam("iids", expanding=True)))
        self.leaf_outputs = select(S.c.instance_id, S.c.step_id, S.c.output).where(
            S.c.instance_id.in_(bindparam("iids", expanding=True)),
            S.c.step_id.in_(bindparam("leaves", expanding=True)), S.c.status == _lit("completed"))
        self.finish_instance: Update = (
            update(I).where(I.c.id == instance_id, I.c.status == _lit("running"))
            .values(status=bindparam("status"), outputs=bindparam("outputs"), error=bindparam("error"),
                    finished_at=clock.now, open_steps=literal(0))
        )
        self.cancel_open_steps = (
            update(S).where(S.c.instance_id == instance_id, literal_column(f"step_instances.status IN {OPEN}"))
            .values(status=_lit("cancelled"), finished_at=clock.now, claimable_at=None, **release_lease)
            .returning(S.c.id, S.c.step_id)
        )
        # The statements every step goes through run on the driver's cursor (see db/driver.py).
        self.complete_many = DriverStatement(self.complete)
        self.mark_edges = DriverStatement(self.mark_edge)
        self.count_down_many = DriverStatement(self.count_down)
        self.account_many = DriverStatement(self.account)
        self.events = EventWriter(dialect_name)
        self.approvals = ApprovalStatements(dialect_name)


@dataclass
class _Batch:
    """What one transaction accumulates: events, and per instance the steps closed and cost added."""

    progress: Progress
    definitions: dict[int, CompiledDefinition] = field(default_factory=dict)  # by instance id
    events: list[EventRow] = field(default_factory=list)
    closed: dict[int, int] = field(default_factory=dict)
    cost: dict[int, float] = field(default_factory=dict)

    def event(self, instance_id: int, kind: str, payload: dict[str, Any] | None = None,
              step_instance_id: int | None = None) -> None:
        self.events.append(event_row(instance_id, kind, payload, step_instance_id))

    def close(self, instance_id: int, steps: int = 1) -> None:
        self.closed[instance_id] = self.closed.get(instance_id, 0) + steps

    def spend(self, instance_id: int, usd: float) -> None:
        if usd:
            self.cost[instance_id] = self.cost.get(instance_id, 0.0) + usd


class ProgressWriter:
    """Applies a batch of outcomes in the caller's transaction, with a fixed number of statements
    for the common case (steps completed or skipped), whatever the batch size."""

    def __init__(self, statements: ProgressStatements) -> None:
        self.q = statements

    def apply(self, conn: Connection, outcomes: list[Outcome], definitions: dict[int, CompiledDefinition]) -> Progress:
        batch = _Batch(Progress())
        if not outcomes:
            return batch.progress
        for o in outcomes:
            batch.definitions[o.step.instance_id] = definitions[o.step.definition_id]
        if self.q.lock_instances is not None:
            conn.execute(self.q.lock_instances, {"ids": sorted(batch.definitions)}).all()
        # The lease check for the whole batch: a step is ours if it still runs under our token.
        tokens = {row.id: row.lease_token for row in conn.execute(self.q.held, {"ids": [o.step.id for o in outcomes]})
                  if row.status == "running"}
        live = []
        for o in outcomes:
            for kind, payload in o.events:  # facts (a notice sent...) whether or not the lease still holds
                batch.event(o.step.instance_id, kind, payload, o.step.id)
            if tokens.get(o.step.id) != o.step.lease_token:
                batch.progress.late.append(o)
                batch.event(o.step.instance_id, "step.late_result_dropped",
                            {"attempt": o.step.attempt, "outcome": o.kind}, o.step.id)
            elif o.approval is None or not self._approval(conn, o, batch):
                live.append(o)
        settling = [o for o in live if o.kind in ("completed", "skipped")]
        finals = [o for o in live if o.kind == "failed" and not self._retrying(o)]
        self.q.complete_many.executemany(conn, [self._completion(o) for o in settling + finals])
        for o in settling + finals:
            batch.event(o.step.instance_id, f"step.{o.kind}", self._payload(o), o.step.id)
            batch.spend(o.step.instance_id, o.cost_usd)
        for o in settling:
            batch.close(o.step.instance_id)
        self._settle(conn, [(o.step.instance_id, o.step.step_id, o.kind == "completed", o.taken)
                            for o in settling], batch)
        for o in live:
            if o.kind == "waiting":
                self._park(conn, o, batch)
            elif o.kind == "failed" and self._retrying(o):
                self._retry(conn, o, batch)
        self._account(conn, batch)
        for o in finals:
            self._fail_instance(conn, o.step.instance_id, f"step {o.step.step_id!r} failed: {o.error}", batch)
        self.q.events.write(conn, batch.events)
        return batch.progress

    def _approval(self, conn: Connection, o: Outcome, batch: _Batch) -> bool:
        """Write the outcome's approval rows; True when that also parked the step."""
        def event(kind: str, payload: dict[str, Any]) -> None:
            batch.event(o.step.instance_id, kind, payload, o.step.id)

        parked = self.q.approvals.apply(conn, o, event)
        if parked is None:
            return False
        batch.event(o.step.instance_id, "step.waiting", {"approval_id": parked.approval_id}, o.step.id)
        batch.progress.made_ready += parked.claimable_now
        return True

    @staticmethod
    def _retrying(o: Outcome) -> bool:
        return o.retryable and o.step.attempt < o.step.max_attempts

    @staticmethod
    def _completion(o: Outcome) -> dict[str, Any]:
        """Parameters of `complete`, driver-ready (JSON as text)."""
        return {"sid": o.step.id, "token": o.step.lease_token, "status": o.kind, "output": as_json(o.output),
                "input": as_json(o.input), "error": o.error, "cost": o.cost_usd, "tin": o.tokens_in,
                "tout": o.tokens_out}

    @staticmethod
    def _payload(o: Outcome) -> dict[str, Any]:
        payload: dict[str, Any] = {"attempt": o.step.attempt}
        if o.error:
            payload["error"] = o.error
        if o.cost_usd:
            payload["cost_usd"] = o.cost_usd
        return payload

    def _park(self, conn: Connection, o: Outcome, batch: _Batch) -> None:
        params = {"sid": o.step.id, "token": o.step.lease_token, "input": o.input}
        if o.wake_in is not None:
            conn.execute(self.q.park_timed, {**params, "wake_in": o.wake_in})
        else:
            conn.execute(self.q.park, params)
        batch.event(o.step.instance_id, "step.waiting", {"wake_in_s": o.wake_in}, o.step.id)

    def _retry(self, conn: Connection, o: Outcome, batch: _Batch) -> None:
        conn.execute(self.q.retry, {"sid": o.step.id, "token": o.step.lease_token, "error": o.error,
                                    "delay": o.retry_delay, "cost": o.cost_usd, "tin": o.tokens_in,
                                    "tout": o.tokens_out})
        batch.event(o.step.instance_id, "step.retry_scheduled",
                    {"attempt": o.step.attempt, "error": o.error, "delay_s": o.retry_delay}, o.step.id)
        batch.spend(o.step.instance_id, o.cost_usd)  # a failed attempt may still have cost money

    def _settle(self, conn: Connection, settled: list[tuple[int, str, bool, frozenset[str] | None]],
                batch: _Batch) -> None:
        """Mark the out-edges of settled steps and count their children down; cascade the skips."""
        edges: list[dict[str, Any]] = []
        counts: list[dict[str, Any]] = []
        touched: set[tuple[int, str]] = set()
        for instance_id, step_id, completed, taken in settled:
            for child in batch.definitions[instance_id].steps[step_id].children:
                is_taken = completed and (taken is None or child in taken)
                edges.append({"iid": instance_id, "parent": step_id, "child": child,
                              "edge_state": "taken" if is_taken else "skipped"})
                counts.append({"iid": instance_id, "child": child, "taken": int(is_taken)})
                touched.add((instance_id, child))
        if not counts:
            return
        self.q.mark_edges.executemany(conn, edges)
        self.q.count_down_many.executemany(conn, counts)
        # A child counted down here that has no pending parent left was settled by this batch
        # (each child reaches 0 exactly once); the query may return other rows, filtered out here.
        rows = conn.execute(self.q.settled_children, {"iids": sorted({i for i, _ in touched}),
                                                      "children": sorted({c for _, c in touched})}).all()
        cascade: list[tuple[int, str, bool, frozenset[str] | None]] = []
        for row in rows:
            if (row.instance_id, row.step_id) not in touched:
                continue
            if row.status == "ready":
                batch.progress.made_ready += 1
                batch.event(row.instance_id, "step.ready", None, row.id)
            else:
                batch.event(row.instance_id, "step.skipped", {"reason": "no parent completed"}, row.id)
                batch.close(row.instance_id)
                cascade.append((row.instance_id, row.step_id, False, None))
        self._settle(conn, cascade, batch)

    def _account(self, conn: Connection, batch: _Batch) -> None:
        """Add up closed steps and cost per instance; finish the instances with no open step left."""
        touched = sorted(set(batch.closed) | set(batch.cost))
        if not touched:
            return
        self.q.account_many.executemany(
            conn, [{"iid": i, "closed": batch.closed.get(i, 0), "cost": batch.cost.get(i, 0.0)} for i in touched])
        closing = sorted(batch.closed)
        if not closing:
            return
        done = [row.id for row in conn.execute(self.q.instance_state, {"iids": closing})
                if row.open_steps == 0 and row.status == "running"]
        if not done:
            return
        leaves = {sid for i in done for sid, step in batch.definitions[i].steps.items() if not step.children}
        outputs: dict[int, dict[str, Any]] = {i: {} for i in done}
        for row in conn.execute(self.q.leaf_outputs, {"iids": done, "leaves": sorted(leaves)}):
            if not batch.definitions[row.instance_id].steps[row.step_id].children:
                outputs[row.instance_id][row.step_id] = row.output
        conn.execute(self.q.finish_instance, [{"iid": i, "status": "completed", "outputs": outputs[i], "error": None}
                                              for i in done])
        for instance_id in done:
            batch.event(instance_id, "instance.completed")
            batch.progress.finished_instances.append((instance_id, "completed"))
            definition = batch.definitions[instance_id]
            self._actions(conn, instance_id, definition, definition.on_success, batch)

    def _fail_instance(self, conn: Connection, instance_id: int, error: str, batch: _Batch) -> None:
        for row in conn.execute(self.q.cancel_open_steps, {"iid": instance_id}).all():
            batch.event(instance_id, "step.cancelled", {"reason": "the instance failed"}, row.id)
        for approval_id in self.q.approvals.cancel_for_instance(conn, instance_id):
            batch.event(instance_id, "approval.cancelled",
                        {"approval_id": approval_id, "reason": "the instance failed"})
        result = conn.execute(self.q.finish_instance, {"iid": instance_id, "status": "failed",
                                                       "outputs": None, "error": error})
        if result.rowcount:
            batch.event(instance_id, "instance.failed", {"error": error})
            batch.progress.finished_instances.append((instance_id, "failed"))
            definition = batch.definitions[instance_id]
            self._actions(conn, instance_id, definition, definition.on_failure, batch)

    def _actions(self, conn: Connection, instance_id: int, definition: CompiledDefinition,
                 actions: list[tuple[Action, Template]], batch: _Batch) -> None:
        """Load what the output actions' templates read; the worker renders them after the commit
        (never inside a transaction) and carries them out (flowdb/actions.py)."""
        if actions:
            context = template_context(conn, instance_id, definition)
            batch.progress.actions.append(DueActions(instance_id, definition, actions, context))


# Built once (a statement built per call costs more than its execution on SQLite).
_CONTEXT_INSTANCE = select(I.c.inputs, I.c.process_name, I.c.version, I.c.status).where(I.c.id == bindparam("iid"))
_CONTEXT_STEPS = select(S.c.step_id, S.c.status, S.c.output, S.c.error, S.c.cost_usd, S.c.attempt).where(
    S.c.instance_id == bindparam("iid"))
_CONTEXT_SOME_STEPS = _CONTEXT_STEPS.where(S.c.step_id.in_(bindparam("sids", expanding=True)))


def template_context(conn: Connection, instance_id: int, definition: CompiledDefinition,
                     only_steps: frozenset[str] | None = None) -> dict[str, Any]:
    """The names templates see: inputs, process and steps.<id> (loaded from the database)."""
    instance = conn.execute(_CONTEXT_INSTANCE, {"iid": instance_id}).one()
    if only_steps is None:
        rows = conn.execute(_CONTEXT_STEPS, {"iid": instance_id}).all()
    else:
        rows = conn.execute(_CONTEXT_SOME_STEPS, {"iid": instance_id, "sids": sorted(only_steps)}).all() \
            if only_steps else []
    steps = {row.step_id: StepView.of({"id": row.step_id, "status": row.status, "output": row.output,
                                       "error": row.error, "cost": row.cost_usd, "attempt": row.attempt})
             for row in rows}
    return {"inputs": instance.inputs or {}, "steps": steps,
            "process": {"name": instance.process_name, "version": instance.version, "instance_id": instance_id,
                        "status": instance.status}}
