"""Runs: the instance list (filters, pages, counts per status, charts per day) and the instance page
(diagram, steps, timeline, operator actions)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Text, cast, func, or_, select
from sqlalchemy.sql.elements import ColumnElement
from starlette.responses import JSONResponse, RedirectResponse, Response

from flowdb.control import cancel_instance, cancel_step, retry_step
from flowdb.db.instances import DefinitionCache, instance_row
from flowdb.db.tables import events as E
from flowdb.db.tables import process_instances as I
from flowdb.db.tables import step_instances as S
from flowdb.reports import run_report

from ..routes.events import event_rows
from .charts import DayChart, day_chart
from .diagram import ItemCounts, graph_of
from .web import SECURITY_HEADERS, UiCall, UiError

STATUSES = ("running", "completed", "failed", "cancelled")
OPEN_STEP = ("pending", "ready", "running", "waiting")
PAGE = 50
TIMELINE = 500  # newest events shown on an instance page
ITEM_ROWS = 200  # for_each item rows listed on an instance page (the diagram counts them all)
CHART_DAYS = 30


@dataclass(frozen=True)
class RunFilters:
    process: str | None
    status: str | None
    since: date | None
    until: date | None
    text: str | None

    def where(self, with_status: bool = True) -> list[ColumnElement[bool]]:
        clauses: list[ColumnElement[bool]] = []
        if self.process:
            clauses.append(I.c.process_name == self.process)
        if with_status and self.status:
            clauses.append(I.c.status == self.status)
        if self.since:
            clauses.append(I.c.created_at >= datetime(self.since.year, self.since.month, self.since.day, tzinfo=UTC))
        if self.until:
            end = self.until + timedelta(days=1)
            clauses.append(I.c.created_at < datetime(end.year, end.month, end.day, tzinfo=UTC))
        if self.text:
            needle = self.text.lower()
            matches: list[ColumnElement[bool]] = [
                func.lower(I.c.process_name).contains(needle, autoescape=True),
                func.lower(func.coalesce(I.c.error, "")).contains(needle, autoescape=True),
                func.lower(func.coalesce(I.c.idempotency_key, "")).contains(needle, autoescape=True),
                func.lower(cast(I.c.inputs, Text)).contains(needle, autoescape=True),
            ]
            if self.text.isascii() and self.text.isdigit() and len(self.text) < 19:
                matches.append(I.c.id == int(self.text))
            clauses.append(or_(*matches))
        return clauses

    def query_string(self, **changes: Any) -> str:
        """These filters as a query string (for paging and the status links), with some changed."""
        from urllib.parse import urlencode

        values = {"process": self.process, "status": self.status, "since": self.since, "until": self.until,
                  "q": self.text, **changes}
        return urlencode({k: str(v) for k, v in values.items() if v not in (None, "")})


def _day(raw: str | None, what: str) -> date | None:
    if not raw:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise UiError(422, f"{what} must be a date as YYYY-MM-DD, not {raw[:40]!r}") from None


def _filters(call: UiCall) -> RunFilters:
    params = call.request.query_params
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        raise UiError(422, f"status must be one of {', '.join(STATUSES)}")
    text = (params.get("q") or "").strip() or None
    if text is not None and len(text) > 200:
        raise UiError(422, "the search text is longer than 200 characters")
    return RunFilters(params.get("process") or None, status, _day(params.get("since"), "since"),
                      _day(params.get("until"), "until"), text)


def _cursor(raw: str | None) -> int | None:
    if not raw:
        return None
    try:
        value = base64.urlsafe_b64decode(raw.encode() + b"=" * (-len(raw) % 4)).decode()
        if value.startswith("id:") and value[3:].isdigit() and len(value) < 25:
            return int(value[3:])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise UiError(422, "that page link is not one this server made; start again from the first page")


def _cursor_of(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


@dataclass
class RunsPage:
    rows: list[Any]
    next_cursor: str | None
    counts: dict[str, int]
    processes: list[str]
    chart: DayChart


def _load_runs(engine: Engine, filters: RunFilters, after: int | None) -> RunsPage:
    query = select(I).where(*filters.where()).order_by(I.c.id.desc()).limit(PAGE + 1)
    if after is not None:
        query = query.where(I.c.id < after)
    with engine.connect() as conn:
        rows = list(conn.execute(query).all())
        counts = {status: 0 for status in STATUSES}
        counts.update({row[0]: int(row[1]) for row in conn.execute(
            select(I.c.status, func.count()).where(*filters.where(with_status=False)).group_by(I.c.status))})
        processes = list(conn.execute(select(I.c.process_name).distinct().order_by(I.c.process_name)).scalars())
        chart = day_chart(_daily(conn, filters.process), CHART_DAYS)
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    return RunsPage(rows, _cursor_of(rows[-1].id) if more else None, counts, processes, chart)


def _daily(conn: Connection, process: str | None) -> dict[str, tuple[int, float]]:
    """Instances started and what they cost, per UTC day (v_process_daily), over the chart's days."""
    since = datetime.now(UTC).date() - timedelta(days=CHART_DAYS - 1)
    report = run_report(conn, "v_process_daily", process=process, since=since)
    day, started, cost = (report.columns.index(c) for c in ("day", "started", "cost_usd"))
    totals: dict[str, tuple[int, float]] = {}
    for row in report.rows:
        count, spent = totals.get(row[day], (0, 0.0))
        totals[row[day]] = (count + int(row[started] or 0), spent + float(row[cost] or 0))
    return totals


