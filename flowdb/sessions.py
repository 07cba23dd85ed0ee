"""Web UI sessions (api/ui/): signing in with an API token, the session cookie, and CSRF tokens.

A session is a row of `ui_sessions`: the cookie holds a random secret and the table only its hash
(as for API tokens). Each request looks the session up together with its token, so a revoked token
ends its sessions at once, and any number of `flowdb serve` processes share them. Each session has
its own CSRF token, which every form of the UI carries and every POST must send back.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.sql.expression import literal

from flowdb.db.clock import Clock
from flowdb.db.engine import read_only
from flowdb.db.tables import api_tokens, ui_sessions
from flowdb.tokens import Principal, authenticate

SESSION_COOKIE = "flowdb_session"
LOGIN_COOKIE = "flowdb_login"  # the sign-in form's own CSRF token (there is no session yet)
T, U = api_tokens, ui_sessions


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def sign_in(engine: Engine, token: str, hours: float, previous: str | None = None) -> tuple[str, Session]:
    """A new session for the token's principal: (the cookie's secret, the session). TokenError if the
    token is missing, unknown or revoked. The `previous` session of the browser, if any, and expired
    sessions are ended on the way."""
    principal = authenticate(engine, token.strip())
    secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    clock = Clock(engine.dialect.name, shifted=False)
    with engine.begin() as conn:
        conn.execute(delete(U).where(U.c.expires_at < clock.now))
        if previous and len(previous) <= 100:
            conn.execute(delete(U).where(U.c.session_hash == _digest(previous)))
        conn.execute(insert(U).values(session_hash=_digest(secret), token_id=principal.token_id, csrf_token=csrf,
                                      created_at=clock.now, expires_at=clock.plus(literal(hours * 3600.0))))
    return secret, Session(principal, csrf)


def session_of(engine: Engine, secret: str | None) -> Session | None:
    """The live session a cookie's secret stands for, or None (unknown, expired, or its token revoked)."""
    if not secret or len(secret) > 100:
        return None
    digest = _digest(secret)
    clock = Clock(engine.dialect.name, shifted=False)
    query = (select(U.c.session_hash, U.c.csrf_token, T.c.id, T.c.identity, T.c.role)
             .select_from(U.join(T, T.c.id == U.c.token_id))
             .where(U.c.session_hash == digest, U.c.expires_at > clock.now, T.c.revoked_at.is_(None)))
    with read_only(engine).connect() as conn:
        row = conn.execute(query).first()
    if row is None or not hmac.compare_digest(row.session_hash, digest):
        return None
    return Session(Principal(int(row.id), row.identity, row.role), row.csrf_token)


def sign_out(engine: Engine, secret: str | None) -> None:
    if secret and len(secret) <= 100:
        with engine.begin() as conn:
            conn.execute(delete(U).where(U.c.session_hash == _digest(secret)))


def same_token(expected: str, given: str | None) -> bool:
    """A CSRF token matches (constant time)."""
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())
