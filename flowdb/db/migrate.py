"""Schema upgrades and downgrades through Alembic, using the scripts shipped inside the package.

Alembic is imported only when a migration runs: every command checks the schema revision, and
that check is one query, not an Alembic start-up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

from flowdb.db import views
from flowdb.errors import FlowdbError

if TYPE_CHECKING:
    from alembic.config import Config

# The newest revision in migrations/versions (a test checks it against Alembic's own view).
HEAD = "0016"


def _config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(files("flowdb._migrations")))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to `revision`; at the head, (re)create the reporting views from sql/ (db/views.py)."""
    from alembic import command

    config = _config()
    with migrating(engine) as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade to `revision`; the views go first (they are recreated by the next upgrade)."""
    from alembic import command

    config = _config()
    with migrating(engine) as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


@contextmanager
def migrating(engine: Engine) -> Iterator[Connection]:
    """The one transaction migrations run in, whoever runs them (flowdb, or `alembic` by hand).

    The reporting views are dropped first (a migration may rebuild a table a view reads) and made
    again from today's files if the schema ends at the head. On SQLite, foreign keys are checked once
    at the end rather than statement by statement: SQLite changes most of a table by rebuilding it
    (copy, drop, rename), and dropping a table other tables point at fails while the checks are on.
    That is the procedure of SQLite's ALTER TABLE documentation; the pragma only takes effect
    outside a transaction, so it is set on the driver's connection before the transaction begins.
    """
    with engine.connect() as connection:
        driver = connection.connection.driver_connection if connection.dialect.name == "sqlite" else None
        if driver is not None:
            driver.execute("PRAGMA foreign_keys = OFF")
        try:
            with connection.begin():
                dangling_before = _dangling_rows(connection)
                views.drop_views(connection)
                yield connection
                dangling = _dangling_rows(connection) - dangling_before
                if dangling:
                    raise FlowdbError(f"the migration would leave {len(dangling)} rows pointing at rows that do not "
                                      f"exist (one: {min(dangling)}); nothing was changed")
                if _revision(connection) == HEAD:
                    views.create_views(connection)
        finally:
            if driver is not None:
                driver.execute("PRAGMA foreign_keys = ON")


def _dangling_rows(connection: Connection) -> set[tuple[object, ...]]:
    """(table, rowid, parent table, key index) of each row whose foreign key finds no row (SQLite)."""
    if connection.dialect.name != "sqlite":
        return set()  # PostgreSQL checks every statement, DDL included
    return {tuple(row) for row in connection.exec_driver_sql("PRAGMA foreign_key_check")}


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return _revision(connection)


def _revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    found = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return str(found) if found is not None else None


def head_revision() -> str | None:
    """Alembic's view of the newest revision (imports Alembic; use HEAD on hot paths)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def ensure_current(engine: Engine) -> None:
    """Migrate a database that is behind, and recreate views that are missing or, on SQLite (which
    keeps a view's text as written), not as today's files write them (used by the embedded default
    on first use). On PostgreSQL a changed view file takes `flowdb db upgrade`."""
    if current_revision(engine) != HEAD:
        upgrade(engine)
        return
    with engine.connect() as connection:
        stale = views.stale_views(connection)
    if stale:
        with engine.begin() as connection:
            views.create_views(connection)
