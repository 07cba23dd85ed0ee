"""Informed subscriptions: `subscribers: [agent, ...]` on a step sends each of those agents a short
notice through its backend when the step completes.

Delivery is at least once and never holds the process up: the completion's transaction writes one
`agent_notices` row per subscriber (pending); workers that have the agent deliver them in the
background, one at a time (`take` marks the notice as being sent for longer than a send may take,
the send happens outside any transaction, `delivered` or `failed_once` records how it went). A
worker that dies mid-send leaves its notice to be sent again once that mark runs out. A notice that
fails MAX_TRIES times is given up (`status` failed, with the last error); the process never waits
for, or fails because of, a notice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, case, insert, literal, literal_column, select, update

from flowdb.db.clock import Clock
from flowdb.db.tables import agent_notices

N = agent_notices
MAX_TRIES = 8
SEND_TIMEOUT_SECONDS = 120.0  # a send that takes longer is given up (and tried again later)
SENDING_SECONDS = SEND_TIMEOUT_SECONDS + 60.0  # how long a taken notice is left to its worker
MAX_NOTICE = 2000  # characters of the step's output quoted in a notice


@dataclass(frozen=True)
class Pending:
    """A notice a worker took to send."""

    id: int
    instance_id: int
    step_id: str
    agent: str
    message: str
    tries: int


def notice_text(process: str, instance_id: int, step_id: str, output: Any) -> str:
    shown = output if isinstance(output, str) else json.dumps(output, default=str)
    if len(shown) > MAX_NOTICE:
        shown = shown[:MAX_NOTICE] + "…"
    return (f"For your information: step {step_id!r} of process {process!r} (instance {instance_id}) completed. "
            f"Its output:\n{shown}")


class NoticeStatements:
    def __init__(self, dialect_name: str) -> None:
        clock = Clock(dialect_name)
        self.postgres = dialect_name == "postgresql"
        self.add = insert(N).values(status=literal("pending"), tries=literal(0), created_at=clock.now,
                                    next_at=clock.now)
        # Written as the partial index's condition, so SQLite reads the pending notices through it.
        due = (select(N.c.id).where(literal_column("agent_notices.status = 'pending'"), N.c.next_at <= clock.now,
                                    N.c.agent.in_(bindparam("agents", expanding=True)))
               .order_by(N.c.next_at, N.c.id).limit(bindparam("n")))
        if self.postgres:
            due = due.with_for_update(skip_locked=True)
        self.take, self.take_of_instance = (
            update(N).where(N.c.id.in_(query.scalar_subquery()))
            .values(next_at=clock.plus(literal(SENDING_SECONDS)), tries=N.c.tries + 1)
            .returning(N.c.id, N.c.instance_id, N.c.step_id, N.c.agent, N.c.message, N.c.tries)
            for query in (due, due.where(N.c.instance_id == bindparam("iid"))))
        self.delivered = update(N).where(N.c.id == bindparam("nid"), N.c.status == "pending").values(
            status="delivered", delivered_at=clock.now, error=None)
        self.failed_once = update(N).where(N.c.id == bindparam("nid"), N.c.status == "pending").values(
            status=case((N.c.tries >= MAX_TRIES, literal("failed")), else_=literal("pending")),
            error=bindparam("error"), next_at=clock.plus(bindparam("delay")))

    def write(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """The notices of steps that just completed: {instance_id, step_instance_id, step_id, agent, message}."""
        if rows:
            conn.execute(self.add, rows)

    def take_due(self, conn: Connection, agents: list[str], n: int, instance_id: int | None = None) -> list[Pending]:
        """Up to n notices due for these agents (of one instance, for `flowdb run`), marked as being sent."""
        if not agents:
            return []
        params: dict[str, Any] = {"agents": sorted(agents), "n": n}
        if instance_id is None:
            return [Pending(*row) for row in conn.execute(self.take, params)]
        return [Pending(*row) for row in conn.execute(self.take_of_instance, {**params, "iid": instance_id})]

    def record(self, conn: Connection, notice: Pending, error: str | None) -> None:
        if error is None:
            conn.execute(self.delivered, {"nid": notice.id})
        else:
            delay = min(2.0 ** notice.tries, 300.0)
            conn.execute(self.failed_once, {"nid": notice.id, "error": error[:1000], "delay": delay})
