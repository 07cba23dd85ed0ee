"""The database's clock in SQL. Leases, retries and timers compare against it, never a worker's."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, literal_column
from sqlalchemy.sql.elements import ColumnElement

# SQLite keeps timestamps as text; this format sorts like time and is what SQLAlchemy reads back.
_SQLITE_FORMAT = "'%Y-%m-%d %H:%M:%f000'"


class Clock:
    """`now` and `now + seconds` as SQL expressions for one dialect."""

    def __init__(self, dialect_name: str) -> None:
        self.sqlite = dialect_name == "sqlite"
        if self.sqlite:
            self.now: ColumnElement[object] = literal_column(f"strftime({_SQLITE_FORMAT}, 'now')")
        else:
            self.now = literal_column("statement_timestamp()")

    def plus(self, seconds: ColumnElement[Any]) -> ColumnElement[object]:
        """now + a number of seconds given as an SQL expression (a bound parameter, usually)."""
        if self.sqlite:
            from sqlalchemy import func

            return func.strftime(literal_column(_SQLITE_FORMAT), literal_column("'now'"),
                                 func.printf(literal_column("'%+.6f seconds'"), seconds))
        return literal_column("statement_timestamp()") + seconds * literal_column("interval '1 second'")

    def milliseconds_between(self, start: ColumnElement[Any], end: ColumnElement[Any] | None = None
                           ) -> ColumnElement[int]:
        """Whole milliseconds from timestamp `start` to `end` (default: now); NULL if `end` is before
        `start` (a clock that went backwards)."""
        from sqlalchemy import BigInteger, case, cast, extract, func

        if self.sqlite:
            later = func.julianday(literal_column("'now'") if end is None else end)
            elapsed = (later - func.julianday(start)) * literal_column("86400000.0")
        else:
            elapsed = extract("epoch", (literal_column("statement_timestamp()") if end is None else end) - start
                              ) * literal_column("1000")
        return case(((self.now if end is None else end) >= start, cast(func.round(elapsed), BigInteger)))

    @classmethod
    def of(cls, engine: Engine) -> Clock:
        return cls(engine.dialect.name)
