"""Pausing and resuming an instance: its open rows held out of the claim, then given back.

A paused instance stays `running` with `paused_at` set. Its pending, ready and waiting rows get
`paused`, which takes them out of the claimable index: no worker claims them, the claim costs the
same however many rows are paused, and their claimable times stay (a timer's due time, a retry's
backoff, an approval's reminder), so they are claimed as due once the instance resumes. Two kinds of
rows go on: a step running when the pause came finishes and is recorded (a dead worker's run of it
is taken over, as for any instance), and an agent task whose platform execution is under way keeps
polling it (it holds its agent's slot). What they settle or start is held in turn: every batch of
outcomes holds the open rows of the paused instances it touched (`hold`), in its transaction, so a
row a step leaves (a retry, a parked approval, a loop's new round, a for_each's items) is held too.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import BindParameter, Connection, bindparam, false, select, true, update

from flowdb.db.clock import Clock
from flowdb.db.tables import process_instances, step_instances
from flowdb.engine.status import InstanceStatus, StepStatus, sql_in, word
from flowdb.engine.stop import Record

S, I = step_instances, process_instances  # noqa: E741
HELD = (StepStatus.PENDING, StepStatus.READY, StepStatus.WAITING)


class Pauser:
    def __init__(self, dialect_name: str) -> None:
        clock = Clock(dialect_name)
        iids: BindParameter[list[int]] = bindparam("iids", expanding=True)
        iid: BindParameter[int] = bindparam("iid")
        # Open rows not running and not polling a platform execution (those go on: see the module's doc).
        self.hold_rows = update(S).where(
            S.c.instance_id.in_(iids), sql_in("step_instances.status", HELD), S.c.agent_execution.is_(None),
            ~S.c.paused).values(paused=true())
        self.free_rows = update(S).where(S.c.instance_id == iid, S.c.paused).values(paused=false())
        self.paused_among = select(I.c.id).where(I.c.id.in_(iids), I.c.paused_at.is_not(None))
        self.mark = (update(I).where(I.c.id == iid, I.c.status == word(InstanceStatus.RUNNING),
                                     I.c.paused_at.is_(None))
                     .values(paused_at=clock.now, paused_by=bindparam("by")))
        self.unmark = (update(I).where(I.c.id == iid, I.c.paused_at.is_not(None))
                       .values(paused_at=None, paused_by=None))

    def pause(self, conn: Connection, instance_id: int, by: str, reason: str, record: Record) -> bool:
        """Pause a running instance (the caller holds its row lock on PostgreSQL); False if it was not
        running or was paused already."""
        if not conn.execute(self.mark, {"iid": instance_id, "by": by[:200]}).rowcount:
            return False
        self.hold(conn, [instance_id])
        record(instance_id, "instance.paused", {"by": by, "reason": reason})
        return True

    def resume(self, conn: Connection, instance_id: int, by: str, record: Record) -> bool:
        """Resume a paused instance: its held rows are claimable again (as due); False if it was not paused."""
        if not conn.execute(self.unmark, {"iid": instance_id}).rowcount:
            return False
        freed = conn.execute(self.free_rows, {"iid": instance_id}).rowcount
        record(instance_id, "instance.resumed", {"by": by, "steps": freed})
        return True

    def hold(self, conn: Connection, instance_ids: Iterable[int]) -> None:
        ids = sorted(set(instance_ids))
        if ids:
            conn.execute(self.hold_rows, {"iids": ids})

    def paused(self, conn: Connection, instance_ids: Iterable[int]) -> list[int]:
        ids = sorted(set(instance_ids))
        return list(conn.execute(self.paused_among, {"iids": ids}).scalars()) if ids else []
