"""What every flowdb command shares: the --db and --agents options, opening the database, errors."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from flowdb.agents.registry import AgentRegistry, find_agents_file
from flowdb.db import migrate
from flowdb.db.connectivity import Outage
from flowdb.db.engine import database_unavailable, make_engine
from flowdb.db.problems import describe, misconfigured
from flowdb.errors import DefinitionError, FlowdbError
from flowdb.settings import load_settings

db_option = click.option("--db", "db_url", envvar="FLOWDB_DATABASE_URL", default=None,
                         help="Database URL (else FLOWDB_DATABASE_URL, else sqlite:///flowdb.sqlite3).")
create_option = click.option("--create", is_flag=True,
                             help="Create the SQLite database file if it does not exist (else that is an error).")
agents_option = click.option("--agents", "agents_file", default=None,
                             help="Agents file (else FLOWDB_AGENTS, else agents.yaml beside the process file).")


# The database URL the command opened (password hidden), for the one-line error if it fails.
_opened: list[str] = []


def engine_for(db_url: str | None) -> Engine:
    """The engine for the configured database (not opened yet); its URL is kept for error messages."""
    engine = make_engine(load_settings(database_url=db_url).database_url)
    _opened[:] = [engine.url.render_as_string(hide_password=True)]
    return engine


def open_database(db_url: str | None, *, migrate_sqlite: bool = True, wait: bool = False,
                  create: bool = False, offers_create: bool = False) -> Engine:
    """The engine for the configured database, checked to be at the current schema. With `wait` (the
    long-running commands: worker, serve), a database that does not answer yet is waited for, with
    back-off and one log line, instead of being an error (but not a URL that is wrong). A SQLite file
    that does not exist is an error unless `create` (a mistyped path must not start an empty database);
    `offers_create` says the command has a --create option, for the message."""
    engine = engine_for(db_url)
    if not create:
        refuse_missing_sqlite(engine, offers_create)
    if wait:
        _wait_until_it_answers(engine)
    if engine.dialect.name == "sqlite" and migrate_sqlite:
        migrate.ensure_current(engine)  # the embedded default migrates itself on first use
    elif migrate.current_revision(engine) != migrate.HEAD:
        raise FlowdbError(f"the database at {engine.url.render_as_string()} is not at the current schema; "
                          "run: flowdb db upgrade --db URL")
    return engine


def refuse_missing_sqlite(engine: Engine, offers_create: bool = False) -> None:
    """Raise when the engine is SQLite on a file that does not exist: opening it would create it empty."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.query.get("uri"):
        return
    path = Path(url.database).resolve()
    if path.exists():
        return
    where = f"cannot use the database at {url.render_as_string(hide_password=True)}"
    if not path.parent.is_dir():
        raise FlowdbError(f"{where}: the folder {path.parent} does not exist; create the folder or fix the path "
                          "in --db / FLOWDB_DATABASE_URL")
    create = "`flowdb db upgrade`" + (" or this command's --create" if offers_create else "")
    raise FlowdbError(f"{where}: there is no file {path} (only `db upgrade`, `run` and --create make one); "
                      f"fix the path in --db / FLOWDB_DATABASE_URL, or create the database with {create}")


def _wait_until_it_answers(engine: Engine) -> None:
    outage = Outage(logging.getLogger("flowdb"), f"the database at {engine.url.render_as_string()}")
    while True:
        try:
            with engine.connect():
                break
        except DBAPIError as exc:
            if not database_unavailable(exc) or misconfigured(exc):
                raise
            time.sleep(outage.failed(exc))
    outage.recovered()


def load_agents(agents_file: str | None, process_file: str | None) -> AgentRegistry:
    path = find_agents_file(agents_file, process_file)
    return AgentRegistry.from_file(path) if path else AgentRegistry.empty()


class FlowdbGroup(click.Group):
    """Print flowdb's own errors and database errors as one line (exit 1), never as tracebacks, unless
    `flowdb --debug` (or FLOWDB_DEBUG=1) asks for them."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlowdbError as exc:
            click.echo(f"error: {exc}" if not isinstance(exc, DefinitionError) else str(exc), err=True)
            sys.exit(1)
        except DBAPIError as exc:
            if ctx.params.get("debug") or os.environ.get("FLOWDB_DEBUG", "") not in ("", "0"):
                raise
            click.echo(f"error: {describe(exc, _opened[0] if _opened else None)}", err=True)
            sys.exit(1)
