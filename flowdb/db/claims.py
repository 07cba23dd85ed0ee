"""The claim protocol's statements: claim, heartbeat, release. Built once per dialect.

Claim is one `UPDATE ... WHERE id IN (SELECT ... LIMIT n [FOR UPDATE SKIP LOCKED]) RETURNING ...`.
It takes ready steps whose ready time has come, running steps whose lease expired (their worker
died) and waiting steps whose wake-up time has come, all through one partial index on claimable_at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, Connection, Update, bindparam, case, literal, literal_column, select, update
from sqlalchemy.sql.elements import ColumnClause

from flowdb.db.clock import Clock
from flowdb.db.driver import DriverStatement, as_json, from_json
from flowdb.db.tables import CLAIMABLE, events, step_instances
from flowdb.db.timings import CLEARED, timing

S = step_instances
RUNNING: ColumnClause[str] = literal_column("'running'")
READY: ColumnClause[str] = literal_column("'ready'")


@dataclass(frozen=True)
class Claimed:
    """A step this worker holds a lease on."""

    id: int
    instance_id: int
    definition_id: int
    step_id: str
    type: str
    attempt: int
    max_attempts: int
    lease_token: str
    input: Any
    woken: bool  # claimed from `waiting` (a timer or deadline fired), not a fresh attempt
    expired_lease: str | None  # set when this claim took over a dead worker's lease


class ClaimStatements:
    def __init__(self, dialect_name: str, *, one_instance: bool = False) -> None:
        clock = Clock(dialect_name)
        self.clock = clock
        lease: BindParameter[float] = bindparam("lease_seconds")
        due = (
            select(S.c.id)
            .where(literal_column(f"step_instances.status IN {CLAIMABLE}"), S.c.claimable_at <= clock.now)
            .order_by(S.c.claimable_at, S.c.id)
            .limit(bindparam("n"))
        )
        if one_instance:  # `flowdb run` works its own instance only
            due = due.where(S.c.instance_id == bindparam("iid"))
        if dialect_name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        was_waiting = S.c.status == literal_column("'waiting'")
        # A step taken over from a dead worker became claimable when that lease expired, so its
        # queue time counts from then, not from its first claim (db/timings.py).
        taken_over = S.c.status == RUNNING
        became_ready = case((taken_over, S.c.claimable_at), else_=S.c.ready_at)
        queued = timing("queued", clock.milliseconds_between(became_ready))
        self.claim: Update = (
            update(S)
            .where(S.c.id.in_(due.scalar_subquery()))
            .values(
                status=RUNNING,
                lease_owner=bindparam("owner"),
                lease_token=bindparam("token"),
                lease_expires_at=clock.plus(lease),
                claimable_at=clock.plus(lease),
                heartbeat_at=clock.now,
                # A woken step (timer, approval) keeps the start of its attempt: the wait is part of it.
                started_at=case((was_waiting, S.c.started_at), else_=clock.now),
                ready_at=became_ready,
                **{column: case((was_waiting, S.c[column]), else_=value) for column, value in queued.items()},
                attempt=S.c.attempt + case((was_waiting, literal(0)), else_=literal(1)),
                error=case(
                    (S.c.status == RUNNING, literal("lease of worker ") + S.c.lease_owner
                     + literal(" expired (it stopped heartbeating)")),
                    (was_waiting, S.c.error),
                    else_=None,
                ),
            )
            .returning(S.c.id, S.c.instance_id, S.c.definition_id, S.c.step_id, S.c.type, S.c.attempt,
                       S.c.max_attempts, S.c.input, S.c.error)
        )
        self.claim_raw = DriverStatement(self.claim)
        # RETURNING shows the new row, so a reclaim is told apart by the note the claim writes into
        # `error`, and a woken step by the `wake` state its handler parked in `input`.
        self.heartbeat = (
            update(S)
            .where(S.c.id == bindparam("sid"), S.c.lease_token == bindparam("token"), S.c.status == RUNNING)
            .values(lease_expires_at=clock.plus(lease), claimable_at=clock.plus(lease), heartbeat_at=clock.now)
        )
        self.release = (
            update(S)
            .where(S.c.id == bindparam("sid"), S.c.lease_token == bindparam("token"), S.c.status == RUNNING)
            .values(status=READY, lease_owner=None, lease_token=None, lease_expires_at=None,
                    claimable_at=clock.now, ready_at=clock.now,
                    attempt=S.c.attempt - 1, **CLEARED)
        )
        self.insert_event = events.insert().values(created_at=clock.now)
        self.insert_events = DriverStatement(self.insert_event, ["instance_id", "step_instance_id", "type", "payload"])

    def claim_steps(self, conn: Connection, owner: str, token: str, n: int, lease_seconds: float,
                    instance_id: int | None = None) -> list[Claimed]:
        """Claim up to n steps in the current transaction; write a step.started event for each."""
        params: dict[str, Any] = {"owner": owner, "token": token, "n": n, "lease_seconds": lease_seconds}
        if instance_id is not None:
            params["iid"] = instance_id
        claimed = []
        started = []
        for sid, iid, definition_id, step_id, step_type, attempt, max_attempts, raw_input, error \
                in self.claim_raw.execute(conn, params):
            expired = error if error and error.startswith("lease of worker ") else None
            state = from_json(raw_input)
            woken = isinstance(state, dict) and "wake" in state
            claimed.append(Claimed(sid, iid, definition_id, step_id, step_type, attempt, max_attempts, token,
                                   state, woken, expired))
            payload: dict[str, Any] = {"attempt": attempt, "worker": owner}
            if expired:
                payload["reclaimed"] = True
            started.append({"instance_id": iid, "step_instance_id": sid,
                            "type": "step.woken" if woken else "step.started", "payload": as_json(payload)})
        self.insert_events.executemany(conn, started)
        return claimed

    def heartbeat_steps(self, conn: Connection, held: list[Claimed], lease_seconds: float) -> set[int]:
        """Extend the leases still held; return the ids whose lease this worker lost."""
        lost = set()
        for item in held:
            result = conn.execute(self.heartbeat, {"sid": item.id, "token": item.lease_token,
                                                   "lease_seconds": lease_seconds})
            if result.rowcount == 0:
                lost.add(item.id)
        return lost

    def release_steps(self, conn: Connection, held: list[Claimed]) -> int:
        """Give steps back (worker shutting down): ready again, the attempt not counted."""
        released = 0
        for item in held:
            result = conn.execute(self.release, {"sid": item.id, "token": item.lease_token})
            if result.rowcount:
                released += 1
                conn.execute(self.insert_event, {"instance_id": item.instance_id, "step_instance_id": item.id,
                                                 "type": "step.released", "payload": {"attempt": item.attempt}})
        return released
