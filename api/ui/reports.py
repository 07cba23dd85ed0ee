"""Reports: each reporting view (sql/*.sql) as a sortable table, and as CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from starlette.responses import Response, StreamingResponse

from flowdb.db.views import view_names
from flowdb.reports import Report, ReportError, resolve_view, run_report, stream_report

from .web import SECURITY_HEADERS, UiCall, UiError

SHOWN = 1000  # rows on the page; the CSV has them all


def _view(call: UiCall) -> str:
    try:
        return resolve_view(call.request.path_params["view"])
    except ReportError as exc:
        raise UiError(404, str(exc)) from None


def _order(call: UiCall) -> tuple[str | None, bool]:
    params = call.request.query_params
    direction = params.get("dir", "asc")
    if direction not in ("asc", "desc"):
        raise UiError(422, "dir must be asc or desc")
    return params.get("sort") or None, direction == "desc"


def _load(engine: Engine, view: str, sort: str | None, descending: bool, limit: int | None) -> Report:
    with engine.connect() as conn:
        try:
            return run_report(conn, view, sort=sort, descending=descending, limit=limit)
        except ReportError as exc:
            raise UiError(422, str(exc)) from None


async def reports_page(call: UiCall) -> Response:
    return call.render("reports.html", title="Reports", views=view_names())


async def report_page(call: UiCall) -> Response:
    view = _view(call)
    sort, descending = _order(call)
    report = await call.db(_load, call.reader, view, sort, descending, SHOWN + 1)
    more = len(report.rows) > SHOWN
    return call.render("report.html", title=view, view=view, report=report, rows=report.rows[:SHOWN], more=more,
                       shown=SHOWN, sort=sort, descending=descending)


def _cell(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula


def _csv(engine: Engine, view: str, sort: str | None, descending: bool) -> Iterator[str]:
    """The view as CSV, read and written a batch at a time (Starlette runs each step in a thread)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    with engine.connect() as conn:
        columns, rows = stream_report(conn, view, sort=sort, descending=descending)
        writer.writerow(columns)
        for row in rows:
            # A cell a spreadsheet would run as a formula is written with a quote before it.
            writer.writerow(["'" + v if isinstance(v, str) and v.startswith(FORMULA_START) else _cell(v)
                             for v in row])
            if buffer.tell() > 65536:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    yield buffer.getvalue()


def _check(engine: Engine, view: str, sort: str | None) -> None:
    """Refuse a bad sort before the response starts (a streamed body cannot become an error page)."""
    _load(engine, view, sort, False, 0)


async def report_csv(call: UiCall) -> Response:
    view = _view(call)
    sort, descending = _order(call)
    await call.db(_check, call.reader, view, sort)
    headers = {**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{view}.csv"'}
    return StreamingResponse(_csv(call.reader, view, sort, descending), media_type="text/csv; charset=utf-8",
                             headers=headers)
