"""Engines for a database URL: the one place that knows SQLite from PostgreSQL connection set-up."""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from flowdb.errors import FlowdbError

SQLITE_BUSY_TIMEOUT_MS = 60_000


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
        return create_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True)
    raise FlowdbError(f"unsupported database {parsed.get_backend_name()!r}; use sqlite:/// or postgresql://")


def _sqlite_engine(url: str) -> Engine:
    # A small pool of file connections suits SQLite; :memory: is per connection, so useless to a
    # worker fleet and refused.
    if ":memory:" in url or url.rstrip("/") == "sqlite:":
        raise FlowdbError("an in-memory SQLite database cannot be shared; use sqlite:///FILE")
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
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

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


__all__ = ["is_sqlite", "make_engine", "normalize_url"]
