"""`flowdb tokens create|list|revoke`: bearer tokens for the HTTP API."""

from __future__ import annotations

import click

from flowdb.cli_common import LazyChoice, create_option, db_option, open_database


def _roles() -> tuple[str, ...]:
    from flowdb.tokens import ROLES

    return ROLES


@click.group("tokens")
def tokens_group() -> None:
    """Create, list and revoke HTTP API tokens."""


@tokens_group.command("create")
@db_option
@create_option
@click.option("--identity", required=True, help="Who the token acts as (an approver's email address, usually).")
@click.option("--role", type=LazyChoice(_roles), required=True,
              help="viewer: reads instances, definitions, reports; approver: inbox and decisions; operator: both, "
                   "also start, cancel, retry; admin: also deploy.")
def create_cmd(db_url: str | None, create: bool, identity: str, role: str) -> None:
    """Create a token and print it once (only its hash is stored)."""
    from flowdb.tokens import create_token

    token_id, token = create_token(open_database(db_url, create=create, offers_create=True), identity, role)
    click.echo(token)
    click.echo(f"token {token_id} for {identity} ({role}); it is shown only now", err=True)


@tokens_group.command("list")
@db_option
def list_cmd(db_url: str | None) -> None:
    """Tokens (never the tokens themselves): id, identity, role, created, revoked."""
    from flowdb.tokens import list_tokens

    for row in list_tokens(open_database(db_url)):
        revoked = f"revoked {row.revoked_at:%Y-%m-%d %H:%M:%S}" if row.revoked_at else "active"
        created = f"{row.created_at:%Y-%m-%d %H:%M:%S}"
        click.echo(f"{row.id:>5}  {row.role:<9} {row.identity:<40} created {created}  {revoked}")


@tokens_group.command("revoke")
@db_option
@click.argument("token_id", type=int)
def revoke_cmd(db_url: str | None, token_id: int) -> None:
    """Revoke a token: requests carrying it get 401 from now on."""
    from flowdb.tokens import revoke_token

    revoke_token(open_database(db_url), token_id)
    click.echo(f"token {token_id} revoked")
