"""Definitions: every process and version, its YAML highlighted, its diagram, and a start form made
from the process's declared inputs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import YamlLexer
from sqlalchemy import Engine, func, select
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from flowdb.db.instances import DefinitionCache, StartRequest, start_instances
from flowdb.db.tables import process_definitions as D
from flowdb.definitions import CompiledDefinition
from flowdb.errors import InputError, NotFound

from .diagram import graph_of
from .web import UiCall

MAX_INT = 2**31 - 1
FORMATTER = HtmlFormatter(cssclass="highlight", linenos="table", wrapcode=True)


@cache
def highlight_css() -> str:
    """Pygments' stylesheet for the highlighted YAML (served as /ui/static/highlight.css)."""
    return str(FORMATTER.get_style_defs(".highlight"))


async def highlight_stylesheet(request: Request) -> Response:
    return Response(highlight_css(), media_type="text/css", headers={"Cache-Control": "max-age=3600"})


@dataclass
class VersionView:
    name: str
    version: int
    definition_id: int
    content_hash: str
    created_at: Any
    source_html: str  # Pygments' markup: every character of the YAML escaped by it
    versions: list[Any]
    definition: CompiledDefinition
    graph: dict[str, Any]


def _list(engine: Engine) -> list[Any]:
    query = (select(D.c.name, func.max(D.c.version).label("latest"), func.count().label("versions"),
                    func.max(D.c.created_at).label("updated_at")).group_by(D.c.name).order_by(D.c.name))
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def _latest(engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        latest = conn.execute(select(func.max(D.c.version)).where(D.c.name == name)).scalar()
    if latest is None:
        raise NotFound(f"process {name!r} is not deployed")
    return int(latest)


def _version(engine: Engine, definitions: DefinitionCache, name: str, version: int) -> VersionView:
    with engine.connect() as conn:
        row = conn.execute(select(D).where(D.c.name == name, D.c.version == version)).first()
        if row is None:
            raise NotFound(f"process {name!r} has no version {version}")
        versions = list(conn.execute(select(D.c.version, D.c.created_at).where(D.c.name == name)
                                     .order_by(D.c.version.desc())).all())
        definition = definitions.get(conn, row.id)
    return VersionView(name, version, row.id, row.content_hash, row.created_at,
                       highlight(row.source, YamlLexer(), FORMATTER), versions, definition, graph_of(definition))


async def definitions_page(call: UiCall) -> Response:
    return call.render("definitions.html", title="Definitions", rows=await call.db(_list, call.reader))


async def latest_version(call: UiCall) -> Response:
    name = call.request.path_params["name"]
    version = await call.db(_latest, call.reader, name)
    return RedirectResponse(f"/ui/definitions/{name}/{version}", status_code=303)


def _version_number(call: UiCall) -> int:
    version = int(call.request.path_params["version"])
    if version > MAX_INT:
        raise NotFound(f"process {call.request.path_params['name']!r} has no version {version}")
    return version


async def version_page(call: UiCall, values: dict[str, str] | None = None, error: str | None = None,
                       status: int = 200) -> Response:
    name = call.request.path_params["name"]
    view = await call.db(_version, call.reader, call.request.app.state.definitions, name, _version_number(call))
    return call.render("definition.html", status, title=f"{name} v{view.version}", view=view,
                       inputs=view.definition.process.inputs, values=values or {}, error=error)


def _start(engine: Engine, definitions: DefinitionCache, definition_id: int, version: int,
           given: dict[str, str]) -> int:
    with engine.begin() as conn:
        definition = definitions.get(conn, definition_id)
        [(instance_id, _)] = start_instances(conn, definition_id, version, definition, [StartRequest(given, None)],
                                             trigger="ui", from_text=True, pinned_version=True)
    return instance_id


async def start(call: UiCall) -> Response:
    name = call.request.path_params["name"]
    version = _version_number(call)
    definitions: DefinitionCache = call.request.app.state.definitions
    view = await call.db(_version, call.reader, definitions, name, version)
    # Each declared input is a field `input.NAME`; an empty field is left out (its default applies).
    values = {key: call.field(f"input.{key}") for key in view.definition.process.inputs}
    given = {key: value for key, value in values.items() if value.strip() != ""}  # blank: its default
    try:
        instance_id = await call.db(_start, call.engine, definitions, view.definition_id, version, given)
    except InputError as exc:
        return await version_page(call, values, exc.in_form, 422)
    call.wakeups.notify(workers=True, events=True)
    return RedirectResponse(f"/ui/instances/{instance_id}", status_code=303)


