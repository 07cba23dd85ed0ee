"""Reading the reporting views (sql/*.sql) for `flowdb report`: filters, order, and values that look
the same whichever database they came from."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, DateTime, literal_column, select, table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ColumnElement, column

from flowdb.db.views import view_names
from flowdb.errors import FlowdbError

# Rows come out in this order: a view's key (a view not listed here: its first column).
ORDER = {
    "v_instance_summary": ("instance_id",),
    "v_step_runs": ("step_instance_id",),
    "v_process_daily": ("day", "process", "version"),
    "v_step_stats": ("process", "step_id"),
    "v_approval_latency": ("approval_id",),
    "v_cost_by_agent": ("day", "agent"),
    "v_dead_letters": ("step_instance_id",),
}
PROCESS_COLUMN = "process"  # --process compares this column, in the views that have it
DAY_COLUMN = "day"  # --since compares this one: a UTC day as 'YYYY-MM-DD' text, the same on both databases
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class ReportError(FlowdbError):
    """A report cannot be made: an unknown view, a bad date, a view missing from the database."""


class FilterError(ReportError):
    """A filter on a column the view does not have."""


@dataclass
class Report:
    view: str
    columns: list[str]
    rows: list[tuple[Any, ...]]  # values normalized by `plain`


def resolve_view(name: str) -> str:
    """The view called `name` (the `v_` prefix may be left out); a clear error naming every view."""
    names = view_names()
    name = name.replace("-", "_")  # `flowdb report dead-letters` reads v_dead_letters
    for candidate in (name, f"v_{name}"):
        if candidate in names:
            return candidate
    raise ReportError(f"no view {name!r}; the views are: {', '.join(names)}")


def parse_day(text: str) -> date:
    """A --since value: YYYY-MM-DD, a real date."""
    try:
        if not _DAY.fullmatch(text):
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise ReportError(f"{text!r} is not a date; write it as YYYY-MM-DD (e.g. 2026-11-23)") from None


def run_report(conn: Connection, view: str, *, process: str | None = None, since: date | None = None,
               limit: int | None = None, sort: str | None = None, descending: bool = False) -> Report:
    """Rows of `view` (a name from resolve_view), filtered, in the view's key order (or by `sort` first)."""
    columns, rows = stream_report(conn, view, process=process, since=since, limit=limit, sort=sort,
                                  descending=descending)
    return Report(view, columns, list(rows))


def stream_report(conn: Connection, view: str, *, process: str | None = None, since: date | None = None,
                  limit: int | None = None, sort: str | None = None, descending: bool = False
                  ) -> tuple[list[str], Iterator[tuple[Any, ...]]]:
    """As run_report, the rows read in batches while they are used (a CSV of a million rows holds a
    thousand at a time); the connection must stay open until they are all read."""
    try:
        columns = list(conn.execute(select(literal_column("*")).select_from(table(view)).limit(0)).keys())
    except DBAPIError as exc:
        raise ReportError(f"cannot read view {view} ({exc.orig}); run: flowdb db upgrade") from None
    # Times come back as timestamps on PostgreSQL and as text on SQLite: typed columns make both datetimes.
    source = table(view, *(column(name, DateTime(timezone=True)) if name.endswith("_at") else column(name)
                           for name in columns))
    query = select(source)
    if process is not None:
        if PROCESS_COLUMN not in columns:
            raise FilterError(f"{view} has no {PROCESS_COLUMN} column, so --process cannot filter it")
        query = query.where(source.c[PROCESS_COLUMN] == process)
    if since is not None:
        if DAY_COLUMN not in columns:
            raise FilterError(f"{view} has no {DAY_COLUMN} column, so --since cannot filter it")
        query = query.where(source.c[DAY_COLUMN] >= since.isoformat())
    keys: list[ColumnElement[Any]] = [source.c[key] for key in ORDER.get(view, (columns[0],))]
    if sort is not None:
        if sort not in columns:
            raise FilterError(f"{view} has no column {sort!r}; its columns are {', '.join(columns)}")
        first = source.c[sort].desc() if descending else source.c[sort].asc()
        # NULLs last either way, the same on both databases.
        keys = [source.c[sort].is_(None), first, *keys]
    query = query.order_by(*keys)
    if limit is not None:
        query = query.limit(limit)
    result = conn.execution_options(yield_per=1000).execute(query)
    return columns, (tuple(plain(value) for value in row) for row in result)


def plain(value: Any) -> Any:
    """One representation per value whatever the database: aware UTC datetimes, floats not Decimals."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, Decimal):
        return float(value)
    return value
