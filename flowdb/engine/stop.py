"""The one way steps and instances stop.

`cancel_steps` cancels open step rows (some of an instance, or all of them): their leases go (a
worker still running one loses it and its late result is dropped), and each step type's `stop`
hook closes its side rows (an approval becomes `cancelled`). `finish_instance` ends a running
instance as completed, failed or cancelled: it cancels what is still open, writes the one
`instance.<status>` event, and says so to the caller, who publishes one wake-up after the commit.
Every door that stops something (a failed step, `end`, a race's `cancel_others`, `flowdb cancel`,
the API) comes through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import BindParameter, Connection, Update, bindparam, false, true, update

from flowdb.db.claims import LEASE_DROPPED
from flowdb.db.clock import Clock
from flowdb.db.tables import process_instances, step_instances
from flowdb.engine.status import OPEN_STEP, InstanceStatus, StepStatus, sql_in, word
from flowdb.steptypes.base import StoppedStep
from flowdb.steptypes.registry import STEP_TYPES, Registry

S, I = step_instances, process_instances  # noqa: E741
# Records an event in the caller's transaction: (instance id, type, payload, step_instance_id).
Record = Callable[..., None]


class Stopper:
    def __init__(self, dialect_name: str, registry: Registry = STEP_TYPES) -> None:
        clock = Clock(dialect_name)
        self.registry = registry
        # A row stopped is no longer held by a pause (what `flowdb retry` gives back runs when claimed).
        cancelled: dict[str, Any] = {"status": word(StepStatus.CANCELLED), "finished_at": clock.now,
                                     "claimable_at": None, "paused": false(), **LEASE_DROPPED}
        returning = (S.c.id, S.c.instance_id, S.c.step_id, S.c.type, S.c.item, S.c.round, S.c.items_total)
        is_open = sql_in("step_instances.status", OPEN_STEP)
        iid: BindParameter[int] = bindparam("iid")
        # The instance stops: its open rows are `halted` too (what `flowdb retry` of a failure gives back).
        self.cancel_open = (update(S).where(S.c.instance_id == iid, is_open).values(**cancelled, halted=true())
                            .returning(*returning))
        self.cancel_rows = (update(S).where(S.c.id.in_(bindparam("sids", expanding=True)), is_open)
                            .values(**cancelled).returning(*returning))
        # The open items of a for_each step whose own row was cancelled.
        self.cancel_items = (update(S).where(S.c.instance_id == iid, S.c.step_id == bindparam("step"),
                                             S.c.round == bindparam("rnd"), S.c.item.is_not(None), is_open)
                             .values(**cancelled).returning(*returning))
        self.finish: Update = (
            update(I).where(I.c.id == iid, I.c.status == word(InstanceStatus.RUNNING))
            .values(status=bindparam("status"), outputs=bindparam("outputs"), error=bindparam("error"),
                    finished_at=clock.now, open_steps=0, paused_at=None, paused_by=None)
        )

    def cancel_steps(self, conn: Connection, reason: str, record: Record, *, instance_id: int | None = None,
                     rows: list[int] | None = None) -> list[StoppedStep]:
        """Cancel the open step rows among `rows`, or every open row of `instance_id`; run their types'
        stop hooks; record a `step.cancelled` event for each. The rows cancelled, in id order."""
        if rows is not None:
            result = list(conn.execute(self.cancel_rows, {"sids": rows}).all()) if rows else []
            for own in [r for r in result if r.item is None and r.items_total is not None]:
                result += conn.execute(self.cancel_items, {"iid": own.instance_id, "step": own.step_id,
                                                           "rnd": own.round}).all()
        else:
            result = list(conn.execute(self.cancel_open, {"iid": instance_id}).all())
        stopped = sorted((StoppedStep(r.id, r.instance_id, r.step_id, r.type, r.item, r.round) for r in result),
                         key=lambda s: s.id)
        by_type: dict[str, list[StoppedStep]] = {}
        for step in stopped:
            record(step.instance_id, "step.cancelled", {"reason": reason}, step.id)
            by_type.setdefault(step.type, []).append(step)
        for type_name, steps in by_type.items():
            step_type = self.registry.get(type_name)
            if step_type is not None:
                step_type.stop(conn, steps, reason, record)
        return stopped

    def complete_all(self, conn: Connection, finished: list[tuple[int, Any]], record: Record) -> None:
        """Complete running instances that have no open step left (their last step just settled), with
        their outputs: one executemany and one `instance.completed` event each. The caller read them
        running in this transaction, their rows locked (PostgreSQL) or the database's writer held (SQLite)."""
        if not finished:
            return
        params = [{"iid": iid, "status": InstanceStatus.COMPLETED.value, "outputs": outputs, "error": None}
                  for iid, outputs in finished]
        conn.execute(self.finish, params)
        for iid, _ in finished:
            record(iid, "instance.completed")

    def finish_instance(self, conn: Connection, instance_id: int, status: InstanceStatus, record: Record, *,
                        error: str | None = None, outputs: Any = None, reason: str | None = None,
                        cause: dict[str, Any] | None = None) -> bool:
        """End a running instance: cancel its open steps, set its status, write its one event (a failure's
        `cause`, the step that failed and how, goes into it). False when it was no longer running
        (nothing is written)."""
        why = reason or error or f"the instance {status.value}"
        self.cancel_steps(conn, why, record, instance_id=instance_id)
        if not conn.execute(self.finish, {"iid": instance_id, "status": status.value, "outputs": outputs,
                                          "error": error}).rowcount:
            return False
        payload: dict[str, Any] | None = None
        if status is InstanceStatus.FAILED:
            payload = {"error": error}
            if cause is not None:
                payload.update(step=cause["step"], error_type=cause["type"])
        elif status is InstanceStatus.CANCELLED:
            payload = {"reason": error}
        elif reason:
            payload = {"reason": reason}
        record(instance_id, f"instance.{status.value}", payload)
        return True
