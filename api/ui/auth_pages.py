"""Signing in and out of the web UI with an API token."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from flowdb.settings import Settings
from flowdb.tokens import TokenError

from .sessions import LOGIN_COOKIE, SESSION_COOKIE, same_token, session_of, sign_in, sign_out
from .web import MAX_FORM_FIELDS, UiCall, render, same_origin, set_cookie

Endpoint = Callable[[Request], Awaitable[Response]]
HOME = "/ui/runs"
LOGIN_COOKIE_SECONDS = 3600


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a page of the UI, never another site (`//evil`, `/\\evil`, `https:`)."""
    if not target:
        return HOME
    if not target.startswith("/ui/") or target.startswith("//") or "\\" in target or any(c < " " for c in target):
        return HOME
    return target


def _login_form(request: Request, status: int = 200, error: str | None = None) -> Response:
    csrf = secrets.token_urlsafe(32)
    response = render(request, "login.html", status, login_csrf=csrf, error=error,
                      next=safe_next(request.query_params.get("next")), title="Sign in")
    set_cookie(request, response, LOGIN_COOKIE, csrf, LOGIN_COOKIE_SECONDS, same_site="strict")
    return response


def login_pages(engine: Engine, settings: Settings) -> tuple[Endpoint, Endpoint]:
    async def show(request: Request) -> Response:
        session = await run_in_threadpool(session_of, engine, request.cookies.get(SESSION_COOKIE))
        if session is not None:
            return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
        return _login_form(request)

    async def submit(request: Request) -> Response:
        form = await request.form(max_fields=MAX_FORM_FIELDS, max_files=0)
        given = form.get("csrf")
        if not same_token(request.cookies.get(LOGIN_COOKIE, ""), given if isinstance(given, str) else None) \
                or not request.cookies.get(LOGIN_COOKIE) or not same_origin(request):
            return render(request, "error.html", 403, title="Refused",
                          message="This sign-in form did not come from this server (its CSRF token is missing or "
                                  "wrong); open the sign-in page again.")
        token = form.get("token")
        target = form.get("next")
        try:
            secret, _ = await run_in_threadpool(sign_in, engine, token if isinstance(token, str) else "",
                                                settings.ui_session_hours)
        except TokenError as exc:
            return _login_form(request, 401, f"Cannot sign in: {exc}. Create a token with "
                                             "`flowdb tokens create IDENTITY --role ROLE`.")
        response = RedirectResponse(safe_next(target if isinstance(target, str) else None), status_code=303)
        set_cookie(request, response, SESSION_COOKIE, secret, int(settings.ui_session_hours * 3600))
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    return show, submit


async def logout(call: UiCall) -> Response:
    await call.db(sign_out, call.engine, call.request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
