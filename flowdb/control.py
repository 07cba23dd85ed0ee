"""Operator actions on instances that the command line and the HTTP API share: cancel, retry a step."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, case, func, insert, literal, literal_column, select, update

from flowdb.db.clock import Clock
from flowdb.db.instances import DefinitionCache
from flowdb.db.progress import ProgressStatements
from flowdb.db.tables import events, process_instances, step_instances
from flowdb.db.timings import CLEARED
from flowdb.errors import FlowdbError, NotFound
from flowdb.models import effective_retry

I, S = process_instances, step_instances  # noqa: E741


def _locked_instance(conn: Connection, instance_id: int) -> Any:
    """The instance's status and definition, its row locked on PostgreSQL (as the workers' writers
    lock it), so an operator action and a step's outcome serialize."""
    query = select(I.c.status, I.c.definition_id).where(I.c.id == instance_id)
    row = conn.execute(query.with_for_update() if conn.dialect.name == "postgresql" else query).first()
    if row is None:
        raise NotFound(f"instance {instance_id} does not exist")
    return row


class InstanceNotRunning(FlowdbError):
    """The instance already finished (completed, failed or cancelled)."""


def cancel_instance(engine: Engine, instance_id: int, reason: str = "cancelled by an operator") -> list[str]:
    """Cancel a running instance in one transaction: its unfinished steps and pending approvals
    become `cancelled`, their leases are cleared (a worker still running one of its handlers loses
    the lease; its late result is dropped). Returns the ids of the steps that were cancelled."""
    q = ProgressStatements(engine.dialect.name)
    clock = Clock(engine.dialect.name)
    with engine.begin() as conn:
        status = _locked_instance(conn, instance_id).status
        if status != "running":
            raise InstanceNotRunning(f"instance {instance_id} is already {status}; only running instances can be "
                                     "cancelled")
        rows: list[dict[str, object]] = []
        cancelled = []
        for row in conn.execute(q.cancel_open_steps, {"iid": instance_id}).all():
            cancelled.append(row.step_id)
            rows.append({"step_instance_id": row.id, "type": "step.cancelled", "payload": {"reason": reason}})
        for approval_id in q.approvals.cancel_for_instance(conn, instance_id):
            rows.append({"step_instance_id": None, "type": "approval.cancelled",
                         "payload": {"approval_id": approval_id, "reason": reason}})
        conn.execute(q.finish_instance, {"iid": instance_id, "status": "cancelled", "outputs": None, "error": reason})
        rows.append({"step_instance_id": None, "type": "instance.cancelled", "payload": {"reason": reason}})
        conn.execute(insert(events).values(instance_id=instance_id, created_at=clock.now), rows)
    return cancelled


class StepNotRetryable(FlowdbError):
    """The step is not failed, or its instance cannot run again."""


def retry_step(engine: Engine, instance_id: int, step_id: str) -> str:
    """Make a failed step ready again, with a fresh set of attempts, and its failed instance running
    again from that step on: the steps the failure cancelled go back to pending (parents still
    open) or ready. Returns the instance's status afterwards."""
    clock = Clock(engine.dialect.name)
    with engine.begin() as conn:
        found = _locked_instance(conn, instance_id)
        step = conn.execute(select(S.c.id, S.c.status, S.c.attempt).where(
            S.c.instance_id == instance_id, S.c.step_id == step_id)).first()
        if step is None:
            raise NotFound(f"instance {instance_id} has no step {step_id!r}")
        if step.status != "failed":
            raise StepNotRetryable(f"step {step_id!r} of instance {instance_id} is {step.status}; only failed "
                                   "steps can be retried")
        if found.status not in ("failed", "running"):
            raise StepNotRetryable(f"instance {instance_id} is {found.status}; only failed or running instances "
                                   "can be retried")
        definition = DefinitionCache().get(conn, found.definition_id)
        policy = effective_retry(definition.steps[step_id].model)
        fresh = policy.max_attempts if policy else 1
        conn.execute(update(S).where(S.c.id == step.id).values(
            status=literal_column("'ready'"), max_attempts=S.c.attempt + fresh, error=None, finished_at=None,
            ready_at=clock.now, claimable_at=clock.now, releases=literal(0), **CLEARED))
        rows: list[dict[str, object]] = [{"step_instance_id": step.id, "type": "step.retry_requested",
                                          "payload": {"attempt": step.attempt, "fresh_attempts": fresh}}]
        if found.status == "failed":
            # The failure cancelled the instance's open steps: give them back what they were waiting on.
            restored = conn.execute(
                update(S).where(S.c.instance_id == instance_id, S.c.status == literal_column("'cancelled'"))
                .values(status=case((S.c.pending_parents > literal(0), literal_column("'pending'")),
                                    else_=literal_column("'ready'")),
                        claimable_at=case((S.c.pending_parents > literal(0), None), else_=clock.now),
                        ready_at=case((S.c.pending_parents > literal(0), S.c.ready_at), else_=clock.now),
                        finished_at=None, input=None, **CLEARED)
                .returning(S.c.id, S.c.step_id)).all()
            for row in restored:
                rows.append({"step_instance_id": row.id, "type": "step.restored", "payload": {"reason": "retry"}})
            open_steps = conn.execute(select(func.count()).where(
                S.c.instance_id == instance_id,
                literal_column("step_instances.status IN ('pending', 'ready', 'running', 'waiting')"))).scalar_one()
            conn.execute(update(I).where(I.c.id == instance_id).values(
                status=literal_column("'running'"), error=None, finished_at=None, outputs=None, open_steps=open_steps))
            rows.append({"step_instance_id": None, "type": "instance.resumed", "payload": {"from_step": step_id}})
        else:
            conn.execute(update(I).where(I.c.id == instance_id).values(open_steps=I.c.open_steps + literal(1)))
        conn.execute(insert(events).values(instance_id=instance_id, created_at=clock.now), rows)
    return "running"
