"""`flowdb budget show|set`: an instance's budgets from the command line."""

from __future__ import annotations

import json
from typing import Any

import click

from flowdb.cli_common import db_option, open_database


@click.group("budget")
def budget_group() -> None:
    """Show and set an instance's budgets."""


@budget_group.command("show")
@db_option
@click.argument("instance_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show_cmd(db_url: str | None, instance_id: int, as_json: bool) -> None:
    """The instance's budgets and what was spent against each."""
    from flowdb.budget_ops import instance_budgets
    from flowdb.db.instances import instance_row

    engine = open_database(db_url)
    with engine.connect() as conn:
        instance_row(conn, instance_id)
        rows = instance_budgets(conn, instance_id)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"instance {instance_id} has no budgets")
        return
    click.echo(f"{'budget':<20} {'spent':>12} {'limit':>12} {'tokens':>10} {'of':>10}  on_exceed")
    for row in rows:
        click.echo(f"{_name(row):<20} {_usd(row['spent_usd']):>12} {_usd(row['max_cost_usd']):>12} "
                   f"{row['spent_tokens']:>10} {row['max_tokens'] or '-':>10}  {row['on_exceed']}"
                   + (f" ({row['approver']})" if row["approver"] else "")
                   + (f", raised {row['raises']}x" if row["raises"] else ""))


@budget_group.command("set")
@db_option
@click.argument("instance_id", type=int)
@click.option("--step", "step_id", default=None, help="The agent task whose own budget to set (default: the "
              "process's).")
@click.option("--max-cost-usd", type=float, default=None, help="The new cost limit in US dollars.")
@click.option("--max-tokens", type=int, default=None, help="The new token limit (in and out together).")
@click.option("--by", "who", default="cli", show_default=True, help="Who sets it (recorded in the event).")
def set_cmd(db_url: str | None, instance_id: int, step_id: str | None, max_cost_usd: float | None,
            max_tokens: int | None, who: str) -> None:
    """Set a budget's limits for a running instance; steps a budget holds back (on_exceed: pause) check again."""
    from flowdb.budget_ops import set_budget
    from flowdb.notify import Wakeups
    from flowdb.settings import load_settings

    engine = open_database(db_url)
    rows = set_budget(engine, instance_id, step_id, max_cost_usd, max_tokens, who,
                      Wakeups(load_settings().redis_url))
    for row in rows:
        click.echo(f"{_name(row)}: {_usd(row['spent_usd'])} spent of {_usd(row['max_cost_usd'])}, "
                   f"{row['spent_tokens']} tokens of {row['max_tokens'] or '-'}")


def _name(row: dict[str, Any]) -> str:
    return "process" if row["step_id"] is None else f"step {row['step_id']}"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"
