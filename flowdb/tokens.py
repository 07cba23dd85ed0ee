"""Bearer tokens for the HTTP API: created once (printed, never stored), kept as SHA-256 hashes.

Roles: a viewer reads instances, their events (approval decisions included), definitions and reports,
has no inbox and changes nothing (the web UI shows it no buttons);
an approver reads its inbox and decides its approvals; an operator can do both and also starts,
cancels and retries; an admin also deploys definitions.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, insert, select, update

from flowdb.db.approvals import approver_key
from flowdb.db.clock import Clock
from flowdb.db.engine import read_only
from flowdb.db.tables import api_tokens
from flowdb.errors import FlowdbError, NotFound

ROLES = ("viewer", "approver", "operator", "admin")
# What each role may do: viewer and approver are side by side, an operator has both and more.
GRANTS = {
    "viewer": frozenset({"viewer"}),
    "approver": frozenset({"approver"}),
    "operator": frozenset({"viewer", "approver", "operator"}),
    "admin": frozenset(ROLES),
}
PREFIX = "fdb_"
T = api_tokens


class TokenError(FlowdbError):
    """A token is missing, unknown or revoked (the API answers 401)."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    token_id: int
    identity: str
    role: str

    def has(self, role: str) -> bool:
        return role in GRANTS.get(self.role, frozenset())


@dataclass(frozen=True)
class TokenRow:
    id: int
    identity: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(engine: Engine, identity: str, role: str) -> tuple[int, str]:
    """A new token for `identity`; returns (id, token). The token is not stored and cannot be shown again."""
    if role not in ROLES:
        raise FlowdbError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    key = approver_key(identity)
    if not key or len(key) > 200:
        raise FlowdbError("the identity must be 1 to 200 characters (an email address, usually)")
    token = PREFIX + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        token_id = conn.execute(insert(T).values(identity=key, role=role, token_hash=token_hash(token),
                                                 created_at=Clock(conn.dialect.name).now).returning(T.c.id)).scalar_one()
    return int(token_id), token


def revoke_token(engine: Engine, token_id: int) -> None:
    with engine.begin() as conn:
        found = conn.execute(select(T.c.revoked_at).where(T.c.id == token_id)).first()
        if found is None:
            raise NotFound(f"token {token_id} does not exist; `flowdb tokens list` shows them")
        if found.revoked_at is None:
            conn.execute(update(T).where(T.c.id == token_id).values(revoked_at=Clock(conn.dialect.name).now))


def list_tokens(engine: Engine) -> list[TokenRow]:
    with read_only(engine).connect() as conn:
        return [TokenRow(r.id, r.identity, r.role, r.created_at, r.revoked_at)
                for r in conn.execute(select(T).order_by(T.c.id))]


def authenticate(engine: Engine, token: str | None) -> Principal:
    """The principal a bearer token stands for; TokenError when missing, unknown or revoked."""
    if not token:
        raise TokenError("a bearer token is required (Authorization: Bearer <token>)")
    if not token.startswith(PREFIX) or len(token) > 200:
        raise TokenError("the token is not valid")
    digest = token_hash(token)
    with read_only(engine).connect() as conn:
        row = conn.execute(select(T).where(T.c.token_hash == digest)).first()
    # The lookup is by hash (the token never meets the database); compare the hashes in constant time anyway.
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise TokenError("the token is not valid")
    if row.revoked_at is not None:
        raise TokenError("the token was revoked")
    return Principal(int(row.id), row.identity, row.role)
