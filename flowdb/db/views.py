"""The reporting views: one file per view in sql/ (shipped as flowdb._sql), recreated after migrations.

Views are never frozen inside a migration: `flowdb db upgrade` drops them before the migrations run
(a migration may rebuild a table a view reads) and creates them again from today's files once the
schema is at the head revision. Each file holds a header comment and one `CREATE VIEW name AS ...`
named like the file; a view that reads another one is created after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from sqlalchemy import Connection

# Views earlier releases created and today's files no longer define: dropped as well.
RETIRED: tuple[str, ...] = ()

_CREATE = re.compile(r"^CREATE\s+VIEW\s+(\w+)\s+AS\s", re.IGNORECASE | re.MULTILINE)
_NO_PARAMETERS = {"no_parameters": True}  # the SQL runs as written: '%' and ':' are plain text


@dataclass(frozen=True)
class View:
    name: str
    sql: str  # the CREATE VIEW statement, without the header comment
    header: str  # the comment above it: what a row is, what each column means
    depends_on: tuple[str, ...]


@cache
def load_views() -> tuple[View, ...]:
    """Every view in sql/, each after the views it reads."""
    found: dict[str, tuple[str, str, str]] = {}  # name -> (statement, header, body after AS)
    for resource in files("flowdb._sql").iterdir():
        if not resource.name.endswith(".sql"):
            continue
        text = resource.read_text(encoding="utf-8")
        matches = list(_CREATE.finditer(text))
        stem = resource.name.removesuffix(".sql")
        if len(matches) != 1 or matches[0].group(1) != stem:
            raise ValueError(f"sql/{resource.name} must hold exactly one CREATE VIEW {stem} AS ...")
        header = "\n".join(line.removeprefix("--").removeprefix(" ")
                           for line in text[:matches[0].start()].strip().splitlines())
        statement = text[matches[0].start():].strip().removesuffix(";").rstrip()
        found[stem] = (statement, header, text[matches[0].end():])
    ordered: list[View] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if any(view.name == name for view in ordered):
            return
        if name in path:
            raise ValueError(f"the views in sql/ read each other in a cycle: {' -> '.join((*path, name))}")
        sql, header, body = found[name]
        reads = tuple(sorted(other for other in found if other != name and re.search(rf"\b{other}\b", body)))
        for other in reads:
            visit(other, (*path, name))
        ordered.append(View(name, sql, header, reads))

    for name in sorted(found):
        visit(name, ())
    return tuple(ordered)


def view_names() -> list[str]:
    return [view.name for view in load_views()]


def drop_views(connection: Connection) -> None:
    """Drop every flowdb view (readers before what they read); absent ones are fine."""
    for name in [*reversed(view_names()), *RETIRED]:
        connection.exec_driver_sql(f"DROP VIEW IF EXISTS {name}", execution_options=_NO_PARAMETERS)


def stale_views(connection: Connection) -> list[str]:
    """The views missing, or (on SQLite, which keeps each view's text as written) not as today's files
    write them: what an upgrade of flowdb that changed a file but added no migration leaves behind."""
    found: dict[str, str | None]  # name -> its CREATE VIEW text, where the database keeps it as written
    if connection.dialect.name == "sqlite":
        found = {name: sql for name, sql in connection.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'view'")}
    else:
        found = {name: None for (name,) in connection.exec_driver_sql(
            "SELECT viewname FROM pg_views WHERE schemaname = current_schema()")}
    return [view.name for view in load_views()
            if view.name not in found or found[view.name] not in (None, view.sql)]


def create_views(connection: Connection) -> None:
    """(Re)create every view from today's files, in the current transaction."""
    drop_views(connection)
    for view in load_views():
        connection.exec_driver_sql(view.sql, execution_options=_NO_PARAMETERS)
