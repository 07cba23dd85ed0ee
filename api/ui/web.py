"""What every UI page shares: who is signed in, the role check, CSRF on every POST, rendering, headers.

A page is a `Page(role, handler)`. Before the handler runs, the session cookie is resolved (no session:
to the sign-in page for a GET, 401 for a POST); a role the principal lacks is 403 (a viewer that
posts is refused, not only shown no buttons); a POST must carry the session's CSRF token in the form
field `csrf` and, when the browser sends an Origin, come from this origin. Templates autoescape
everything (user data never becomes markup); the pages load scripts and styles only from /ui/static
(Content-Security-Policy).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from flowdb.db.engine import database_unavailable, read_only
from flowdb.errors import FlowdbError
from flowdb.notify import Wakeups
from flowdb.settings import Settings
from flowdb.tokens import Principal

from ..problems import STATUS_OF
from .sessions import SESSION_COOKIE, Session, same_token, session_of

T = TypeVar("T")
HERE = Path(__file__).parent
MAX_FORM_FIELDS = 200
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class UiError(Exception):
    """A page cannot be shown or an action cannot be done: shown as an error page with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _when(value: Any) -> str:
    if not isinstance(value, datetime):
        return "" if value is None else str(value)
    moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _iso(value: Any) -> str:
    if not isinstance(value, datetime):
        return ""
    moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _json_script(value: Any) -> Markup:
    """JSON safe to place inside <script type="application/json">: no '<', '>' or '&' can close the element."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)  # escaped above for the script element's content


def _money(value: Any) -> str:
    return f"${float(value or 0):,.4f}"


def _duration_ms(value: Any) -> str:
    if value is None:
        return ""
    ms = int(value)
    return f"{ms} ms" if ms < 1000 else f"{ms / 1000:.1f} s" if ms < 60_000 else f"{ms / 60_000:.1f} min"


templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
templates.filters.update(when=_when, iso=_iso, compact=_compact, pretty=_pretty, json_script=_json_script,
                         money=_money, ms=_duration_ms)


@dataclass
class UiCall:
    """What a page handler gets."""

    request: Request
    session: Session
    engine: Engine  # the writing engine; `reader` for reads
    settings: Settings
    wakeups: Wakeups
    form: FormData | None = None  # a POST's fields (the CSRF token checked)

    @property
    def who(self) -> Principal:
        return self.session.principal

    @property
    def reader(self) -> Engine:
        return read_only(self.engine)

    async def db(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(work, *args, **kwargs)

    def field(self, name: str, default: str = "") -> str:
        value = self.form.get(name) if self.form is not None else None
        return value if isinstance(value, str) else default

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return render(self.request, template, status, session=self.session, **context)


def render(request: Request, template: str, status: int = 200, session: Session | None = None,
           **context: Any) -> HTMLResponse:
    who = session.principal if session is not None else None
    html = templates.get_template(template).render(
        request=request, who=who, csrf=session.csrf if session is not None else "",
        can=(lambda role: who is not None and who.has(role)), path=request.url.path, **context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def same_origin(request: Request) -> bool:
    """An Origin header, when the browser sends one, names this server (a second line of defence after CSRF)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", "") and parts.scheme in ("http", "https")


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None,
               same_site: str = "lax") -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite=same_site,  # type: ignore[arg-type]
                        secure=request.url.scheme == "https")


Handler = Callable[[UiCall], Awaitable[Response]]


@dataclass(frozen=True)
class Page:
    role: str | None  # viewer | approver | operator | admin; None: anyone signed in
    handler: Handler


def endpoint_of(page: Page, engine: Engine, settings: Settings,
                wakeups: Wakeups) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        session = await run_in_threadpool(session_of, engine, request.cookies.get(SESSION_COOKIE))
        if session is None:
            if request.method == "GET":
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)
            return render(request, "error.html", 401, title="Signed out",
                          message="Your session has ended; sign in again and repeat what you did.")
        form = None
        if request.method == "POST":
            form = await request.form(max_fields=MAX_FORM_FIELDS, max_files=0)
            token = form.get("csrf")
            if not same_token(session.csrf, token if isinstance(token, str) else None) or not same_origin(request):
                return render(request, "error.html", 403, session=session, title="Refused",
                              message="This form did not come from a page of this server (its CSRF token is "
                                      "missing or wrong); reload the page and try again.")
        if page.role is not None and not session.principal.has(page.role):
            return render(request, "error.html", 403, session=session, title="Not allowed",
                          message=f"This needs the {page.role} role; you are signed in as "
                                  f"{session.principal.identity} with the {session.principal.role} role.")
        try:
            return await page.handler(UiCall(request, session, engine, settings, wakeups, form))
        except UiError as exc:
            return render(request, "error.html", exc.status, session=session, title="Cannot do that",
                          message=exc.message)
        except SQLAlchemyError as exc:
            if not database_unavailable(exc):
                raise
            return render(request, "error.html", 503, session=session, title="Database unavailable",
                          message="The database is not answering; this page works again once it is back.")
        except FlowdbError as exc:  # the same statuses as the API's problem documents
            status = next((code for kind, code, _ in STATUS_OF if isinstance(exc, kind)), 400)
            return render(request, "error.html", status, session=session,
                          title="Not found" if status == 404 else "Cannot do that", message=exc.for_http)

    return run
