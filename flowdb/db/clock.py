"""The database's clock in SQL. Leases, retries and timers compare against it, never a worker's.

The clock can be shifted (`set_offset`, or FLOWDB_CLOCK_OFFSET_SECONDS in a worker's environment):
every statement built afterwards reads "now" as the database's time plus the offset, and `utcnow()`
gives the same for Python. Tests use it to make a timer fire or a lease expire without sleeping: a
worker whose clock runs an hour ahead sees an hour's timers due. Offset 0 (the default) writes the
plain SQL.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, literal_column
from sqlalchemy.sql.elements import ColumnElement

# SQLite keeps timestamps as text; this format sorts like time and is what SQLAlchemy reads back.
_SQLITE_FORMAT = "'%Y-%m-%d %H:%M:%f000'"


_offset = float(os.environ.get("FLOWDB_CLOCK_OFFSET_SECONDS", "0") or 0)


def set_offset(seconds: float) -> None:
    """Shift the engine's clock for the statements built from now on (tests and simulations)."""
    global _offset
    _offset = float(seconds)


def offset() -> float:
    return _offset


def utcnow() -> datetime:
    """Python's view of the engine's clock (with the offset)."""
    now = datetime.now(UTC)
    return now + timedelta(seconds=_offset) if _offset else now


class Clock:
    """`now` and `now + seconds` as SQL expressions for one dialect (shifted by the offset, if any)."""

    def __init__(self, dialect_name: str, *, shifted: bool = True) -> None:
        """`shifted=False`: the database's own time whatever the offset (for facts about processes
        that other processes and the views compare with CURRENT_TIMESTAMP, like worker registrations)."""
        self.sqlite = dialect_name == "sqlite"
        self.offset = _offset if shifted else 0.0
        shift = f"{self.offset:+.6f} seconds"
        if self.sqlite:
            modifier = f", '{shift}'" if self.offset else ""
            self._now_sql = f"'now'{modifier}"
            self.now: ColumnElement[object] = literal_column(f"strftime({_SQLITE_FORMAT}, {self._now_sql})")
        else:
            self._now_sql = f"(statement_timestamp() + interval '{shift}')" if self.offset \
                else "statement_timestamp()"
            self.now = literal_column(self._now_sql)

    def plus(self, seconds: ColumnElement[Any]) -> ColumnElement[object]:
        """now + a number of seconds given as an SQL expression (a bound parameter, usually)."""
        if self.sqlite:
            from sqlalchemy import func

            if self.offset:
                seconds = seconds + literal_column(repr(self.offset))
            return func.strftime(literal_column(_SQLITE_FORMAT), literal_column("'now'"),
                                 func.printf(literal_column("'%+.6f seconds'"), seconds))
        return literal_column(self._now_sql) + seconds * literal_column("interval '1 second'")

    def milliseconds_between(self, start: ColumnElement[Any], end: ColumnElement[Any] | None = None
                           ) -> ColumnElement[int]:
        """Whole milliseconds from timestamp `start` to `end` (default: now); NULL if `end` is before
        `start` (a clock that went backwards)."""
        from sqlalchemy import BigInteger, case, cast, extract, func

        if self.sqlite:
            later = func.julianday(literal_column(self._now_sql) if end is None else end)
            elapsed = (later - func.julianday(start)) * literal_column("86400000.0")
        else:
            elapsed = extract("epoch", (literal_column(self._now_sql) if end is None else end) - start
                              ) * literal_column("1000")
        return case(((self.now if end is None else end) >= start, cast(func.round(elapsed), BigInteger)))

    @classmethod
    def of(cls, engine: Engine) -> Clock:
        return cls(engine.dialect.name)
