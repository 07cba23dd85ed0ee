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
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from flowdb.db.engine import database_unavailable, read_only
from flowdb.errors import FlowdbError
from flowdb.notify import Wakeups
from flowdb.sessions import SESSION_COOKIE, Session, same_token, session_of
from flowdb.settings import Settings
from flowdb.tokens import Principal

from ..body import read_body
from ..problems import STATUS_OF, ApiError

T = TypeVar("T")
HERE = Path(__file__).parent
MAX_FORM_BYTES = 1024 * 1024  # a start form's object inputs fit; nothing of the UI posts more
MAX_FORM_FIELDS = 200
MAX_ID = 2**63 - 1
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


log = logging.getLogger("flowdb_api.ui")


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


SHOWN_JSON = 16_000  # characters of one input or output shown on a page (live refreshes send it again)


def _pretty(value: Any) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    if len(text) <= SHOWN_JSON:
        return text
    return (text[:SHOWN_JSON] + f"\n… cut here: {len(text) - SHOWN_JSON:,} more characters "
            "(GET /v1/instances/ID of the API has all of it)")


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
    form: dict[str, str] | None = None  # a POST's fields (the CSRF token checked)

    @property
    def who(self) -> Principal:
        return self.session.principal

    @property
    def reader(self) -> Engine:
        return read_only(self.engine)

    async def db(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(work, *args, **kwargs)

    def field(self, name: str, default: str = "") -> str:
        return self.form.get(name, default) if self.form is not None else default

    def path_id(self, name: str) -> int:
        """An id from the path; past what a column holds nothing can match: 404 (not a database error)."""
        value = int(self.request.path_params[name])
        if value > MAX_ID:
            raise UiError(404, f"{name.replace('_', ' ')} {value} does not exist")
        return value

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return render(self.request, template, status, session=self.session, **context)


def home_for(who: Principal | None) -> str:
    """Where a principal starts: the runs, or for an approver (who cannot read them) its inbox."""
    return "/ui/approvals" if who is not None and not who.has("viewer") else "/ui/runs"


def render(request: Request, template: str, status: int = 200, session: Session | None = None,
           **context: Any) -> HTMLResponse:
    who = session.principal if session is not None else None
    html = templates.get_template(template).render(
        request=request, who=who, csrf=session.csrf if session is not None else "", home=home_for(who),
        can=(lambda role: who is not None and who.has(role)), path=request.url.path, **context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def error_page(request: Request, status: int, title: str, message: str, session: Session | None = None) -> HTMLResponse:
    return render(request, "error.html", status, session=session, title=title, message=message)


def same_origin(request: Request, public_origin: str | None) -> bool:
    """An Origin header, when the browser sends one, names this server (a second line of defence after CSRF).
    Behind a proxy that rewrites Host, FLOWDB_UI_ORIGIN names the address people use."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if public_origin:
        return origin.rstrip("/") == public_origin.rstrip("/")
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", "") and parts.scheme in ("http", "https")


async def read_form(request: Request, max_bytes: int = MAX_FORM_BYTES, max_fields: int = MAX_FORM_FIELDS
                    ) -> dict[str, str]:
    """A posted form's fields (URL-encoded, as the UI's forms send them), read with a size limit counted
    while reading; UiError for another encoding, too much, or a NUL character."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        raw = await read_body(request, max_bytes)
        if raw and kind != "application/x-www-form-urlencoded":
            raise UiError(415, "the UI's forms are sent URL-encoded (application/x-www-form-urlencoded)")
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=max_fields)
    except ApiError as exc:
        raise UiError(exc.status, exc.detail) from None
    except (UnicodeDecodeError, ValueError):
        raise UiError(422, f"the form is not UTF-8 text or has more than {max_fields} fields") from None
    fields = dict(pairs)
    if any("\x00" in key or "\x00" in value for key, value in fields.items()):
        raise UiError(422, "a field holds a NUL character, which cannot be stored")
    return fields


def _nul_in(request: Request) -> UiError | None:
    """Text columns cannot hold NUL (PostgreSQL refuses it): nothing with one exists or is valid."""
    if any("\x00" in str(v) for v in request.path_params.values()):
        return UiError(404, "no such page (its address holds a NUL character)")
    if any("\x00" in k or "\x00" in v for k, v in request.query_params.multi_items()):
        return UiError(422, "a query parameter holds a NUL character")
    return None


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None,
               same_site: str = "lax") -> None:
    """HttpOnly (scripts cannot read it), SameSite, Secure when the page came over HTTPS."""
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
        session = None
        try:
            problem = _nul_in(request)
            if problem is not None:
                raise problem
            session = await run_in_threadpool(session_of, engine, request.cookies.get(SESSION_COOKIE))
            if session is None:
                if request.method == "GET":
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)
                return error_page(request, 401, "Signed out",
                                  "Your session has ended; sign in again and repeat what you did.")
            form = None
            if request.method == "POST":
                form = await read_form(request)
                if not same_token(session.csrf, form.get("csrf")) or not same_origin(request, settings.ui_origin):
                    return error_page(request, 403, "Refused",
                                      "This form did not come from a page of this server (its CSRF token is "
                                      "missing or wrong); reload the page and try again.", session)
            if page.role is not None and not session.principal.has(page.role):
                return error_page(request, 403, "Not allowed",
                                  f"This needs the {page.role} role; you are signed in as "
                                  f"{session.principal.identity} with the {session.principal.role} role.", session)
            return await page.handler(UiCall(request, session, engine, settings, wakeups, form))
        except UiError as exc:
            return error_page(request, exc.status, "Not found" if exc.status == 404 else "Cannot do that",
                              exc.message, session)
        except FlowdbError as exc:  # the same statuses as the API's problem documents
            status = next((code for kind, code, _ in STATUS_OF if isinstance(exc, kind)), 400)
            return error_page(request, status, "Not found" if status == 404 else "Cannot do that", exc.for_http,
                              session)
        except SQLAlchemyError as exc:
            if not database_unavailable(exc):
                log.exception("a UI page failed: %s %s", request.method, request.url.path)
                return error_page(request, 500, "Something went wrong",
                                  "The server could not show this page; its log says why.", session)
            return error_page(request, 503, "Database unavailable",
                              "The database is not answering; this page works again once it is back.", session)
        except Exception:
            log.exception("a UI page failed: %s %s", request.method, request.url.path)
            return error_page(request, 500, "Something went wrong",
                              "The server could not show this page; its log says why.", session)

    return run
