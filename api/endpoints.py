"""One table of endpoints: it builds the Starlette routes and the OpenAPI document, so the two agree.

Each endpoint says who may call it (a role, or None for no token), what body it takes and what it
answers. The wrapper authenticates the bearer token and checks the role before the handler runs;
database work runs in a thread (SQLAlchemy is synchronous). A GET handler's engine is read-only
(flowdb.db.engine.read_only: on SQLite its transactions neither wait for nor hold up writers, and
refuse writes); the other methods get the writing engine.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flowdb.db.engine import read_only
from flowdb.notify import Wakeups
from flowdb.problems import suggest
from flowdb.sessions import SESSION_COOKIE, session_of
from flowdb.settings import Settings
from flowdb.tokens import Principal, TokenError, authenticate

from .body import json_body, refuse_body
from .problems import ApiError

T = TypeVar("T")
PATH_CONVERTER = re.compile(r"{(\w+):\w+}")  # {instance_id:int}
MAX_ID = 2**63 - 1  # ids are 64-bit
MAX_INT = 2**31 - 1  # versions are 32-bit
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Query:
    """A query parameter, for validation and the OpenAPI document."""

    name: str
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True)
class Header:
    name: str
    description: str


def _always() -> bool:
    return True


@dataclass
class Call:
    """What a handler gets."""

    request: Request
    principal: Principal | None
    engine: Engine  # read-only for GET endpoints
    settings: Settings
    wakeups: Wakeups  # tell workers and event streams what was committed: wakeups.notify(workers=..., events=...)
    # Whether the caller's token (or UI session) still holds the role: a long stream asks again now and then,
    # so a revoked token or an ended session stops receiving.
    still_allowed: Callable[[], bool] = field(default=_always)

    async def db(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(work, *args, **kwargs)

    async def body(self, model: type[M]) -> M:
        return await json_body(self.request, model, self.settings.api_max_body_bytes)

    def path_int(self, name: str, maximum: int = MAX_ID) -> int:
        """An integer path parameter; past what the column can hold nothing can match: 404."""
        value = int(self.request.path_params[name])
        if value > maximum:
            raise ApiError(404, f"{name} {value} does not exist", kind="not-found")
        return value

    @property
    def who(self) -> Principal:
        assert self.principal is not None  # endpoints with a role always have one
        return self.principal


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # Starlette syntax: /v1/instances/{instance_id:int}
    handler: Callable[[Call], Awaitable[Response]]
    summary: str
    role: str | None  # approver | operator | admin; None: no token needed
    tag: str
    body: type[BaseModel] | None = None
    raw_body: str | None = None  # media type of a text body read by the handler itself (YAML)
    responses: dict[int, type[BaseModel] | None] = field(default_factory=dict)  # success statuses
    errors: tuple[int, ...] = ()  # problem statuses beyond the ones every endpoint can give
    query: tuple[Query, ...] = ()
    headers: tuple[Header, ...] = ()
    stream: bool = False  # text/event-stream

    @property
    def label(self) -> str:
        """METHOD /path as the OpenAPI document writes it (no converters)."""
        return self.method + " " + PATH_CONVERTER.sub(r"{\1}", self.path)

    @property
    def refuses_body(self) -> bool:
        """A POST with no body of its own: a body with content is refused, not ignored."""
        return self.method != "GET" and self.body is None and self.raw_body is None


def json_response(model: BaseModel | list[Any] | dict[str, Any], status: int = 200) -> JSONResponse:
    content = model.model_dump(mode="json") if isinstance(model, BaseModel) else model
    return JSONResponse(content, status_code=status)


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "use Authorization: Bearer <token>", kind="unauthorized",
                       headers={"WWW-Authenticate": 'Bearer realm="flowdb"'})
    return token.strip()


def _refuse_unknown_query(endpoint: Endpoint, request: Request) -> None:
    """A query parameter the route does not take is an error, not silently ignored (`?statu=failed`
    would otherwise list every instance)."""
    known = sorted(q.name for q in endpoint.query)
    unknown = sorted(set(request.query_params.keys()) - set(known))
    if not unknown:
        return
    hint = suggest(unknown[0], known) if known else ""
    takes = f"it takes {', '.join(known)}" if known else "it takes none"
    raise ApiError(422, f"{endpoint.label} has no query parameter "
                   f"{', '.join(repr(u) for u in unknown)}{hint}; {takes}", kind="invalid-query")


def _recheck(engine: Engine, role: str, token: str | None, cookie: str | None) -> Callable[[], bool]:
    def allowed() -> bool:
        if cookie is not None:
            session = session_of(engine, cookie)
            return session is not None and session.principal.has(role)
        try:
            return authenticate(read_only(engine), token).has(role)
        except TokenError:
            return False

    return allowed


def route_of(endpoint: Endpoint, engine: Engine, settings: Settings, wakeups: Wakeups) -> Route:
    reader = read_only(engine)
    handler_engine = reader if endpoint.method == "GET" else engine

    async def endpoint_fn(request: Request) -> Response:
        # Text columns cannot hold NUL (PostgreSQL refuses it): nothing with one can exist or be valid.
        if any("\x00" in str(v) for v in request.path_params.values()):
            raise ApiError(404, "no such resource (the path holds a NUL character)", kind="not-found")
        if any("\x00" in k or "\x00" in v for k, v in request.query_params.multi_items()):
            raise ApiError(422, "a query parameter holds a NUL character", kind="invalid-query")
        principal = None
        still_allowed = _always
        if endpoint.role is not None:
            token = bearer(request)
            cookie = request.cookies.get(SESSION_COOKIE) if token is None and endpoint.method == "GET" else None
            if cookie is not None:
                # The web UI's pages read the API with their session cookie; only reads (a cookie is sent by
                # the browser on its own, so a change must come with a CSRF token: the UI's forms do that).
                session = await run_in_threadpool(session_of, engine, cookie)
                principal = session.principal if session is not None else None
            if principal is None:
                principal = await run_in_threadpool(authenticate, reader, token)
            still_allowed = _recheck(engine, endpoint.role, token, cookie if token is None else None)
            if not principal.has(endpoint.role):
                raise ApiError(403, f"this needs the {endpoint.role} role; the token of {principal.identity} "
                               f"has the {principal.role} role", kind="forbidden")
        _refuse_unknown_query(endpoint, request)
        if endpoint.refuses_body:
            await refuse_body(request, settings.api_max_body_bytes, endpoint.label)
        return await endpoint.handler(Call(request, principal, handler_engine, settings, wakeups, still_allowed))

    return Route(endpoint.path, endpoint_fn, methods=[endpoint.method], name=f"{endpoint.method} {endpoint.path}")
