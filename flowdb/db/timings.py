"""Step timings, written by the statements that move the timestamps they come from (migration 0006).

`queued_ms` is how long a step's latest attempt waited for a worker (started_at - ready_at), set
when the attempt is claimed; `run_ms` how long it ran (finished_at - started_at), set when it
completes or fails. Both are whole milliseconds, NULL until then, and NULL again when the step goes
back to ready or pending. Beside each is its bucket: the value cut to three significant digits,
coded to sort like the values (under 1,000: the value; from 1,000: digits * 1000 + the first three
digits, so 12,345 is 5123). The indexes on (definition_id, step_id, bucket, value) let
v_step_stats find a percentile by counting index entries instead of sorting every value.

The engine writes them rather than the database generating them: PostgreSQL prepares a generated
column's expression again for every statement that writes the row, which took a quarter of a
millisecond a step; here they are part of statements prepared once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Integer, Text, case, cast, func, literal_column, update
from sqlalchemy.sql.elements import ColumnElement

from flowdb.db.clock import Clock
from flowdb.db.tables import step_instances as S

TIMING_COLUMNS = ("queued_ms", "queued_bucket", "run_ms", "run_bucket")

# For a step going back to ready or pending: its next attempt has neither yet.
CLEARED: dict[str, Any] = dict.fromkeys(TIMING_COLUMNS)


def bucket(ms: ColumnElement[Any]) -> ColumnElement[Any]:
    """`ms` cut to three significant digits, as a number that sorts like `ms`."""
    # Constants are written into the SQL, not bound: the hot statements run with plain values only.
    one: ColumnElement[int] = literal_column("1")
    three: ColumnElement[int] = literal_column("3")
    thousand: ColumnElement[int] = literal_column("1000")
    first_three = cast(func.substr(cast(ms, Text), one, three), Integer)
    return case((ms < thousand, ms), else_=func.length(cast(ms, Text)) * thousand + first_three)


def timing(name: str, ms: ColumnElement[Any]) -> dict[str, ColumnElement[Any]]:
    """The values of `<name>_ms` and `<name>_bucket` for an UPDATE."""
    return {f"{name}_ms": ms, f"{name}_bucket": bucket(ms)}


def refresh_timings(conn: Connection) -> None:
    """Compute every step row's timings from its timestamps, by the rules the engine writes them
    with: for rows written by other means (an import of history, a test's fixture)."""
    clock = Clock(conn.dialect.name)
    claimed = S.c.status.notin_(["pending", "ready"]) & (S.c.started_at >= S.c.ready_at)
    ran = S.c.status.in_(["completed", "failed"]) & (S.c.started_at >= S.c.ready_at)
    queued = case((claimed, clock.milliseconds_between(S.c.ready_at, S.c.started_at)))
    run = case((ran, clock.milliseconds_between(S.c.started_at, S.c.finished_at)))
    conn.execute(update(S).values(**timing("queued", queued), **timing("run", run)))
