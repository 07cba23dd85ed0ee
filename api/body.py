"""Request bodies, read with a size limit counted while streaming (not trusted from Content-Length)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from flowdb.problems import suggest

from .problems import ApiError

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it passes `limit` bytes (the rest is never read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError(413, f"the body is {int(declared)} bytes; the limit is {limit} (FLOWDB_API_MAX_BODY_BYTES)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body passed the limit of {limit} bytes (FLOWDB_API_MAX_BODY_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, model: type[M], limit: int) -> M:
    """The body as `model`: 415 when it is not JSON, 400 when it does not parse, 422 when it does not fit
    (a field the model does not have included: it is named, never ignored)."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    raw = await read_body(request, limit)
    if kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(415, f"send the body as application/json, not {kind}")
    data = _parse(raw or b"{}")
    if _holds_nul(data):
        raise ApiError(422, "the body holds a NUL character (\\u0000), which cannot be stored", kind="invalid-body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _invalid(model, data, exc) from None


async def refuse_body(request: Request, limit: int, route: str) -> None:
    """For a route that takes no body: 422 for one with content, rather than ignoring what it asks.
    No body, an empty one or `{}` is fine."""
    raw = await read_body(request, limit)
    if not raw.strip():
        return
    try:
        data: Any = json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(422, f"{route} takes no body; send none (or {{}})", kind="invalid-body") from None
    if isinstance(data, dict) and not data:
        return
    if isinstance(data, dict):
        fields = list(data)
        raise ApiError(422, f"{route} takes no body fields; unknown field(s) {', '.join(map(repr, fields))}",
                       kind="invalid-body", extra={"errors": [{"location": f, "message": "unknown field"}
                                                              for f in fields]})
    raise ApiError(422, f"{route} takes no body; send none (or {{}}), not {_json_type(data)}", kind="invalid-body")


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply") from None


def _not_json(name: str) -> Any:
    """Python's json reads NaN and Infinity; JSON has no such numbers (and PostgreSQL's jsonb refuses them)."""
    raise ValueError(f"{name} is not a JSON value")


def _invalid(model: type[BaseModel], data: Any, exc: ValidationError) -> ApiError:
    """A 422 in the caller's terms: unknown fields named (with a "did you mean"), then what else does not fit."""
    unknown: list[tuple[str, str]] = []  # (location, "did you mean")
    errors: list[dict[str, str]] = []
    for error in exc.errors(include_url=False):
        where = tuple(str(p) for p in error["loc"])
        location = ".".join(where) or "body"
        if error["type"] == "extra_forbidden":
            unknown.append((location, suggest(where[-1], model.model_fields) if len(where) == 1 else ""))
        elif not where and error["type"] in ("model_type", "dict_type"):
            errors.append({"location": location, "message": f"the body must be a JSON object, not {_json_type(data)}"})
        else:
            errors.append({"location": location, "message": error["msg"]})
    parts = [f"{e['location']}: {e['message']}" for e in errors]
    if unknown:
        named = ", ".join(f"{location!r}{hint}" for location, hint in unknown)
        parts.insert(0, f"unknown body field(s) {named}; the body takes {', '.join(sorted(model.model_fields))}")
    listed = [{"location": location, "message": f"unknown field{hint}"} for location, hint in unknown] + errors
    return ApiError(422, "; ".join(parts), kind="invalid-body", extra={"errors": listed})


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False