async def runs(call: UiCall) -> Response:
    filters = _filters(call)
    page = await call.db(_load_runs, call.reader, filters, _cursor(call.request.query_params.get("cursor")))
    return call.render("runs.html", title="Runs", filters=filters, page=page, statuses=STATUSES)


# -- one instance -------------------------------------------------------------------------------------


@dataclass
class InstanceView:
    instance: Any
    steps: list[Any]  # every step's own rows, and the first ITEM_ROWS for_each item rows, in id order
    items_total: int  # for_each item rows in all
    events: list[Any]
    graph: dict[str, Any]
    events_total: int

    @property
    def items_shown(self) -> int:
        return sum(1 for row in self.steps if row.item is not None)


def _load_instance(engine: Engine, definitions: DefinitionCache, instance_id: int, *,
                   with_events: bool = True) -> InstanceView:
    """What the instance page shows; a for_each of 10,000 items reads its counts, not its rows."""
    with engine.connect() as conn:
        instance = instance_row(conn, instance_id)
        mine = S.c.instance_id == instance_id
        own = list(conn.execute(select(S).where(mine, S.c.item.is_(None)).order_by(S.c.id)).all())
        counts: ItemCounts = {}
        for step_id, round_, status, count in conn.execute(
                select(S.c.step_id, S.c.round, S.c.status, func.count()).where(mine, S.c.item.is_not(None))
                .group_by(S.c.step_id, S.c.round, S.c.status)):
            counts.setdefault((step_id, round_), {})[status] = int(count)
        items_total = sum(sum(per.values()) for per in counts.values())
        items = list(conn.execute(select(S).where(mine, S.c.item.is_not(None)).order_by(S.c.id)
                                  .limit(ITEM_ROWS)).all()) if items_total else []
        events: list[Any] = []
        total = 0
        if with_events:
            events = list(conn.execute(event_rows().where(E.c.instance_id == instance_id)
                                       .order_by(E.c.id.desc()).limit(TIMELINE)).all())
            total = int(conn.execute(select(func.count()).select_from(E).where(E.c.instance_id == instance_id))
                        .scalar_one())
        graph = graph_of(definitions.get(conn, instance.definition_id), own, counts)
    events.reverse()
    steps = sorted(own + items, key=lambda row: row.id)
    return InstanceView(instance, steps, items_total, events, graph, total)


def _instance_id(call: UiCall) -> int:
    value = int(call.request.path_params["instance_id"])
    if value > 2**63 - 1:
        raise UiError(404, f"instance {value} does not exist")
    return value


async def instance_page(call: UiCall) -> Response:
    instance_id = _instance_id(call)
    view = await call.db(_load_instance, call.reader, call.request.app.state.definitions, instance_id)
    done = call.request.query_params.get("done")
    return call.render("instance.html", title=f"Instance {instance_id}", view=view, open_statuses=OPEN_STEP,
                       done=DONE_MESSAGES.get(done or ""))


async def instance_live(call: UiCall) -> Response:
    """The part of the instance page that changes (status, steps, timeline), for the page's script to swap in."""
    instance_id = _instance_id(call)
    view = await call.db(_load_instance, call.reader, call.request.app.state.definitions, instance_id)
    return call.render("instance_live.html", view=view, open_statuses=OPEN_STEP)


async def instance_graph(call: UiCall) -> Response:
    instance_id = _instance_id(call)
    view = await call.db(_load_instance, call.reader, call.request.app.state.definitions, instance_id,
                         with_events=False)
    return JSONResponse({**view.graph, "instance_status": view.instance.status}, headers=SECURITY_HEADERS)


DONE_MESSAGES = {
    "cancelled": "The instance was cancelled.",
    "retried": "The step is ready to run again.",
    "step-cancelled": "The step was cancelled; its successors go on as after a skipped step.",
}


def _back(instance_id: int, done: str) -> Response:
    return RedirectResponse(f"/ui/instances/{instance_id}?done={done}", status_code=303)


async def cancel(call: UiCall) -> Response:
    instance_id = _instance_id(call)
    await call.db(cancel_instance, call.engine, instance_id, f"cancelled by {call.who.identity} in the web UI",
                  call.wakeups)
    return _back(instance_id, "cancelled")


async def retry(call: UiCall) -> Response:
    instance_id = _instance_id(call)
    await call.db(retry_step, call.engine, instance_id, call.request.path_params["step_id"])
    call.wakeups.notify(workers=True, events=True)
    return _back(instance_id, "retried")


async def cancel_one_step(call: UiCall) -> Response:
    instance_id = _instance_id(call)
    await call.db(cancel_step, call.engine, instance_id, call.request.path_params["step_id"],
                  f"cancelled by {call.who.identity} in the web UI", call.wakeups)
    return _back(instance_id, "step-cancelled")
