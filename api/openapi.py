"""The OpenAPI 3.1 document, built from the endpoint table and the pydantic models of bodies."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from flowdb import __version__

from .endpoints import Endpoint
from .problems import PROBLEM_TYPE, TITLES

PATH_PARAM = re.compile(r"{(\w+)(?::(\w+))?}")
COMMON_ERRORS = {True: (400, 401, 403, 503), False: (400,)}  # by whether a token is needed (503: database down)

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
}

NO_FIELDS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components[name] = definition
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def build(endpoints: list[Endpoint], title: str = "flowdb") -> dict[str, Any]:
    components: dict[str, Any] = {"Problem": PROBLEM_SCHEMA}
    paths: dict[str, Any] = {}
    for ep in endpoints:
        path = PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", ep.path)
        parameters: list[dict[str, Any]] = []
        for name, converter in PATH_PARAM.findall(ep.path):
            schema = ({"type": "integer", "minimum": 0, "maximum": 2**63 - 1} if converter == "int"
                      else {"type": "string", "minLength": 1})
            parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
        for q in ep.query:
            parameters.append({"name": q.name, "in": "query", "required": False, "schema": q.schema,
                               "description": q.description})
        for h in ep.headers:
            parameters.append({"name": h.name, "in": "header", "required": False, "schema": {"type": "string"},
                               "description": h.description})
        operation: dict[str, Any] = {"summary": ep.summary, "tags": [ep.tag],
                                     "operationId": f"{ep.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower())}"}
        if parameters:
            operation["parameters"] = parameters
        if ep.role is None:
            operation["security"] = []
        else:
            operation["description"] = f"Needs a token with the {ep.role} role (or a higher one)."
        if ep.body is not None:
            operation["requestBody"] = {"required": True,
                                        "content": {"application/json": {"schema": _schema(ep.body, components)}}}
        elif ep.raw_body is not None:
            operation["requestBody"] = {"required": True, "content": {ep.raw_body: {"schema": {"type": "string"}}}}
        elif ep.refuses_body:
            operation["requestBody"] = {"required": False, "description": "none, or an empty object",
                                        "content": {"application/json": {"schema": NO_FIELDS}}}
        responses: dict[str, Any] = {}
        for status, model in ep.responses.items():
            if ep.stream:
                content = {"text/event-stream": {"schema": {"type": "string"}}}
            elif model is None:
                content = {}
            else:
                content = {"application/json": {"schema": _schema(model, components)}}
            responses[str(status)] = {"description": "success", **({"content": content} if content else {})}
        errors = set(COMMON_ERRORS[ep.role is not None]) | set(ep.errors)
        if ep.body is not None or ep.raw_body is not None:
            errors |= {413, 415, 422}
        elif ep.refuses_body:
            errors |= {413, 422}
        for status in sorted(errors):
            responses[str(status)] = {"description": TITLES.get(status, "error"),
                                      "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        paths.setdefault(path, {})[ep.method.lower()] = operation | {"responses": responses}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": __version__,
                 "description": "Process definitions, instances, approvals and their events, over the tables "
                                "the workers use. Every route but /healthz and /openapi.json needs a bearer token."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
