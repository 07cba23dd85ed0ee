"""Alembic environment: runs on a connection handed over by flowdb, or on the URL in alembic.ini."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from flowdb.db.engine import make_engine
from flowdb.db.migrate import migrating
from flowdb.db.tables import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # `alembic` run by hand: the transaction flowdb's own upgrade uses (views dropped and recreated,
    # SQLite's foreign keys checked at the end so that a table can be rebuilt).
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    with migrating(engine) as conn:
        _run(conn)


run_migrations_online()
