"""`flowdb report VIEW`: a reporting view (sql/*.sql) as a table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from flowdb.cli_common import db_option, open_database

if TYPE_CHECKING:
    from flowdb.reports import Report

_TABLE_TEXT_WIDTH = 60  # longer text (errors) is cut in the table; CSV and JSON keep all of it


@click.command("report")
@db_option
@click.argument("view")
@click.option("--process", default=None, help="Only rows of this process (views with a process column).")
@click.option("--since", default=None, metavar="YYYY-MM-DD",
              help="Only rows whose UTC day is this day or later (views with a day column).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N rows.")
def report(db_url: str | None, view: str, process: str | None, since: str | None, fmt: str,
           limit: int | None) -> None:
    """Print a reporting view. VIEW is one of the views in sql/ (the v_ prefix may be left out):
    v_instance_summary, v_step_runs, v_process_daily, v_step_stats, v_approval_latency, v_cost_by_agent.
    docs/reporting.md explains every column."""
    from flowdb.db.engine import read_only
    from flowdb.reports import FilterError, ReportError, parse_day, resolve_view, run_report

    try:
        name = resolve_view(view)
    except ReportError as exc:
        raise click.BadParameter(str(exc), param_hint="VIEW") from None
    try:
        day = parse_day(since) if since is not None else None
    except ReportError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    engine = open_database(db_url)
    with read_only(engine).connect() as conn:  # on SQLite a report never holds up the workers
        try:
            result = run_report(conn, name, process=process, since=day, limit=limit)
        except FilterError as exc:
            raise click.UsageError(str(exc)) from None
    click.echo({"table": as_table, "csv": as_csv, "json": as_json}[fmt](result), nl=fmt != "csv")


def as_json(result: Report) -> str:
    return json.dumps([{name: _json_value(value) for name, value in zip(result.columns, row, strict=True)}
                       for row in result.rows], indent=2)


def as_csv(result: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    writer.writerows([_text(value, iso=True) for value in row] for row in result.rows)
    return out.getvalue()


def as_table(result: Report) -> str:
    cells = [[_text(value, iso=False) for value in row] for row in result.rows]
    numeric = [all(isinstance(row[i], int | float) or row[i] is None for row in result.rows)
               for i in range(len(result.columns))]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(result.columns)]

    def line(values: list[str]) -> str:
        return "  ".join(value.rjust(width) if right else value.ljust(width)
                         for value, width, right in zip(values, widths, numeric, strict=True)).rstrip()

    lines = [line(result.columns), line(["-" * width for width in widths]), *(line(row) for row in cells)]
    if not cells:
        lines.append(f"(no rows in {result.view})")
    return "\n".join(lines)


def _text(value: Any, *, iso: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat() if iso else value.strftime("%Y-%m-%d %H:%M:%S")
    text = str(value)
    if iso:
        return text
    text = " ".join(text.split())  # one line per row in a table
    return text if len(text) <= _TABLE_TEXT_WIDTH else text[:_TABLE_TEXT_WIDTH - 1] + "…"


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value

