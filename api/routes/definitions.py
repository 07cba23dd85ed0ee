"""Definitions: deploy (YAML body), list, show a process's versions, show one version."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, func, select
from starlette.responses import Response

from flowdb.db.instances import deploy
from flowdb.db.tables import process_definitions
from flowdb.db.workers import unserved_agents
from flowdb.definitions import CompiledDefinition, parse_definition
from flowdb.errors import NotFound
from flowdb.models import AgentTask

from ..body import read_body
from ..convert import utc
from ..endpoints import MAX_INT, Call, Endpoint, Query, json_response
from ..problems import ApiError
from ..schemas import DefinitionDetail, DefinitionList, DefinitionOut, DefinitionSummary, DefinitionVersion

D = process_definitions
YAML_TYPES = {"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain"}


async def post_definition(call: Call) -> Response:
    kind = call.request.headers.get("content-type", "application/yaml").split(";")[0].strip().lower()
    raw = await read_body(call.request, call.settings.api_max_body_bytes)
    if kind not in YAML_TYPES:
        raise ApiError(415, f"send the definition as application/yaml, not {kind}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(422, f"the body is not UTF-8 text ({exc.reason} at byte {exc.start})",
                       kind="invalid-definition") from None
    filename = call.request.query_params.get("filename") or "definition.yaml"
    if len(filename) > 200:
        raise ApiError(422, "filename is longer than 200 characters")
    strict = call.request.query_params.get("strict", "false")
    if strict not in ("true", "false"):
        raise ApiError(422, f"strict must be true or false, not {strict!r}")

    def store(engine: Engine) -> DefinitionOut:
        # Parsing and compiling take seconds for the largest definitions: here, in a thread, never on the
        # event loop. DefinitionError → 422 with FILE:LINE:COL errors.
        definition = parse_definition(text, filename, runnable=True)
        with engine.begin() as conn:
            # The API has no agents file: what it can tell is whether a running worker serves each agent.
            warnings = _unserved_warnings(conn, definition)
            if warnings and strict == "true":
                raise ApiError(422, "; ".join(warnings) + " (deployed nothing: strict=true)", kind="unserved-agents",
                               extra={"errors": warnings})
            deployed = deploy(conn, definition)
            created_at = conn.execute(select(D.c.created_at).where(D.c.id == deployed.id)).scalar_one()
        return DefinitionOut(name=deployed.name, version=deployed.version, content_hash=deployed.content_hash,
                             created_at=utc(created_at), created=deployed.created, warnings=warnings)

    out = await call.db(store, call.engine)
    return json_response(out, 201 if out.created else 200)


def _unserved_warnings(conn: Connection, definition: CompiledDefinition) -> list[str]:
    """A warning per agent of the definition that no running worker serves."""
    users: dict[str, list[str]] = {}
    for step in definition.steps.values():
        if isinstance(step.model, AgentTask):
            users.setdefault(step.model.agent, []).append(step.id)
    def steps(ids: list[str]) -> str:
        return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")

    return [f"no running worker serves agent {agent!r} (steps {steps(users[agent])}): its steps will wait, "
            "ready, until a worker whose agents file defines it starts"
            for agent in sorted(unserved_agents(conn, users))]


async def list_definitions(call: Call) -> Response:
    def load(engine: Engine) -> DefinitionList:
        query = (select(D.c.name, func.max(D.c.version).label("latest"), func.count().label("versions"),
                        func.max(D.c.created_at).label("updated_at"))
                 .group_by(D.c.name).order_by(D.c.name))
        with engine.connect() as conn:
            return DefinitionList(items=[DefinitionSummary(name=r.name, latest_version=r.latest, versions=r.versions,
                                                           updated_at=utc(r.updated_at)) for r in conn.execute(query)])

    return json_response(await call.db(load, call.engine))


async def get_definition(call: Call) -> Response:
    name = call.request.path_params["name"]

    def load(engine: Engine) -> DefinitionDetail:
        with engine.connect() as conn:
            rows = conn.execute(select(D.c.name, D.c.version, D.c.content_hash, D.c.created_at)
                                .where(D.c.name == name).order_by(D.c.version)).all()
        if not rows:
            raise NotFound(f"process {name!r} is not deployed")
        return DefinitionDetail(name=name, latest_version=rows[-1].version, versions=[
            DefinitionOut(name=r.name, version=r.version, content_hash=r.content_hash, created_at=utc(r.created_at),
                          created=True) for r in rows])

    return json_response(await call.db(load, call.engine))


async def get_version(call: Call) -> Response:
    name = call.request.path_params["name"]
    version = call.path_int("version", MAX_INT)

    def load(engine: Engine) -> DefinitionVersion:
        with engine.connect() as conn:
            row = conn.execute(select(D).where(D.c.name == name, D.c.version == version)).first()
        if row is None:
            raise NotFound(f"process {name!r} has no version {version}")
        parsed: dict[str, Any] = row.parsed
        return DefinitionVersion(name=row.name, version=row.version, content_hash=row.content_hash,
                                 created_at=utc(row.created_at), source=row.source, parsed=parsed)

    return json_response(await call.db(load, call.engine))


ENDPOINTS = [
    Endpoint("POST", "/v1/definitions", post_definition, "Deploy a definition (YAML body)", "admin", "definitions",
             raw_body="application/yaml", responses={201: DefinitionOut, 200: DefinitionOut}, errors=(409,),
             query=(Query("filename", {"type": "string", "maxLength": 200},
                          "name used in FILE:LINE:COL error locations (default definition.yaml)"),
                    Query("strict", {"type": "string", "enum": ["true", "false"]},
                          "true: refuse (422 unserved-agents) a definition naming an agent no running worker "
                          "serves; false (default): deploy it and list those agents in `warnings`"))),
    Endpoint("GET", "/v1/definitions", list_definitions, "List deployed processes", "viewer", "definitions",
             responses={200: DefinitionList}),
    Endpoint("GET", "/v1/definitions/{name}", get_definition, "A process's versions", "viewer", "definitions",
             responses={200: DefinitionDetail}, errors=(404,)),
    Endpoint("GET", "/v1/definitions/{name}/versions/{version:int}", get_version, "One version, with its YAML",
             "viewer", "definitions", responses={200: DefinitionVersion}, errors=(404,)),
]
