"""What every flowdb command shares: the --db and --agents options, opening the database, errors."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from flowdb.errors import DefinitionError, FlowdbError

# Start-up time: every test and script runs `flowdb` afresh, so this module (and the cli modules) import
# only click at the top; SQLAlchemy, the settings, the agents file's backends load in the commands that
# use them.
if TYPE_CHECKING:
    from sqlalchemy import Engine

    from flowdb.agents.registry import AgentRegistry

db_option = click.option("--db", "db_url", envvar="FLOWDB_DATABASE_URL", default=None,
                         help="Database URL (else FLOWDB_DATABASE_URL, else sqlite:///flowdb.sqlite3).")
create_option = click.option("--create", is_flag=True,
                             help="Create the SQLite database file if it does not exist (else that is an error).")
agents_option = click.option("--agents", "agents_file", default=None,
                             help="Agents file (else FLOWDB_AGENTS, else agents.yaml beside the process file).")


class LazyChoice(click.Choice[str]):
    """A click.Choice whose words `load` returns when first needed (the option given, or its command's
    --help shown), so the module that keeps them (and SQLAlchemy behind it) is not imported to build
    the command line."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:  # no super().__init__: it reads them
        self.case_sensitive = True
        self._load = load

    def __getattr__(self, attribute: str) -> Any:  # only attributes __init__ did not set get here
        if attribute != "choices":
            raise AttributeError(attribute)
        self.choices = tuple(self._load())
        return self.choices


# The database URL the command opened (password hidden), for the one-line error if it fails.
_opened: list[str] = []


def engine_for(db_url: str | None) -> Engine:
    """The engine for the configured database (not opened yet); its URL is kept for error messages."""
    from flowdb.db.engine import make_engine
    from flowdb.settings import load_settings

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
    from flowdb.db import migrate

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
    from sqlalchemy.exc import DBAPIError

    from flowdb.db.connectivity import Outage
    from flowdb.db.engine import database_unavailable
    from flowdb.db.problems import misconfigured

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
    from flowdb.agents.registry import AgentRegistry, find_agents_file

    path = find_agents_file(agents_file, process_file)
    return AgentRegistry.from_file(path) if path else AgentRegistry.empty()


class FlowdbGroup(click.Group):
    """Print flowdb's own errors and database errors as one line (exit 1), never as tracebacks, unless
    `flowdb --debug` (or FLOWDB_DEBUG=1) asks for them.

    Commands other packages register under the `flowdb.commands` entry point (api/ adds `serve`) join
    when a command that is not flowdb's own is named, or all are listed (--help): flowdb itself never
    imports them, and flowdb's own commands do not pay for finding and importing them."""

    _plugins_added = False

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self._add_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def _add_plugin_commands(self) -> None:
        if self._plugins_added:
            return
        self._plugins_added = True
        from importlib.metadata import entry_points

        for entry in entry_points(group="flowdb.commands"):
            self.add_command(entry.load(), entry.name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlowdbError as exc:
            click.echo(f"error: {exc}" if not isinstance(exc, DefinitionError) else str(exc), err=True)
            sys.exit(1)
        except Exception as exc:
            if not _database_error(exc) or ctx.params.get("debug") \
                    or os.environ.get("FLOWDB_DEBUG", "") not in ("", "0"):
                raise
            from flowdb.db.problems import describe

            click.echo(f"error: {describe(exc, _opened[0] if _opened else None)}", err=True)
            sys.exit(1)


def _database_error(exc: BaseException) -> bool:
    """A DBAPIError, without importing SQLAlchemy to ask (a command that never loaded it raised none)."""
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    return sqlalchemy_exc is not None and isinstance(exc, sqlalchemy_exc.DBAPIError)
