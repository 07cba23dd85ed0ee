"""Signing in and out of the web UI with an API token."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from flowdb.sessions import LOGIN_COOKIE, SESSION_COOKIE, same_token, session_of, sign_in, sign_out
from flowdb.settings import Settings
from flowdb.tokens import TokenError

from .web import UiCall, UiError, error_page, home_for, read_form, render, same_origin, set_cookie

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


LOGIN_FORM_BYTES = 8192


def _login_form(request: Request, status: int = 200, error: str | None = None, target: str | None = None) -> Response:
    # The form's CSRF token is the sign-in cookie's: kept while it lasts, so a second tab's form still works.
    csrf = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)
    response = render(request, "login.html", status, login_csrf=csrf, error=error,
                      next=safe_next(target if target is not None else request.query_params.get("next")),
                      title="Sign in")
    set_cookie(request, response, LOGIN_COOKIE, csrf, LOGIN_COOKIE_SECONDS, same_site="strict")
    return response


def login_pages(engine: Engine, settings: Settings) -> tuple[Endpoint, Endpoint]:
    async def show(request: Request) -> Response:
        session = await run_in_threadpool(session_of, engine, request.cookies.get(SESSION_COOKIE))
        if session is not None:
            target = request.query_params.get("next")
            return RedirectResponse(safe_next(target) if target else home_for(session.principal), status_code=303)
        return _login_form(request)

    async def submit(request: Request) -> Response:
        try:  # no session yet: a few small fields, read with a small limit
            form = await read_form(request, LOGIN_FORM_BYTES, max_fields=3)
        except UiError as exc:
            return error_page(request, exc.status, "Refused", exc.message)
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        if not cookie or not same_token(cookie, form.get("csrf")) or not same_origin(request, settings.ui_origin):
            return error_page(request, 403, "Refused", "This sign-in form did not come from this server (its CSRF "
                                                       "token is missing or wrong); open the sign-in page again.")
        target = form.get("next")
        token = form.get("token", "").strip()
        if not token:
            return _login_form(request, 401, "Cannot sign in: paste an API token. An administrator creates one with "
                                             "`flowdb tokens create --identity YOU --role ROLE`.", target)
        try:
            # A session cookie the browser still holds is ended first: one sign-in, one live session.
            secret, session = await run_in_threadpool(sign_in, engine, token, settings.ui_session_hours,
                                                      request.cookies.get(SESSION_COOKIE))
        except TokenError as exc:
            return _login_form(request, 401, f"Cannot sign in: {exc}. An administrator creates a token with "
                                             "`flowdb tokens create --identity YOU --role ROLE`.", target)
        response = RedirectResponse(safe_next(target) if target else home_for(session.principal), status_code=303)
        set_cookie(request, response, SESSION_COOKIE, secret, int(settings.ui_session_hours * 3600))
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    return show, submit


async def logout(call: UiCall) -> Response:
    await call.db(sign_out, call.engine, call.request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
