"""Engines for a database URL: the one place that knows SQLite from PostgreSQL connection set-up.

Transactions are writers unless asked otherwise. On SQLite every transaction of an engine from
make_engine() is `BEGIN IMMEDIATE`: it takes the write lock at once and waits its turn
(busy_timeout), where a deferred transaction that reads and then writes fails at once with
"database is locked" when another connection wrote in between. Work that only reads goes through
`read_only(engine)`: its transactions are deferred (`BEGIN`, which under WAL never blocks and is
never blocked by the writer) and refuse writes (`PRAGMA query_only`), and on PostgreSQL they are
`READ ONLY` transactions; so a writer can never run deferred by accident, and a reader that tries
to write fails at once with a clear error instead of now and then with a lock error.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from flowdb.errors import FlowdbError

SQLITE_BUSY_TIMEOUT_MS = 60_000
PG_CONNECT_TIMEOUT_SECONDS = 10  # a server that does not answer (a dropped network) fails a connect by then
READ_ONLY = "flowdb_read_only"  # the execution option read_only() sets
_QUERY_ONLY = "flowdb_query_only"  # in a pooled SQLite connection's info: the PRAGMA query_only it has


def normalize_url(url: str) -> str:
    """Accept URLs as people write them: postgres:// and postgresql:// use psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except Exception as exc:  # SQLAlchemy raises ArgumentError with a terse message
        raise FlowdbError(f"bad database URL {url!r}: {exc}; use sqlite:///FILE or postgresql://HOST/DB") from None
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.get_backend_name() == "postgresql":
        # pre-ping: a pooled connection that died with a server restart is replaced at checkout, and a
        # disconnect seen on any connection discards every older one; so work resumes by itself once the
        # server is back (flowdb.db.engine.database_unavailable tells such errors from others).
        connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS}
        return create_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True,
                             connect_args=connect_args)
    raise FlowdbError(f"unsupported database {parsed.get_backend_name()!r}; use sqlite:/// or postgresql://")


def _sqlite_engine(url: str) -> Engine:
    # A small pool of file connections suits SQLite; :memory: is per connection, so useless to a
    # worker fleet and refused.
    if ":memory:" in url or url.rstrip("/") == "sqlite:":
        raise FlowdbError("an in-memory SQLite database cannot be shared; use sqlite:///FILE")
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, record: Any) -> None:
        # Take transaction control away from the driver so every transaction can be IMMEDIATE:
        # a deferred transaction that reads then writes fails at once with "database is locked"
        # when another process writes, while BEGIN IMMEDIATE waits its turn (busy_timeout).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()
        record.info[_QUERY_ONLY] = False

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        reader = bool(connection.get_execution_options().get(READ_ONLY, False))
        info = connection.connection.info
        if info.get(_QUERY_ONLY, False) != reader:  # only when a pooled connection changes sides
            connection.exec_driver_sql(f"PRAGMA query_only = {int(reader)}")
            info[_QUERY_ONLY] = reader
        connection.exec_driver_sql("BEGIN" if reader else "BEGIN IMMEDIATE")

    return engine


def read_only(engine: Engine) -> Engine:
    """`engine` for work that only reads (reports, status, API reads, event-stream polls, listings).

    It shares `engine`'s pool. Its transactions are deferred on SQLite (they neither wait for nor
    hold up writers) and refuse writes on both databases. Calling it on a read-only engine returns
    that engine; making one costs tens of microseconds, so long-lived code keeps the one it made.
    """
    if engine.get_execution_options().get(READ_ONLY):
        return engine
    options: dict[str, Any] = {READ_ONLY: True}
    if engine.dialect.name == "postgresql":
        options["postgresql_readonly"] = True
    return engine.execution_options(**options)


# SQLSTATEs of PostgreSQL refusing work because it is stopping, starting or restarting.
_PG_UNAVAILABLE = {"57P01", "57P02", "57P03", "53300"}  # admin/crash shutdown, cannot connect now, too many clients
_SQLITE_UNAVAILABLE = ("database is locked", "database is busy", "unable to open database file")


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached or is not taking work right now (a server
    stopped or restarting, a dropped connection, a pool with no free connection, SQLite's lock
    held past busy_timeout) rather than that the statement or the data is wrong: trying again later
    may succeed."""
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.OperationalError):
        return str(orig).startswith(_SQLITE_UNAVAILABLE)
    import psycopg  # here, not at the top: a command on SQLite never loads the PostgreSQL driver

    if isinstance(orig, psycopg.Error):
        if orig.sqlstate is None:  # raised by the driver itself: no connection (refused, reset, timed out)
            return isinstance(orig, psycopg.OperationalError)
        return orig.sqlstate.startswith("08") or orig.sqlstate in _PG_UNAVAILABLE
    return False


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


__all__ = ["database_unavailable", "is_sqlite", "make_engine", "normalize_url", "read_only"]
