"""Recording outcomes: one transaction per batch, fenced by lease tokens.

A batch first checks which of its steps this worker still holds (lease token, row locked on
PostgreSQL); the others are late and dropped. Then the settled steps' rows are written (one
executemany) and settled (engine/settle.py: edges, joins, loops). The instance row counts open
steps; the update that brings it to 0 completes the instance, and an `end` step completes it at
once (engine/stop.py stops what is still open, as it does when a step fails for good). On
PostgreSQL the instance rows are locked first, in id order, so concurrent completions of one
instance (a fan-in) serialize and never deadlock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BindParameter,
    Boolean,
    Connection,
    Update,
    bindparam,
    case,
    false,
    func,
    literal,
    or_,
    select,
    true,
    update,
)

from flowdb.db.agent_usage import UsageStatements
from flowdb.db.claims import CANCELLED_WHILE_RUNNING, LEASE_DROPPED, STOPPED
from flowdb.db.clock import Clock
from flowdb.db.contexts import ContextStatements
from flowdb.db.driver import DriverStatement, as_json
from flowdb.db.events import EventRow, EventWriter, event_row
from flowdb.db.feedback import FeedbackStatements
from flowdb.db.subscriptions import NoticeStatements, notice_text
from flowdb.db.tables import process_instances, step_edges, step_instances
from flowdb.db.timings import CLEARED, timing
from flowdb.definitions import CompiledDefinition
from flowdb.engine.for_each import ForEachStatements
from flowdb.engine.pause import Pauser
from flowdb.engine.settle import Settled, Settler
from flowdb.engine.status import InstanceStatus, StepStatus, word
from flowdb.engine.stop import Stopper
from flowdb.expressions import ErrorView, StepView, Template
from flowdb.models import Action, effective_retry
from flowdb.outcomes import Outcome
from flowdb.steptypes.registry import STEP_TYPES

log = logging.getLogger("flowdb.progress")
S, I, E = step_instances, process_instances, step_edges  # noqa: E741


def _lit(name: str) -> Any:
    return word(StepStatus(name))


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
    # Of the late ones, the steps that were cancelled (or skipped) while they ran: their results are
    # dropped as expected, not because a lease was lost.
    cancelled: set[int] = field(default_factory=set)
    made_ready: int = 0
    finished_instances: list[tuple[int, str]] = field(default_factory=list)
    actions: list[DueActions] = field(default_factory=list)  # output actions due once committed


class ProgressStatements:
    def __init__(self, dialect_name: str) -> None:
        clock = Clock(dialect_name)
        self.clock = clock
        postgres = dialect_name == "postgresql"
        ids: BindParameter[list[int]] = bindparam("ids", expanding=True)
        # The lock also says which of them are paused (what their rows left this batch are held for).
        lock = select(I.c.id, I.c.paused_at).where(I.c.id.in_(ids)).order_by(I.c.id).with_for_update()
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
        # Agent state binding: the backend, platform execution and session that ran the step.
        binding: dict[str, Any] = {"agent_backend": bindparam("backend"), "agent_execution": bindparam("execution"),
                   "agent_session": bindparam("session")}
        self.complete: Update = update(S).where(*fenced).values(
            status=bindparam("status"), output=bindparam("output"), input=bindparam("input"),
            error=bindparam("error"), error_type=bindparam("etype"), finished_at=clock.now, claimable_at=None,
            **run, **usage, **binding,
            **release_lease)
        # `restart`: the next attempt starts afresh instead of going on from where a parked row waited.
        restart = bindparam("restart", type_=Boolean)
        self.retry: Update = update(S).where(*fenced).values(
            status=_lit("ready"), error=bindparam("error"), ready_at=clock.plus(bindparam("delay")),
            claimable_at=clock.plus(bindparam("delay")), woken=case((restart, false()), else_=S.c.woken),
            agent_execution=case((restart, None), else_=S.c.agent_execution), **CLEARED, **usage, **release_lease)
        self.own_row = select(S.c.id).where(S.c.instance_id == bindparam("iid"), S.c.step_id == bindparam("step"),
                                            S.c.round == bindparam("rnd"), S.c.item.is_(None))
        # retry.on_exhausted: pause: ready again at once with fresh attempts (its instance is paused with it).
        self.exhausted: Update = update(S).where(*fenced).values(
            status=_lit("ready"), error=bindparam("error"), error_type=bindparam("etype"), ready_at=clock.now,
            claimable_at=clock.now, max_attempts=S.c.attempt + bindparam("fresh"), woken=false(),
            agent_execution=None, releases=literal(0), **CLEARED, **usage, **release_lease)
        # Nothing ran (an agent's queue was full): ready later, its attempt given back. The row is fresh
        # from then on (not woken: a budget's hold is over), so its next claim charges the attempt again.
        self.defer: Update = update(S).where(*fenced).values(
            status=_lit("ready"), error=bindparam("error"), ready_at=clock.plus(bindparam("delay")),
            claimable_at=clock.plus(bindparam("delay")), attempt=S.c.attempt - literal(1),
            agent_backend=bindparam("backend"), woken=false(), **CLEARED, **release_lease)
        # A parked row is `woken` from then on: its later claims go on from where it waited.
        # The execution a parked agent task polls (none: it waits for something else, e.g. a budget).
        parked = {"status": _lit("waiting"), "input": bindparam("input"), "woken": true(),
                  "agent_backend": func.coalesce(bindparam("backend"), S.c.agent_backend),
                  "agent_execution": bindparam("execution"), **release_lease}
        self.park: Update = update(S).where(*fenced).values(claimable_at=None, **parked)
        self.park_timed: Update = update(S).where(*fenced).values(
            claimable_at=clock.plus(bindparam("wake_in")), **parked)
        instance_id: BindParameter[int] = bindparam("iid")
        self.account: Update = (
            update(I).where(I.c.id == instance_id)
            .values(open_steps=I.c.open_steps - bindparam("closed"), cost_usd=I.c.cost_usd + bindparam("cost"))
        )
        self.instance_state = select(I.c.id, I.c.open_steps, I.c.status).where(
            I.c.id.in_(bindparam("iids", expanding=True)))
        self.leaf_outputs = select(S.c.instance_id, S.c.step_id, S.c.output).where(
            S.c.instance_id.in_(bindparam("iids", expanding=True)), S.c.item.is_(None),
            S.c.step_id.in_(bindparam("leaves", expanding=True)), S.c.status == _lit("completed")
        ).order_by(S.c.round)  # the latest round's output wins
        # The statements every step goes through run on the driver's cursor (see db/driver.py).
        self.complete_many = DriverStatement(self.complete)
        self.account_many = DriverStatement(self.account)
        self.events = EventWriter(dialect_name)
        self.stopper = Stopper(dialect_name)
        self.pauser = Pauser(dialect_name)
        self.settler = Settler(dialect_name, self.stopper)
        self.for_each = ForEachStatements(dialect_name)
        self.usage = UsageStatements(dialect_name)
        self.notices = NoticeStatements(dialect_name)
        self.contexts = ContextStatements(dialect_name)
        self.feedback = FeedbackStatements(dialect_name)


@dataclass
class _Batch:
    """What one transaction accumulates: events, and per instance the steps closed and cost added."""

    progress: Progress
    definitions: dict[int, CompiledDefinition] = field(default_factory=dict)  # by instance id
    paused_now: set[int] = field(default_factory=set)  # instances this batch paused (retry.on_exhausted)
    events: list[EventRow] = field(default_factory=list)
    closed: dict[int, int] = field(default_factory=dict)
    cost: dict[int, float] = field(default_factory=dict)
    failures: dict[int, dict[str, Any]] = field(default_factory=dict)  # why instances failed: `error` in on_failure

    def event(self, instance_id: int, kind: str, payload: dict[str, Any] | None = None,
              step_instance_id: int | None = None) -> None:
        self.events.append(event_row(instance_id, kind, payload, step_instance_id))

    @property
    def made_ready(self) -> int:
        return self.progress.made_ready

    @made_ready.setter
    def made_ready(self, value: int) -> None:
        self.progress.made_ready = value

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
        paused: list[int] | None = None
        if self.q.lock_instances is not None:
            locked = conn.execute(self.q.lock_instances, {"ids": sorted(batch.definitions)}).all()
            paused = [row.id for row in locked if row.paused_at is not None]
        # The lease check for the whole batch: a step is ours if it still runs under our token.
        rows = conn.execute(self.q.held, {"ids": [o.step.id for o in outcomes]}).all()
        tokens = {row.id: row.lease_token for row in rows if row.status == "running"}
        stopped = {row.id for row in rows if row.status in STOPPED}
        live = []
        for o in outcomes:
            for kind, payload in o.events:  # facts (a notice sent...) whether or not the lease still holds
                batch.event(o.step.instance_id, kind, payload, o.step.id)
            if tokens.get(o.step.id) != o.step.lease_token:
                batch.progress.late.append(o)
                if o.step.id in stopped:
                    batch.progress.cancelled.add(o.step.id)
                reason = CANCELLED_WHILE_RUNNING if o.step.id in stopped else "its lease was lost"
                batch.event(o.step.instance_id, "step.late_result_dropped",
                            {"attempt": o.step.attempt, "outcome": o.kind, "reason": reason}, o.step.id)
            elif o.side is None or not self._record_side(conn, o, batch):
                live.append(o)
        metered: dict[str, int] = {}
        for o in live:
            if o.metered is not None:
                metered[o.metered] = metered.get(o.metered, 0) + o.tokens_in + o.tokens_out
        self.q.usage.record(conn, metered)  # tokens_per_minute (db/agent_usage.py)
        settling = [o for o in live if o.kind in ("completed", "skipped")]
        finals = [o for o in live if o.kind == "failed" and not self._retrying(o)]
        exhausted = [o for o in finals if self._pauses(o, batch)]  # retry.on_exhausted: pause
        if exhausted:
            finals = [o for o in finals if all(o is not e for e in exhausted)]
        self.q.complete_many.executemany(conn, [self._completion(o) for o in settling + finals])
        for o in settling + finals:
            batch.event(o.step.instance_id, f"step.{o.kind}", self._payload(o), o.step.id)
            batch.spend(o.step.instance_id, o.cost_usd)
        for o in settling:
            batch.close(o.step.instance_id)
        own_rows = [o for o in settling if o.step.item is None]
        self.q.settler.settle(conn, [Settled(o.step.instance_id, o.step.step_id, o.kind == "completed", o.taken,
                                             o.step.definition_id, o.step.round) for o in own_rows],
                              batch.definitions, batch)
        for o in settling:
            if o.step.item is not None:
                self._item_finished(conn, o, batch)
            elif o.cancel_items:
                self._cancel_items(conn, o, batch)
        self._completed_side_facts(conn, [o for o in settling if o.kind == "completed"], batch)
        for o in live:
            if o.kind == "waiting":
                self._park(conn, o, batch)
            elif o.kind == "deferred":
                self._defer(conn, o, batch)
            elif o.kind == "failed" and self._retrying(o):
                self._retry(conn, o, batch)
        for o in exhausted:
            self._pause_exhausted(conn, o, batch)
        finals = [o for o in finals if o.step.item is None or self._item_failed(conn, o, batch)]
        finals = self._caught(conn, finals, batch)  # those an error boundary takes go on to their handler
        ending = {o.step.instance_id: o.step.step_id for o in settling if o.ends_instance and o.kind == "completed"}
        self._account(conn, batch, set(ending))
        for instance_id, step_id in ending.items():
            self._end_instance(conn, instance_id, step_id, batch)
        for o in finals:
            what = f"step {o.step.step_id!r}" if o.step.item is None else \
                f"item {o.step.item} of step {o.step.step_id!r}"
            text = f"{what} failed: {o.error}"
            batch.failures.setdefault(o.step.instance_id, {
                "type": o.error_type or "StepFailed", "message": o.error or "", "step": o.step.step_id,
                "item": o.step.item, "round": o.step.round, "text": text})
            self._fail_instance(conn, o.step.instance_id, text, batch)
        # A paused instance's rows this batch left open are held. Successors of a completed step were held
        # with the rest at the pause: only a row leaving `running` for an open state (a retry, a park, a
        # deferral) or a new row (a loop's round, for_each items) needs it. SQLite reads the pauses then.
        if paused is None and (batch.paused_now or self._may_open_rows(outcomes, batch)):
            paused = self.q.pauser.paused(conn, batch.definitions)
        self.q.pauser.hold(conn, [*(paused or ()), *batch.paused_now])
        self.q.events.write(conn, batch.events)
        return batch.progress

    @staticmethod
    def _may_open_rows(outcomes: list[Outcome], batch: _Batch) -> bool:
        """Whether this batch may have left an unheld open row: anything but a completion or a skip, or a
        definition with loops (a gateway's loop-back opens a new round)."""
        return any(o.kind not in ("completed", "skipped") for o in outcomes) \
            or any(d.has_loops for d in batch.definitions.values())

    def _caught(self, conn: Connection, finals: list[Outcome], batch: _Batch) -> list[Outcome]:
        """The steps failed for good whose error boundary (on_error) takes their error: each settles as
        skipped for its successors but its handler, which becomes ready; the rest (returned) fail their
        instance. A for_each step caught this way cancels its items still open."""
        failing = []
        caught: list[Settled] = []
        for o in finals:
            step = batch.definitions[o.step.instance_id].steps.get(o.step.step_id)
            handler = step.error_handler(o.error_type or "StepFailed") if step is not None and step.error_routes \
                else None
            if handler is None:
                failing.append(o)
                continue
            if o.step.item is not None:
                self._cancel_items(conn, o, batch, f"item {o.step.item} of {o.step.step_id!r} failed; its error "
                                                   f"went to {handler!r} (on_error)")
                batch.close(o.step.instance_id, 2)  # the item and its step's own row
            else:
                batch.close(o.step.instance_id)
            # The step's own row is what failed and was caught (for an item: the step it belongs to).
            own = o.step.id if o.step.item is None else conn.execute(self.q.own_row, {
                "iid": o.step.instance_id, "step": o.step.step_id, "rnd": o.step.round}).scalar_one()
            batch.event(o.step.instance_id, "step.error_caught",
                        {"error_type": _error_type(o), "error": o.error, "handler": handler, "item": o.step.item},
                        own)
            caught.append(Settled(o.step.instance_id, o.step.step_id, False, None, o.step.definition_id,
                                  o.step.round, error_to=handler))
        if caught:
            self.q.settler.settle(conn, caught, batch.definitions, batch)
        return failing

    def _record_side(self, conn: Connection, o: Outcome, batch: _Batch) -> bool:
        """Write the outcome's side rows through its step type; True when that also parked the step."""
        def event(kind: str, payload: dict[str, Any]) -> None:
            batch.event(o.step.instance_id, kind, payload, o.step.id)

        parked = STEP_TYPES[o.step.type].record(conn, o, event)
        if parked is None:
            return False
        batch.progress.made_ready += parked.claimable_now
        return True

    @staticmethod
    def _pauses(o: Outcome, batch: _Batch) -> bool:
        """Its attempts are spent and its retry policy pauses the instance then (no error boundary takes it)."""
        step = batch.definitions[o.step.instance_id].steps.get(o.step.step_id)
        if step is None:  # its definition no longer compiles (a stand-in without steps)
            return False
        policy = effective_retry(step.model)
        return policy is not None and policy.on_exhausted == "pause" \
            and step.error_handler(o.error_type or "StepFailed") is None

    def _pause_exhausted(self, conn: Connection, o: Outcome, batch: _Batch) -> None:
        """retry.on_exhausted: pause: the step is ready again with a fresh set of attempts, and its instance
        paused, for a person to fix what made it fail and resume (flowdb resume ID)."""
        policy = effective_retry(batch.definitions[o.step.instance_id].steps[o.step.step_id].model)
        fresh = policy.max_attempts if policy is not None else 1
        conn.execute(self.q.exhausted, {"sid": o.step.id, "token": o.step.lease_token, "error": o.error,
                                        "etype": _error_type(o), "fresh": fresh, "cost": o.cost_usd,
                                        "tin": o.tokens_in, "tout": o.tokens_out})
        batch.spend(o.step.instance_id, o.cost_usd)
        batch.event(o.step.instance_id, "step.exhausted",
                    {"attempt": o.step.attempt, "error": o.error, "error_type": _error_type(o),
                     "fresh_attempts": fresh}, o.step.id)
        what = f"step {o.step.step_id!r}" if o.step.item is None else f"item {o.step.item} of step {o.step.step_id!r}"
        if self.q.pauser.pause(conn, o.step.instance_id, "flowdb",
                               f"{what} failed {o.step.attempt} time(s): {o.error}", batch.event):
            batch.paused_now.add(o.step.instance_id)

    @staticmethod
    def _retrying(o: Outcome) -> bool:
        return o.retryable and o.step.attempt < o.step.max_attempts

    @staticmethod
    def _completion(o: Outcome) -> dict[str, Any]:
        """Parameters of `complete`, driver-ready (JSON as text)."""
        return {"sid": o.step.id, "token": o.step.lease_token, "status": o.kind, "output": as_json(o.output),
                "input": as_json(o.input), "error": o.error, "etype": _error_type(o), "cost": o.cost_usd,
                "tin": o.tokens_in, "tout": o.tokens_out, "backend": o.backend, "execution": o.execution,
                "session": o.session}

    @staticmethod
    def _payload(o: Outcome) -> dict[str, Any]:
        payload: dict[str, Any] = {"attempt": o.step.attempt}
        if o.error:
            payload["error"] = o.error
        if o.cost_usd:
            payload["cost_usd"] = o.cost_usd
        return payload

    def _completed_side_facts(self, conn: Connection, completed: list[Outcome], batch: _Batch) -> None:
        """What some completed steps leave besides their row: notices to their subscribers
        (db/subscriptions.py), a saved context (db/contexts.py), feedback on a reviewed step (db/feedback.py)."""
        notices: list[dict[str, Any]] = []
        for o in completed:
            definition = batch.definitions[o.step.instance_id]
            model = definition.steps[o.step.step_id].model
            if model.subscribers and o.step.item is None:
                text = notice_text(definition.name, o.step.instance_id, o.step.step_id, o.output)
                notices += [{"instance_id": o.step.instance_id, "step_instance_id": o.step.id,
                             "step_id": o.step.step_id, "agent": agent, "message": text}
                            for agent in model.subscribers]
            save = getattr(getattr(model, "context", None), "save", None)
            if save is not None:
                conn.execute(self.q.contexts.save, {
                    "iid": o.step.instance_id, "name": save, "step_id": o.step.step_id, "round": o.step.round,
                    "agent": model.agent, "session_id": o.session, "context": o.context or {"response": o.output}})
                batch.event(o.step.instance_id, "context.saved", {"name": save, "session_id": o.session}, o.step.id)
            reviews = getattr(model, "reviews", None)
            if reviews is not None and isinstance(o.output, dict) and isinstance(o.output.get("approval_id"), int):
                given = self.q.feedback.record(conn, o.step.instance_id, reviews, o.output["approval_id"])
                if given:
                    batch.event(o.step.instance_id, "feedback.recorded", {"step": reviews, "votes": given}, o.step.id)
        if notices:
            self.q.notices.write(conn, notices)
            for n in notices:
                batch.event(n["instance_id"], "subscriber.notice_queued", {"agent": n["agent"]}, n["step_instance_id"])

    def _item_failed(self, conn: Connection, o: Outcome, batch: _Batch) -> bool:
        """A for_each item failed for good: its step fails (True: the instance fails with it, or the
        step's error boundary takes the error), unless the step had ended already (complete_when held),
        when the failure is recorded and nothing more."""
        error = f"item {o.step.item} of step {o.step.step_id!r} failed: {o.error}"
        if conn.execute(self.q.for_each.fail_own, {"iid": o.step.instance_id, "step": o.step.step_id,
                                                    "rnd": o.step.round, "error": error,
                                                    "etype": _error_type(o)}).rowcount:
            return True
        batch.event(o.step.instance_id, "step.item_failed_after_its_step", {"error": o.error}, o.step.id)
        batch.close(o.step.instance_id)
        return False

    def _item_finished(self, conn: Connection, o: Outcome, batch: _Batch) -> None:
        """A for_each item settled: count its step down, start the next pending item."""
        model = batch.definitions[o.step.instance_id].steps[o.step.step_id].model
        woke, ready = self.q.for_each.item_finished(conn, o.step, model.complete_when is not None,
                                                    model.max_parallel is not None)
        batch.made_ready += len(ready) + woke
        for ready_id in ready:
            batch.event(o.step.instance_id, "step.ready", None, ready_id)

    def _cancel_items(self, conn: Connection, o: Outcome, batch: _Batch, reason: str | None = None) -> None:
        """The items not finished are cancelled: complete_when held with cancel_remaining, or (`reason`) an
        item's error went to the step's error boundary."""
        key = {"iid": o.step.instance_id, "step": o.step.step_id, "rnd": o.step.round}
        ids = list(conn.execute(self.q.for_each.open_items, key).scalars())
        stopped = self.q.stopper.cancel_steps(
            conn, reason or f"complete_when of {o.step.step_id!r} held (cancel_remaining)", batch.event, rows=ids)
        batch.close(o.step.instance_id, len(stopped))

    def _park(self, conn: Connection, o: Outcome, batch: _Batch) -> None:
        if o.expand is not None:
            step = batch.definitions[o.step.instance_id].steps[o.step.step_id]
            count, ready = self.q.for_each.expand(conn, o, step.type, step.model)
            batch.close(o.step.instance_id, -count)
            batch.event(o.step.instance_id, "step.expanded", {"items": count}, o.step.id)
            for ready_id in ready:
                batch.made_ready += 1
                batch.event(o.step.instance_id, "step.ready", None, ready_id)
            return
        params = {"sid": o.step.id, "token": o.step.lease_token, "input": o.input}
        if o.step.item is None and o.step.items_left is not None:  # a gather found items still open
            conn.execute(self.q.for_each.park_again, {**params, "seen": o.step.items_left})
            batch.event(o.step.instance_id, "step.waiting", {"items_left": o.step.items_left}, o.step.id)
            return
        params.update(backend=o.backend, execution=o.execution)
        if o.wake_in is not None:
            conn.execute(self.q.park_timed, {**params, "wake_in": o.wake_in})
        else:
            conn.execute(self.q.park, params)
        payload: dict[str, Any] = {"wake_in_s": o.wake_in}
        if o.execution:
            payload["execution"] = o.execution
        batch.event(o.step.instance_id, "step.waiting", payload, o.step.id)

    def _defer(self, conn: Connection, o: Outcome, batch: _Batch) -> None:
        """Nothing ran (the agent's queue was full): ready again after the delay, no attempt spent."""
        conn.execute(self.q.defer, {"sid": o.step.id, "token": o.step.lease_token, "error": o.error,
                                    "delay": o.retry_delay, "backend": o.backend})
        batch.event(o.step.instance_id, "step.deferred", {"attempt": o.step.attempt, "reason": o.error,
                                                          "retry_after_s": o.retry_delay}, o.step.id)

    def _retry(self, conn: Connection, o: Outcome, batch: _Batch) -> None:
        conn.execute(self.q.retry, {"sid": o.step.id, "token": o.step.lease_token, "error": o.error,
                                    "delay": o.retry_delay, "cost": o.cost_usd, "tin": o.tokens_in,
                                    "tout": o.tokens_out, "restart": o.restart})
        batch.event(o.step.instance_id, "step.retry_scheduled",
                    {"attempt": o.step.attempt, "error": o.error, "delay_s": o.retry_delay}, o.step.id)
        batch.spend(o.step.instance_id, o.cost_usd)  # a failed attempt may still have cost money

    def _account(self, conn: Connection, batch: _Batch, ending: set[int]) -> None:
        """Add up closed steps and cost per instance; finish the instances with no open step left (but
        those an `end` step finishes, with its name)."""
        touched = sorted(set(batch.closed) | set(batch.cost))
        if not touched:
            return
        self.q.account_many.executemany(
            conn, [{"iid": i, "closed": batch.closed.get(i, 0), "cost": batch.cost.get(i, 0.0)} for i in touched])
        closing = sorted(batch.closed)
        if not closing:
            return
        done = [row.id for row in conn.execute(self.q.instance_state, {"iids": closing})
                if row.open_steps == 0 and row.status == "running" and row.id not in ending]
        if not done:
            return
        outputs = self._leaf_outputs(conn, done, batch)
        # Nothing is open in them: no step to stop, one statement for all of them.
        self.q.stopper.complete_all(conn, [(i, outputs[i]) for i in done], batch.event)
        for instance_id in done:
            self._after_finish(conn, instance_id, InstanceStatus.COMPLETED, batch)

    def _leaf_outputs(self, conn: Connection, done: list[int], batch: _Batch) -> dict[int, dict[str, Any]]:
        """The instances' outputs: the output of each completed step that has no children (its latest round)."""
        leaves = {sid for i in done for sid, step in batch.definitions[i].steps.items() if not step.children}
        outputs: dict[int, dict[str, Any]] = {i: {} for i in done}
        for row in conn.execute(self.q.leaf_outputs, {"iids": done, "leaves": sorted(leaves)}):
            if not batch.definitions[row.instance_id].steps[row.step_id].children:
                outputs[row.instance_id][row.step_id] = row.output
        return outputs

    def _end_instance(self, conn: Connection, instance_id: int, step_id: str, batch: _Batch) -> None:
        """An `end` step completed: the instance completes now; what is still open is cancelled."""
        outputs = self._leaf_outputs(conn, [instance_id], batch)[instance_id]
        self._finished(conn, instance_id, InstanceStatus.COMPLETED, batch, outputs=outputs,
                       reason=f"ended by step {step_id!r}")

    def _fail_instance(self, conn: Connection, instance_id: int, error: str, batch: _Batch) -> None:
        self._finished(conn, instance_id, InstanceStatus.FAILED, batch, error=error,
                       cause=batch.failures.get(instance_id))

    def _finished(self, conn: Connection, instance_id: int, status: InstanceStatus, batch: _Batch, *,
                  outputs: Any = None, error: str | None = None, reason: str | None = None,
                  cause: dict[str, Any] | None = None) -> None:
        if self.q.stopper.finish_instance(conn, instance_id, status, batch.event, outputs=outputs, error=error,
                                          reason=reason, cause=cause):
            self._after_finish(conn, instance_id, status, batch)

    def _after_finish(self, conn: Connection, instance_id: int, status: InstanceStatus, batch: _Batch) -> None:
        """An instance ended in this batch: report it, and load what its output actions read."""
        batch.progress.finished_instances.append((instance_id, status.value))
        definition = batch.definitions[instance_id]
        actions = definition.on_success if status is InstanceStatus.COMPLETED else definition.on_failure
        self._actions(conn, instance_id, definition, actions, batch)

    def _actions(self, conn: Connection, instance_id: int, definition: CompiledDefinition,
                 actions: list[tuple[Action, Template]], batch: _Batch) -> None:
        """Load what the output actions' templates read; the worker renders them after the commit
        (never inside a transaction) and carries them out (flowdb/actions.py)."""
        if actions:
            context = template_context(conn, instance_id, definition)
            failure = batch.failures.get(instance_id)
            if failure is not None:  # on_failure's `error`: type, message and step; alone, the instance's error
                context["error"] = ErrorView(failure)
            batch.progress.actions.append(DueActions(instance_id, definition, actions, context))


def _error_type(o: Outcome) -> str | None:
    """A failure's type (an agent's exception class, StepTimeout...; StepFailed when none was given)."""
    return (o.error_type or "StepFailed") if o.kind == "failed" else None


# Built once (a statement built per call costs more than its execution on SQLite).
_CONTEXT_INSTANCE = select(I.c.inputs, I.c.process_name, I.c.version, I.c.status).where(I.c.id == bindparam("iid"))
# Every round of the steps' own rows (not for_each items), oldest first: the latest round wins.
_CONTEXT_STEPS = select(S.c.step_id, S.c.status, S.c.output, S.c.error, S.c.error_type, S.c.cost_usd, S.c.attempt,
                        S.c.round).where(
    S.c.instance_id == bindparam("iid"), S.c.item.is_(None)).order_by(S.c.round)
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
    steps: dict[str, StepView] = {}
    for row in rows:  # oldest round first: a later round replaces it, unless that round has not begun
        if row.status == "pending" and row.step_id in steps:  # a loop's next round, not started
            continue
        # A failed step's error is its message as text, with .type and .message (what an error handler reads).
        error = ErrorView(type=row.error_type or "StepFailed", message=row.error, text=row.error) \
            if row.status == "failed" and row.error is not None else row.error
        steps[row.step_id] = StepView.of({"id": row.step_id, "status": row.status, "output": row.output,
                                          "error": error, "cost": row.cost_usd, "attempt": row.attempt,
                                          "visit": row.round})
    return {"inputs": instance.inputs or {}, "steps": steps,
            "process": {"name": instance.process_name, "version": instance.version, "instance_id": instance_id,
                        "status": instance.status}}
