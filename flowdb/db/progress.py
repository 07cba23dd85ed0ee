"""Recording outcomes: one transaction per batch, fenced by lease tokens.

For each outcome the step's own row is updated only if this worker still holds its lease; then
its out-edges are marked and its children counted down (`pending_parents`). A child whose count
reaches 0 becomes ready when at least one parent completed, and is skipped otherwise (dead-path
elimination, which cascades). The instance row counts open steps; the update that brings it to 0
finishes the instance. On PostgreSQL the instance rows are locked first, in id order, so
concurrent completions of one instance (a fan-in) serialize and never deadlock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BindParameter, Connection, Update, bindparam, case, literal, literal_column, select, update

from flowdb.db.clock import Clock
from flowdb.db.tables import events, process_instances, step_edges, step_instances
from flowdb.definitions import CompiledDefinition
from flowdb.errors import TemplateError
from flowdb.expressions import StepView
from flowdb.outcomes import Outcome

log = logging.getLogger("flowdb.progress")
S, I, E = step_instances, process_instances, step_edges  # noqa: E741
OPEN = "('pending', 'ready', 'running', 'waiting')"


def _lit(word: str) -> Any:
    return literal_column(f"'{word}'")


@dataclass
class Progress:
    """What a batch of outcomes changed, for the caller to log and to wake other workers."""

    late: list[Outcome] = field(default_factory=list)
    made_ready: int = 0
    finished_instances: list[tuple[int, str]] = field(default_factory=list)
    action_logs: list[tuple[int, str, str]] = field(default_factory=list)  # (instance, level, message)


class ProgressStatements:
    def __init__(self, dialect_name: str) -> None:
        clock = Clock(dialect_name)
        self.clock = clock
        self.lock_instances = (
            select(I.c.id).where(I.c.id.in_(bindparam("ids", expanding=True))).order_by(I.c.id).with_for_update()
            if dialect_name == "postgresql" else None
        )
        fenced = (S.c.id == bindparam("sid"), S.c.lease_token == bindparam("token"), S.c.status == _lit("running"))
        release_lease = {"lease_owner": None, "lease_token": None, "lease_expires_at": None}
        self.complete: Update = update(S).where(*fenced).values(
            status=bindparam("status"), output=bindparam("output"), input=bindparam("input"),
            cost_usd=S.c.cost_usd + bindparam("cost"), tokens_in=S.c.tokens_in + bindparam("tin"),
            tokens_out=S.c.tokens_out + bindparam("tout"), error=bindparam("error"),
            finished_at=clock.now, claimable_at=None, **release_lease)
        self.retry: Update = update(S).where(*fenced).values(
            status=_lit("ready"), error=bindparam("error"), ready_at=clock.plus(bindparam("delay")),
            claimable_at=clock.plus(bindparam("delay")), cost_usd=S.c.cost_usd + bindparam("cost"),
            tokens_in=S.c.tokens_in + bindparam("tin"), tokens_out=S.c.tokens_out + bindparam("tout"),
            **release_lease)
        self.park: Update = update(S).where(*fenced).values(
            status=_lit("waiting"), input=bindparam("input"), claimable_at=bindparam("wake_at"), **release_lease)
        self.park_timed: Update = update(S).where(*fenced).values(
            status=_lit("waiting"), input=bindparam("input"), claimable_at=clock.plus(bindparam("wake_in")),
            **release_lease)
        instance_id: BindParameter[int] = bindparam("iid")
        children: BindParameter[list[str]] = bindparam("children", expanding=True)
        settled = S.c.pending_parents - literal(1) == literal(0)
        completed_after = S.c.completed_parents + bindparam("taken")
        # One statement counts every child down and moves those with no pending parent left:
        # to ready when a parent completed, to skipped when every parent was skipped.
        self.count_down: Update = (
            update(S).where(S.c.instance_id == instance_id, S.c.step_id.in_(children))
            .values(
                pending_parents=S.c.pending_parents - literal(1),
                completed_parents=completed_after,
                status=case((settled & (completed_after > literal(0)), _lit("ready")),
                            (settled, _lit("skipped")), else_=S.c.status),
                ready_at=case((settled & (completed_after > literal(0)), clock.now), else_=S.c.ready_at),
                claimable_at=case((settled & (completed_after > literal(0)), clock.now), else_=S.c.claimable_at),
                finished_at=case((settled & (completed_after <= literal(0)), clock.now), else_=S.c.finished_at),
            )
            .returning(S.c.id, S.c.step_id, S.c.status, S.c.pending_parents)
        )
        self.mark_edges: Update = (
            update(E).where(E.c.instance_id == instance_id, E.c.from_step == bindparam("parent"),
                            E.c.to_step.in_(children))
            .values(state=bindparam("edge_state"))
        )
        self.account: Update = (
            update(I).where(I.c.id == instance_id)
            .values(open_steps=I.c.open_steps - bindparam("closed"), cost_usd=I.c.cost_usd + bindparam("cost"))
            .returning(I.c.open_steps, I.c.status)
        )
        self.finish_instance: Update = (
            update(I).where(I.c.id == instance_id, I.c.status == _lit("running"))
            .values(status=bindparam("status"), outputs=bindparam("outputs"), error=bindparam("error"),
                    finished_at=clock.now, open_steps=literal(0))
        )
        self.cancel_open_steps: Update = (
            update(S).where(S.c.instance_id == instance_id, literal_column(f"step_instances.status IN {OPEN}"))
            .values(status=_lit("cancelled"), finished_at=clock.now, claimable_at=None, **release_lease)
            .returning(S.c.id, S.c.step_id)
        )
        self.insert_event = events.insert().values(created_at=clock.now)


class ProgressWriter:
    """Applies outcomes in the caller's transaction."""

    def __init__(self, statements: ProgressStatements) -> None:
        self.q = statements

    def apply(self, conn: Connection, outcomes: list[Outcome], definitions: dict[int, CompiledDefinition]) -> Progress:
        progress = Progress()
        if self.q.lock_instances is not None:
            conn.execute(self.q.lock_instances, {"ids": sorted({o.step.instance_id for o in outcomes})}).all()
        events_out: list[dict[str, Any]] = []
        for outcome in outcomes:
            definition = definitions[outcome.step.definition_id]
            self._apply_one(conn, outcome, definition, progress, events_out)
        if events_out:
            conn.execute(self.q.insert_event, events_out)
        return progress

    def _apply_one(self, conn: Connection, o: Outcome, definition: CompiledDefinition, progress: Progress,
                   events_out: list[dict[str, Any]]) -> None:
        step = o.step
        base = {"sid": step.id, "token": step.lease_token}
        usage = {"cost": o.cost_usd, "tin": o.tokens_in, "tout": o.tokens_out}

        def event(kind: str, payload: dict[str, Any] | None = None, step_instance_id: int | None = step.id) -> None:
            events_out.append({"instance_id": step.instance_id, "step_instance_id": step_instance_id,
                               "type": kind, "payload": payload})

        if o.kind == "waiting":
            if o.wake_in is not None:
                result = conn.execute(self.q.park_timed, {**base, "input": o.input, "wake_in": o.wake_in})
            else:
                result = conn.execute(self.q.park, {**base, "input": o.input, "wake_at": None})
            if result.rowcount == 0:
                self._late(o, progress, event)
                return
            event("step.waiting", {"wake_in_s": o.wake_in})
            return

        retrying = o.kind == "failed" and o.retryable and step.attempt < step.max_attempts
        if retrying:
            result = conn.execute(self.q.retry, {**base, **usage, "error": o.error, "delay": o.retry_delay})
            if result.rowcount == 0:
                self._late(o, progress, event)
                return
            event("step.retry_scheduled", {"attempt": step.attempt, "error": o.error, "delay_s": o.retry_delay})
            if o.cost_usd:  # a failed attempt may still have cost money
                self._account(conn, step.instance_id, 0, o.cost_usd, definition, progress, event)
            return

        result = conn.execute(self.q.complete, {**base, **usage, "status": o.kind, "output": o.output,
                                                "input": o.input, "error": o.error})
        if result.rowcount == 0:
            self._late(o, progress, event)
            return
        payload: dict[str, Any] = {"attempt": step.attempt}
        if o.error:
            payload["error"] = o.error
        if o.cost_usd:
            payload["cost_usd"] = o.cost_usd
        event(f"step.{o.kind}", payload)
        if o.kind == "failed":
            self._fail_instance(conn, step.instance_id, f"step {step.step_id!r} failed: {o.error}",
                                definition, progress, event)
            return
        closed = 1 + self._settle(conn, step.instance_id, step.step_id, o.kind == "completed", o.taken,
                                  definition, progress, event)
        self._account(conn, step.instance_id, closed, o.cost_usd, definition, progress, event)

    def _late(self, o: Outcome, progress: Progress, event: Any) -> None:
        progress.late.append(o)
        event("step.late_result_dropped", {"attempt": o.step.attempt, "outcome": o.kind})

    def _settle(self, conn: Connection, instance_id: int, step_id: str, completed: bool,
                taken: frozenset[str] | None, definition: CompiledDefinition, progress: Progress,
                event: Any) -> int:
        """Count the children of a settled step down; cascade skips. Returns steps skipped."""
        children = definition.steps[step_id].children
        if not children:
            return 0
        chosen = [c for c in children if completed and (taken is None or c in taken)]
        passed = [c for c in children if c not in chosen]
        skipped_now: list[str] = []
        for group, is_taken in ((chosen, True), (passed, False)):
            if not group:
                continue
            conn.execute(self.q.mark_edges, {"iid": instance_id, "parent": step_id, "children": group,
                                             "edge_state": "taken" if is_taken else "skipped"})
            rows = conn.execute(self.q.count_down, {"iid": instance_id, "children": group,
                                                    "taken": 1 if is_taken else 0}).all()
            for row in rows:
                if row.pending_parents != 0:
                    continue
                if row.status == "ready":
                    progress.made_ready += 1
                    event("step.ready", None, row.id)
                elif row.status == "skipped":
                    event("step.skipped", {"reason": "no parent completed"}, row.id)
                    skipped_now.append(row.step_id)
        total = len(skipped_now)
        for child in skipped_now:
            total += self._settle(conn, instance_id, child, False, None, definition, progress, event)
        return total

    def _account(self, conn: Connection, instance_id: int, closed: int, cost: float,
                 definition: CompiledDefinition, progress: Progress, event: Any) -> None:
        row = conn.execute(self.q.account, {"iid": instance_id, "closed": closed, "cost": cost}).one()
        if row.open_steps == 0 and row.status == "running" and closed:
            outputs = self._final_outputs(conn, instance_id, definition)
            conn.execute(self.q.finish_instance, {"iid": instance_id, "status": "completed",
                                                  "outputs": outputs, "error": None})
            event("instance.completed", None, None)
            progress.finished_instances.append((instance_id, "completed"))
            self._actions(conn, instance_id, definition, definition.on_success, progress, event)

    def _fail_instance(self, conn: Connection, instance_id: int, error: str, definition: CompiledDefinition,
                       progress: Progress, event: Any) -> None:
        for row in conn.execute(self.q.cancel_open_steps, {"iid": instance_id}).all():
            event("step.cancelled", {"reason": "the instance failed"}, row.id)
        result = conn.execute(self.q.finish_instance, {"iid": instance_id, "status": "failed",
                                                       "outputs": None, "error": error})
        if result.rowcount:
            event("instance.failed", {"error": error}, None)
            progress.finished_instances.append((instance_id, "failed"))
            self._actions(conn, instance_id, definition, definition.on_failure, progress, event)

    def _final_outputs(self, conn: Connection, instance_id: int, definition: CompiledDefinition) -> dict[str, Any]:
        """The instance's outputs: the output of each completed step that nothing runs after."""
        leaves = [sid for sid, step in definition.steps.items() if not step.children]
        rows = conn.execute(select(S.c.step_id, S.c.output).where(
            S.c.instance_id == instance_id, S.c.step_id.in_(leaves), S.c.status == _lit("completed"))).all()
        return {row.step_id: row.output for row in rows}

    def _actions(self, conn: Connection, instance_id: int, definition: CompiledDefinition,
                 actions: list[tuple[str, Any]], progress: Progress, event: Any) -> None:
        if not actions:
            return
        context = template_context(conn, instance_id, definition)
        for level, template in actions:
            try:
                message = template.render(context)
            except TemplateError as exc:
                message, level = f"output action failed to render: {exc}", "error"
            event("action.log", {"level": level, "message": message}, None)
            progress.action_logs.append((instance_id, level, message))


def template_context(conn: Connection, instance_id: int, definition: CompiledDefinition,
                     only_steps: frozenset[str] | None = None) -> dict[str, Any]:
    """The names templates see: inputs, process and steps.<id> (loaded from the database)."""
    instance = conn.execute(select(I.c.inputs, I.c.process_name, I.c.version, I.c.status)
                            .where(I.c.id == instance_id)).one()
    query = select(S.c.step_id, S.c.status, S.c.output, S.c.error, S.c.cost_usd, S.c.attempt).where(
        S.c.instance_id == instance_id)
    if only_steps is not None:
        if not only_steps:
            query = query.where(literal(False))
        else:
            query = query.where(S.c.step_id.in_(sorted(only_steps)))
    steps = {row.step_id: StepView.of({"id": row.step_id, "status": row.status, "output": row.output,
                                       "error": row.error, "cost": row.cost_usd, "attempt": row.attempt})
             for row in conn.execute(query)}
    return {"inputs": instance.inputs or {}, "steps": steps,
            "process": {"name": instance.process_name, "version": instance.version, "instance_id": instance_id,
                        "status": instance.status}}

