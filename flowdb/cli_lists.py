"""`flowdb instances list` and `flowdb definitions list|show`: what is there, without writing SQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from flowdb.cli_common import LazyChoice, db_option, open_database
from flowdb.errors import NotFound


def _statuses() -> list[str]:
    from flowdb.engine.status import InstanceStatus

    return [s.value for s in InstanceStatus]


def _since(text: str) -> datetime:
    """A moment: an ISO date or date-time (UTC unless it says), or a duration back from now (2h, P1D)."""
    from flowdb.durations import parse_duration

    try:
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    except ValueError:
        pass
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a date (2026-12-01, 2026-12-01T09:00) nor a duration back "
                                 "from now (2h, 7d, P1D)", param_hint="--since") from None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _print(items: list[dict[str, Any]], as_json: bool, empty: str, header: str,
           line: Callable[[dict[str, Any]], str]) -> None:
    """Items as JSON, or as a table under a header (or a line saying there are none)."""
    if as_json:
        click.echo(json.dumps(items, indent=2))
    elif not items:
        click.echo(empty)
    else:
        click.echo(header)
        click.echo("-" * len(header))
        for item in items:
            click.echo(line(item))


@click.group("instances")
def instances_group() -> None:
    """Instances: list them (flowdb status ID shows one)."""


@instances_group.command("list")
@db_option
@click.option("--process", default=None, help="Only instances of this process.")
@click.option("--status", type=LazyChoice(_statuses), default=None, help="Only instances in this status.")
@click.option("--since", default=None, metavar="WHEN",
              help="Only instances created since WHEN: a date, a date-time (UTC) or a duration back (2h, P1D).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_instances(db_url: str | None, process: str | None, status: str | None, since: str | None, limit: int,
                   as_json: bool) -> None:
    """Instances, newest first."""
    from sqlalchemy import select

    from flowdb.db.engine import read_only
    from flowdb.db.tables import process_instances as I

    query = select(I.c.id, I.c.process_name, I.c.version, I.c.status, I.c.cost_usd, I.c.created_at,
                   I.c.finished_at, I.c.error).order_by(I.c.id.desc()).limit(limit)
    if process is not None:
        query = query.where(I.c.process_name == process)
    if status is not None:
        query = query.where(I.c.status == status)
    if since is not None:
        query = query.where(I.c.created_at >= _since(since))
    engine = open_database(db_url)
    with read_only(engine).connect() as conn:
        rows = conn.execute(query).all()
    items = [{"id": r.id, "process": r.process_name, "version": r.version, "status": r.status,
              "cost_usd": float(r.cost_usd or 0), "created_at": _iso(r.created_at),
              "finished_at": _iso(r.finished_at), "error": r.error} for r in rows]
    _print(items, as_json, "no instances" + (" match" if process or status or since else " yet"),
           f"{'id':>8}  {'process':<28} {'ver':>3}  {'status':<10} {'cost $':>9}  created (UTC)",
           lambda i: f"{i['id']:>8}  {i['process']:<28} {i['version']:>3}  {i['status']:<10} "
                     f"{i['cost_usd']:>9.4f}  {(i['created_at'] or '')[:19]}")


@click.group("definitions")
def definitions_group() -> None:
    """Deployed process definitions: list them, show one's YAML."""


@definitions_group.command("list")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_definitions(db_url: str | None, as_json: bool) -> None:
    """Every deployed process: its latest version, how many versions, when it was last deployed."""
    from sqlalchemy import func, select

    from flowdb.db.engine import read_only
    from flowdb.db.tables import process_definitions as D

    query = (select(D.c.name, func.max(D.c.version).label("latest"), func.count().label("versions"),
                    func.max(D.c.created_at).label("deployed_at"))
             .group_by(D.c.name).order_by(D.c.name))
    engine = open_database(db_url)
    with read_only(engine).connect() as conn:
        rows = conn.execute(query).all()
    items: list[dict[str, Any]] = [{"name": r.name, "latest_version": r.latest, "versions": r.versions,
                                    "deployed_at": _iso(r.deployed_at)} for r in rows]
    _print(items, as_json, "nothing is deployed yet; run flowdb deploy FILE",
           f"{'process':<32} {'latest':>6} {'versions':>8}  deployed (UTC)",
           lambda i: f"{i['name']:<32} {i['latest_version']:>6} {i['versions']:>8}  {(i['deployed_at'] or '')[:19]}")


@definitions_group.command("show")
@db_option
@click.argument("name")
@click.option("--version", "version", type=int, default=None, help="This version (else the latest).")
def show_definition(db_url: str | None, name: str, version: int | None) -> None:
    """A deployed definition's YAML, as it was deployed."""
    from sqlalchemy import select

    from flowdb.db.engine import read_only
    from flowdb.db.tables import process_definitions as D

    query = select(D.c.version, D.c.source).where(D.c.name == name)
    if version is not None:
        query = query.where(D.c.version == version)
    engine = open_database(db_url)
    with read_only(engine).connect() as conn:
        row = conn.execute(query.order_by(D.c.version.desc()).limit(1)).first()
        if row is None:
            known = list(conn.execute(select(D.c.name).distinct().order_by(D.c.name)).scalars())
    if row is None:
        what = f"{name} version {version}" if version is not None else name
        raise NotFound(f"process {what} is not deployed" + (f" (deployed: {', '.join(known)})" if known else
                                                            " (nothing is deployed yet; run flowdb deploy FILE)"))
    click.echo(f"# {name} version {row.version}")
    click.echo(row.source.rstrip("\n"))
