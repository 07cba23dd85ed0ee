"""Errors as application/problem+json (RFC 9457): type, title, status, detail; never a traceback."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from flowdb.approvals import AlreadyDecided, AlreadyVoted, ApprovalClosed, BadDecision, NotAnApprover
from flowdb.budget_ops import BadBudget
from flowdb.control import InstanceNotRunning, NotPausable, NotPaused, StepNotCancellable, StepNotRetryable
from flowdb.db.engine import database_unavailable
from flowdb.errors import (
    DefinitionConflict,
    DefinitionError,
    FlowdbError,
    IdempotencyConflict,
    IdempotencyInProgress,
    InputError,
    NotFound,
)
from flowdb.rerun import RerunRefused
from flowdb.tokens import TokenError

log = logging.getLogger("flowdb_api")
PROBLEM_TYPE = "application/problem+json"
DATABASE_RETRY_SECONDS = 2  # Retry-After of a 503 database-unavailable
OUTAGE_LOG_SECONDS = 30.0  # one warning per this long while the database is unavailable, not one per request
TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
          409: "Conflict", 413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
          500: "Internal Server Error", 503: "Service Unavailable"}


class ApiError(Exception):
    """Raise anywhere in a route to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, kind: str | None = None, extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or TITLES.get(status, "error").lower().replace(" ", "-")
        self.extra = extra or {}
        self.headers = headers


def problem(status: int, detail: str, *, kind: str | None = None, extra: dict[str, Any] | None = None,
            headers: dict[str, str] | None = None) -> Response:
    body = {"type": f"https://flowdb.dev/problems/{kind or TITLES.get(status, 'error').lower().replace(' ', '-')}",
            "title": TITLES.get(status, "Error"), "status": status, "detail": detail, **(extra or {})}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_TYPE, headers=headers)


# flowdb's own errors and the status each one means (the first match wins: subclasses first).
STATUS_OF: list[tuple[type[FlowdbError], int, str]] = [
    (TokenError, 401, "unauthorized"),
    (NotAnApprover, 403, "not-an-approver"),
    (AlreadyDecided, 409, "already-decided"),
    (AlreadyVoted, 409, "already-voted"),
    (ApprovalClosed, 409, "approval-closed"),
    (BadDecision, 422, "bad-decision"),
    (NotFound, 404, "not-found"),
    (DefinitionError, 422, "invalid-definition"),
    (DefinitionConflict, 409, "definition-conflict"),
    (IdempotencyConflict, 409, "idempotency-conflict"),
    (IdempotencyInProgress, 409, "idempotency-in-progress"),
    (InputError, 422, "invalid-inputs"),
    (InstanceNotRunning, 409, "instance-not-running"),
    (NotPausable, 409, "not-pausable"),
    (NotPaused, 409, "not-paused"),
    (RerunRefused, 409, "rerun-refused"),
    (BadBudget, 422, "bad-budget"),
    (StepNotRetryable, 409, "step-not-retryable"),
    (StepNotCancellable, 409, "step-not-cancellable"),
]


def from_flowdb_error(exc: FlowdbError) -> Response:
    for kind, status, name in STATUS_OF:
        if isinstance(exc, kind):
            extra: dict[str, Any] = {}
            if isinstance(exc, DefinitionError):
                extra["errors"] = [{"file": p.file, "line": p.line, "column": p.col, "message": p.message,
                                    "location": str(p)} for p in exc.problems]
            headers = {"WWW-Authenticate": 'Bearer realm="flowdb"'} if status == 401 else None
            if isinstance(exc, IdempotencyInProgress):
                headers = {"Retry-After": str(exc.retry_after_seconds)}
            return problem(status, exc.for_http, kind=name, extra=extra, headers=headers)
    return problem(400, exc.for_http, kind="bad-request")


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return problem(exc.status, exc.detail, kind=exc.kind, extra=exc.extra, headers=exc.headers)


async def on_flowdb_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FlowdbError)
    return from_flowdb_error(exc)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    from starlette.exceptions import HTTPException

    assert isinstance(exc, HTTPException)
    return problem(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}) or None)


_last_outage_log = [0.0]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


async def on_database_error(request: Request, exc: Exception) -> Response:
    """A database that is down, restarting or out of connections: 503 with Retry-After, never a 500.
    The pool replaces dead connections by itself (pre-ping), so requests succeed again once it is back."""
    if not database_unavailable(exc):
        return await on_unexpected(request, exc)
    cause = _first_line(getattr(exc, "orig", None) or exc)
    if time.monotonic() - _last_outage_log[0] >= OUTAGE_LOG_SECONDS:
        _last_outage_log[0] = time.monotonic()
        log.warning("the database is unavailable (%s); answering 503 until it is back", cause)
    return problem(503, f"the database is unavailable ({cause}); retry in a few seconds", kind="database-unavailable",
                   headers={"Retry-After": str(DATABASE_RETRY_SECONDS)})


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return problem(500, "the server hit an unexpected error; it was logged")
