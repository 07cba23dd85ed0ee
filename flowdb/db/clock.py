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

    @classmethod
    def of(cls, engine: Engine) -> Clock:
        return cls(engine.dialect.name)
