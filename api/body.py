"""Request bodies, read with a size limit counted while streaming (not trusted from Content-Length)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

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
    """The body as `model`: 415 when it is not JSON, 400 when it does not parse, 422 when it does not fit."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    raw = await read_body(request, limit)
    if kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(415, f"send the body as application/json, not {kind}")
    try:
        data: Any = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply") from None
    if _holds_nul(data):
        raise ApiError(422, "the body holds a NUL character (\\u0000), which cannot be stored", kind="invalid-body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{"location": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
                  for e in exc.errors(include_url=False)]
        raise ApiError(422, "; ".join(f"{e['location']}: {e['message']}" for e in errors), kind="invalid-body",
                       extra={"errors": errors}) from None


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False
