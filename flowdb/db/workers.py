"""The worker registry: which workers run, and which agents and step types each can serve.

A worker claims only the steps it can serve (db/claims.py filters by its `Capabilities`), so a step
whose agent it lacks waits for a worker that has it instead of failing. It registers when it starts
(a `workers` row, a `worker_serves` row per agent and step type), keeps `expires_at` ahead of the
clock with its heartbeat and marks the row stopped when it stops; a row whose time has passed is a
worker that died. The registry answers what the claim cannot see: the ready steps no running worker
can serve (the view v_unservable_steps) and the agents nobody serves (deploy's warnings).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import BindParameter, Connection, bindparam, column, delete, func, insert, select, table, update

from flowdb.db.clock import Clock
from flowdb.db.tables import worker_serves, workers

W, C = workers, worker_serves
# Registrations that ended this long ago are deleted when a worker starts (they tell nothing more).
FORGET_AFTER_SECONDS = 86400.0

UNSERVABLE = table("v_unservable_steps", column("instance_id"), column("step_id"), column("agent"),
                   column("type"), column("needs"), column("running_workers"), column("step_instance_id"))


@dataclass(frozen=True)
class Capabilities:
    """What a worker can run: steps of these types, and of agent tasks only these agents'."""

    agents: frozenset[str]
    step_types: frozenset[str]
    # Agents with a `concurrency` or `tokens_per_minute` limit, with both (None: no such limit): the
    # claim counts their running steps and their last minute's tokens first.
    limited: tuple[tuple[str, int | None, int | None], ...] = ()

    def rows(self, worker: str) -> list[dict[str, str]]:
        return ([{"worker": worker, "kind": "agent", "name": name} for name in sorted(self.agents)]
                + [{"worker": worker, "kind": "step_type", "name": name} for name in sorted(self.step_types)])


class WorkerRegistry:
    """The registry's statements for one dialect (the clock is the database's)."""

    def __init__(self, dialect_name: str) -> None:
        # Registrations are compared across processes and in the view: the database's own time, never
        # a shifted clock (a worker a day ahead would forget everyone else's).
        clock = Clock(dialect_name, shifted=False)
        self.clock = clock
        lease: BindParameter[float] = bindparam("lease_seconds")
        self._refresh = (update(W).where(W.c.name == bindparam("worker"), W.c.stopped_at.is_(None))
                         .values(expires_at=clock.plus(lease)))
        self._stop = update(W).where(W.c.name == bindparam("worker")).values(stopped_at=clock.now,
                                                                               expires_at=clock.now)
        self._insert = insert(W).values(name=bindparam("worker"), host=bindparam("host"), pid=bindparam("pid"),
                                        instance_id=bindparam("instance_id"), started_at=clock.now,
                                        expires_at=clock.plus(lease))
        self._forget = delete(W).where(W.c.expires_at < clock.plus(bindparam("ago")))

    def register(self, conn: Connection, worker: str, capabilities: Capabilities, lease_seconds: float,
                 instance_id: int | None = None) -> None:
        """Record the worker and what it serves (again, after its row was forgotten); forget old rows."""
        conn.execute(self._forget, {"ago": -FORGET_AFTER_SECONDS})
        conn.execute(delete(W).where(W.c.name == worker))  # a re-registration replaces the old row
        conn.execute(self._insert, {"worker": worker, "host": socket.gethostname(), "pid": os.getpid(),
                                    "instance_id": instance_id, "lease_seconds": lease_seconds})
        conn.execute(insert(C), capabilities.rows(worker))

    def refresh(self, conn: Connection, worker: str, lease_seconds: float) -> bool:
        """Keep the registration alive; False when it is gone (forgotten while the database was away)."""
        return bool(conn.execute(self._refresh, {"worker": worker, "lease_seconds": lease_seconds}).rowcount)

    def stop(self, conn: Connection, worker: str) -> None:
        conn.execute(self._stop, {"worker": worker})


def unservable_agents(conn: Connection, instance_id: int | None = None) -> dict[str, int]:
    """Agents of ready steps that no running worker serves, with how many steps wait for each."""
    query = (select(UNSERVABLE.c.agent, func.count()).where(UNSERVABLE.c.agent.is_not(None))
             .group_by(UNSERVABLE.c.agent).order_by(UNSERVABLE.c.agent))
    if instance_id is not None:
        query = query.where(UNSERVABLE.c.instance_id == instance_id)
    return {agent: count for agent, count in conn.execute(query)}


def unservable_steps(conn: Connection, instance_id: int) -> dict[int, str]:
    """The instance's ready steps no running worker can serve: step row id -> what it waits for, in words."""
    query = select(UNSERVABLE.c.step_instance_id, UNSERVABLE.c.needs, UNSERVABLE.c.running_workers) \
        .where(UNSERVABLE.c.instance_id == instance_id)
    return {sid: f"waits for {needs}: no running worker has it" if running
            else f"waits for a worker with {needs} (no worker is running)"
            for sid, needs, running in conn.execute(query)}


def unserved_agents(conn: Connection, agents: Iterable[str]) -> set[str]:
    """Those of `agents` that no running worker serves (a worker of a `flowdb run` serves only its own
    instance, so it does not count)."""
    wanted = set(agents)
    if not wanted:
        return set()
    clock = Clock(conn.dialect.name, shifted=False)
    query = (select(C.c.name).distinct().join(W, W.c.name == C.c.worker)
             .where(C.c.kind == "agent", C.c.name.in_(sorted(wanted)), W.c.stopped_at.is_(None),
                    W.c.instance_id.is_(None), W.c.expires_at > clock.now))
    return wanted - set(conn.scalars(query))


def quoted(names: Iterable[str]) -> str:
    """`'a', 'b'`: names for a message, sorted."""
    return ", ".join(repr(name) for name in sorted(names))
