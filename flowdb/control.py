"""Operator actions on instances that the command line and the HTTP API share: cancel."""

from __future__ import annotations

from sqlalchemy import Engine, insert, select

from flowdb.db.clock import Clock
from flowdb.db.progress import ProgressStatements
from flowdb.db.tables import events, process_instances
from flowdb.errors import FlowdbError, NotFound


class InstanceNotRunning(FlowdbError):
    """The instance already finished (completed, failed or cancelled)."""


def cancel_instance(engine: Engine, instance_id: int, reason: str = "cancelled by an operator") -> list[str]:
    """Cancel a running instance in one transaction: its unfinished steps and pending approvals
    become `cancelled`, their leases are cleared (a worker still running one of its handlers loses
    the lease; its late result is dropped). Returns the ids of the steps that were cancelled."""
    q = ProgressStatements(engine.dialect.name)
    I = process_instances  # noqa: E741
    clock = Clock(engine.dialect.name)
    with engine.begin() as conn:
        lock = select(I.c.status).where(I.c.id == instance_id)
        status = conn.execute(lock.with_for_update() if engine.dialect.name == "postgresql" else lock).scalar()
        if status is None:
            raise NotFound(f"instance {instance_id} does not exist")
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
