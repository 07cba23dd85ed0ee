"""`flowdb approvals list|show|decide`: the approval inbox from the command line."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from flowdb.cli_common import LazyChoice, db_option, open_database

if TYPE_CHECKING:
    from flowdb.approvals import Vote
    from flowdb.db.approvals import ApprovalRow


def _statuses() -> tuple[str, ...]:
    from flowdb.approvals import APPROVAL_STATUSES

    return APPROVAL_STATUSES


@click.group("approvals")
def approvals_group() -> None:
    """List, show and decide human approvals."""


@approvals_group.command("list")
@db_option
@click.option("--approver", default=None, help="Only approvals that list this identity (an inbox).")
@click.option("--status", type=LazyChoice(_statuses), default=None, help="Only approvals in this status.")
@click.option("--instance", "instance_id", type=int, default=None, help="Only approvals of this instance.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(db_url: str | None, approver: str | None, status: str | None, instance_id: int | None, limit: int,
             as_json: bool) -> None:
    """Approvals, newest first."""
    from flowdb.approvals import list_approvals

    engine = open_database(db_url)
    rows = list_approvals(engine, approver=approver, status=status, instance_id=instance_id, limit=limit)
    if as_json:
        click.echo(json.dumps([approval_json(row) for row in rows], indent=2))
        return
    if not rows:
        click.echo("no approvals" + (" match" if approver or status or instance_id else ""))
        return
    header = f"{'id':>6}  {'status':<9} {'instance':>8}  {'step':<16} {'requested':<19}  {'due':<19}  title"
    click.echo(header)
    for row in rows:
        click.echo(f"{row.id:>6}  {row.status:<9} {row.instance_id:>8}  {row.step_id[:16]:<16} "
                   f"{_time(row.created_at):<19}  {_time(row.due_at):<19}  {row.title}")


@approvals_group.command("show")
@db_option
@click.argument("approval_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def show_cmd(db_url: str | None, approval_id: int, as_json: bool) -> None:
    """One approval: what it asks, its artifacts, who decided what."""
    from flowdb.approvals import get_approval

    engine = open_database(db_url)
    approval, votes = get_approval(engine, approval_id)
    if as_json:
        click.echo(json.dumps({**approval_json(approval), "votes": [vote_json(v) for v in votes]}, indent=2))
        return
    click.echo(f"approval {approval.id}: {approval.title}")
    click.echo(f"  status      {approval.status}" + (f" ({approval.decision})" if approval.decision else ""))
    click.echo(f"  instance    {approval.instance_id}, step {approval.step_id}")
    click.echo(f"  requested   {_time(approval.created_at)}; due {_time(approval.due_at) or 'never'}; "
               f"on timeout: {approval.on_timeout}")
    click.echo(f"  quorum      {approval.quorum} of {len(approval.approvers)}")
    if approval.instructions:
        click.echo(f"  instructions {approval.instructions}")
    for artifact in approval.artifacts:
        click.echo(f"  artifact    {artifact}")
    for vote in votes:
        said = f"{vote.decision} at {_time(vote.decided_at)}" if vote.decision else "has not decided"
        click.echo(f"  approver    {vote.approver}: {said}" + (f" ({vote.comment})" if vote.comment else ""))


@approvals_group.command("decide")
@db_option
@click.argument("approval_id", type=int)
@click.argument("decision", metavar="approve|reject")
@click.option("--as", "identity", required=True, help="Who decides: one of the approval's approvers.")
@click.option("--comment", default=None, help="Why (kept with the decision).")
def decide_cmd(db_url: str | None, approval_id: int, decision: str, identity: str, comment: str | None) -> None:
    """Approve or reject an approval as one of its approvers.

    DECISION is approve or reject (approved and rejected are taken too, in any case), as over the HTTP API."""
    from flowdb.approvals import decide
    from flowdb.settings import load_settings

    settings = load_settings(database_url=db_url)
    engine = open_database(db_url)
    result = decide(engine, approval_id, decision, identity, comment, redis_url=settings.redis_url)
    if result.decided:
        click.echo(f"approval {approval_id} {result.approval.status} by {result.approval.decided_by}; "
                   f"instance {result.approval.instance_id} continues")
    else:
        click.echo(f"recorded: {identity} {result.vote} approval {approval_id}; "
                   f"{result.approvals_needed} more approval(s) needed")


def _time(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else ""


def approval_json(row: ApprovalRow) -> dict[str, Any]:
    def iso(moment: Any) -> str | None:
        return moment.isoformat() if moment else None

    return {"id": row.id, "instance_id": row.instance_id, "step_id": row.step_id, "status": row.status,
            "decision": row.decision, "decided_by": row.decided_by, "comment": row.comment, "title": row.title,
            "instructions": row.instructions, "artifacts": row.artifacts, "approvers": row.approvers,
            "quorum": row.quorum, "on_timeout": row.on_timeout, "timeout_s": row.timeout_s,
            "reminders": row.reminders, "requested_at": iso(row.created_at), "due_at": iso(row.due_at),
            "notified_at": iso(row.notified_at), "decided_at": iso(row.decided_at)}


def vote_json(vote: Vote) -> dict[str, Any]:
    return {"approver": vote.approver, "decision": vote.decision, "comment": vote.comment,
            "decided_at": vote.decided_at.isoformat() if vote.decided_at else None}
