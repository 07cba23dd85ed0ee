"""Hot statements run on the driver's cursor: written as Core, compiled once, executed with plain values.

SQLAlchemy's per-execution work (cache lookup, parameter processing per row, result wrapping) costs
more than SQLite's own execution of these statements (HOTPATH.md: Core ~17-30 µs a statement
against ~3 µs raw). The statements that run for every step are compiled once per dialect here
and executed on the DBAPI cursor of the caller's connection, inside the caller's transaction.
Values must be driver-ready: JSON is passed as text (json.dumps), times are computed in SQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, cast

import orjson
from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


class DriverStatement:
    """A Core statement compiled on first use for the connection's dialect, then run on the cursor."""

    def __init__(self, statement: ClauseElement, column_keys: Sequence[str] | None = None) -> None:
        self.statement = statement
        self.column_keys = list(column_keys) if column_keys else None
        self._dialect: str | None = None
        self._sql = ""
        self._order: tuple[str, ...] | None = None
        self._getter: Callable[[Mapping[str, Any]], Any] | None = None
        self._fixed: dict[str, Any] = {}  # values written into the statement itself (e.g. `x=None`)

    def _compile(self, dialect: Dialect) -> str:
        if self._dialect != dialect.name:
            compiled = cast(SQLCompiler, self.statement.compile(dialect=dialect, column_keys=self.column_keys))
            # qmark (SQLite) wants a tuple in the order the parameters appear; pyformat (psycopg) a dict.
            self._order = tuple(compiled.positiontup or ()) if compiled.positional else None
            if self._order:  # itemgetter builds the tuple in C (a row per step: this is hot)
                getter = itemgetter(*self._order)
                self._getter = getter if len(self._order) > 1 else (lambda row: (getter(row),))
            self._fixed = {compiled.bind_names[bind]: bind.effective_value
                           for bind in compiled.binds.values() if not bind.required}
            self._sql = compiled.string
            self._dialect = dialect.name
        return self._sql

    def _values(self, row: Mapping[str, Any]) -> Any:
        if self._fixed:
            row = {**self._fixed, **row}
        if self._getter is not None:
            return self._getter(row)
        return () if self._order is not None else row

    def execute(self, conn: Connection, row: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run once; return the rows it returns (RETURNING), or [] when it returns none."""
        sql = self._compile(conn.dialect)
        values = self._values(row)
        cursor = conn.connection.cursor()
        try:
            cursor.execute(sql, values)
            return list(cursor.fetchall()) if cursor.description else []
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrapped(conn, cursor, sql, values, exc) from exc
        finally:
            cursor.close()

    def executemany(self, conn: Connection, rows: Iterable[Mapping[str, Any]]) -> None:
        sql = self._compile(conn.dialect)
        values = [self._values(row) for row in rows]
        if not values:
            return
        cursor = conn.connection.cursor()
        try:
            cursor.executemany(sql, values)
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrapped(conn, cursor, sql, values, exc) from exc
        finally:
            cursor.close()


def _wrapped(conn: Connection, cursor: Any, sql: str, values: Any, exc: Any) -> StatementError:
    """The driver's error as SQLAlchemy's (IntegrityError, OperationalError, ...), so callers handle
    errors from these statements exactly as from any other (busy, deadlock, lost connection)."""
    invalidated = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
    if invalidated:
        conn.invalidate(exc)
    error: StatementError = DBAPIError.instance(sql, values, exc, conn.dialect.loaded_dbapi.Error,
                                                connection_invalidated=invalidated, dialect=conn.dialect)
    return error


def as_json(value: Any) -> str | None:
    """A JSON column's value as the driver takes it (None stays SQL NULL).

    orjson: the hot path writes about five JSON values a step, and json.dumps costs ~6 µs each.
    Values it cannot encode natively (Decimal, sets, ...) are written as their str(). Raises
    TypeError for what cannot be JSON at all (integers past 64 bits, NaN handling aside)."""
    if value is None:
        return None
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def from_json(value: Any, *, as_text: bool) -> Any:
    """A JSON column read raw: SQLite gives text (`as_text`), psycopg the decoded value (which may be a
    string itself: it must not be decoded again)."""
    return json.loads(value) if as_text and isinstance(value, str) else value
