"""Runs: the instance list (filters, pages, counts per status, charts per day) and the instance page
(diagram, steps, timeline, operator actions)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Text, cast, func, or_, select
from sqlalchemy.sql.elements import ColumnElement
from starlette.responses import JSONResponse, RedirectResponse, Response

from flowdb.control import cancel_instance, cancel_step, pause_instance, resume_instance, retry_step
from flowdb.db.instances import DefinitionCache, instance_row
from flowdb.db.tables import events as E
from flowdb.db.tables import process_instances as I
from flowdb.db.tables import step_instances as S
from flowdb.engine.status import OPEN_STEP as OPEN_STEP_STATUSES
from flowdb.engine.status import InstanceStatus
from flowdb.rerun import rerun_instance

from ..routes.events import event_rows
from .charts import DayChart, day_chart
from .diagram import ItemCounts, graph_of
from .web import MAX_ID, SECURITY_HEADERS, UiCall, UiError

STATUSES = tuple(status.value for status in InstanceStatus)
OPEN_STEP = tuple(status.value for status in OPEN_STEP_STATUSES)
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(9998, 12, 31)  # what both databases' timestamps hold, with room
PAGE = 50
TIMELINE = 500  # newest events shown on an instance page
ITEM_ROWS = 200  # for_each item rows listed on an instance page (the diagram counts them all)
OWN_ROWS = 300  # step rows (each round of each step) listed, the newest
CHART_DAYS = 30
FOLD = "flowdb_fold"  # a function each SQLite connection gets for the runs search (_fold)


@dataclass(frozen=True)
class RunFilters:
    process: str | None
    status: str | None
    since: date | None
    until: date | None
    text: str | None

    def where(self, with_status: bool = True, sqlite: bool = False) -> list[ColumnElement[bool]]:
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
            clauses.append(self._matches(self.text, sqlite))
        return clauses

    @staticmethod
    def _matches(text: str, sqlite: bool) -> ColumnElement[bool]:
        """Any of the searched columns holds `text`, whatever its case. SQLite's lower() folds ASCII only
        and its JSON keeps \\u escapes, so there the connection's fold function (FOLD) does both."""
        fold = getattr(func, FOLD) if sqlite else func.lower
        needle = text.casefold() if sqlite else text.lower()
        columns = [I.c.process_name, func.coalesce(I.c.error, ""), func.coalesce(I.c.idempotency_key, ""),
                   cast(I.c.inputs, Text)]
        matches: list[ColumnElement[bool]] = [fold(c).contains(needle, autoescape=True) for c in columns]
        if text.isascii() and text.isdigit() and len(text) < 19:
            matches.append(I.c.id == int(text))
        return or_(*matches)

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
        day = date.fromisoformat(raw)
    except ValueError:
        raise UiError(422, f"{what} must be a date as YYYY-MM-DD, not {raw[:40]!r}") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise UiError(422, f"{what} must be a day from {FIRST_DAY} to {LAST_DAY}")
    return day


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
        if value.startswith("id:") and value[3:].isascii() and value[3:].isdigit() and int(value[3:]) <= MAX_ID:
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


def _fold(value: str | None) -> str | None:
    """SQLite's FOLD: the text case-folded, JSON's \\u escapes read first (what `?q=` compares with)."""
    if value is None:
        return None
    if "\\u" in value:
        try:
            value = json.dumps(json.loads(value), ensure_ascii=False)
        except ValueError:
            pass
    return value.casefold()


def _load_runs(engine: Engine, filters: RunFilters, after: int | None) -> RunsPage:
    sqlite = engine.dialect.name == "sqlite"
    query = select(I).where(*filters.where(sqlite=sqlite)).order_by(I.c.id.desc()).limit(PAGE + 1)
    if after is not None:
        query = query.where(I.c.id < after)
    with engine.connect() as conn:
        if sqlite and filters.text:
            conn.connection.driver_connection.create_function(  # type: ignore[union-attr]
                FOLD, 1, _fold, deterministic=True)
        rows = list(conn.execute(query).all())
        counts = {status: 0 for status in STATUSES}
        counts.update({row[0]: int(row[1]) for row in conn.execute(
            select(I.c.status, func.count()).where(*filters.where(with_status=False, sqlite=sqlite))
            .group_by(I.c.status))})
        processes = list(conn.execute(select(I.c.process_name).distinct().order_by(I.c.process_name)).scalars())
        chart = day_chart(_daily(conn, filters.process), CHART_DAYS)
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    return RunsPage(rows, _cursor_of(rows[-1].id) if more else None, counts, processes, chart)


def _daily(conn: Connection, process: str | None) -> dict[str, tuple[int, float]]:
    """Instances created and what they cost, per UTC day, over the chart's days (v_process_daily's
    numbers, read straight from the instances of those days: the view ranks all history first)."""
    first = datetime.now(UTC).date() - timedelta(days=CHART_DAYS - 1)
    day = func.strftime("%Y-%m-%d", I.c.created_at)  # PostgreSQL has it too (migration 0005), in UTC
    query = (select(day.label("day"), func.count(), func.coalesce(func.sum(I.c.cost_usd), 0))
             .where(I.c.created_at >= datetime(first.year, first.month, first.day, tzinfo=UTC)).group_by(day))
    if process:
        query = query.where(I.c.process_name == process)
    return {str(row[0]): (int(row[1]), float(row[2] or 0)) for row in conn.execute(query)}


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
    rounds_cut: bool  # more step rounds than OWN_ROWS: the oldest are not listed
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
        # A loop may run a step thousands of rounds: the newest OWN_ROWS rows are listed.
        own = list(conn.execute(select(S).where(mine, S.c.item.is_(None)).order_by(S.c.id.desc())
                                .limit(OWN_ROWS + 1)).all())
        own_more = len(own) > OWN_ROWS
        own = own[:OWN_ROWS]
        counts = _item_counts(conn, instance_id)
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
        definition = definitions.get(conn, instance.definition_id)
        if own_more:  # the diagram needs each step's newest round, listed or not
            graph = _load_graph(engine, definitions, instance_id)
        else:
            graph = {**graph_of(definition, own, counts), "instance_status": instance.status}
    events.reverse()
    steps = sorted(own + items, key=lambda row: row.id)
    return InstanceView(instance, steps, items_total, own_more, events, graph, total)


def _item_counts(conn: Connection, instance_id: int) -> ItemCounts:
    counts: ItemCounts = {}
    for step_id, round_, status, count in conn.execute(
            select(S.c.step_id, S.c.round, S.c.status, func.count())
            .where(S.c.instance_id == instance_id, S.c.item.is_not(None))
            .group_by(S.c.step_id, S.c.round, S.c.status)):
        counts.setdefault((step_id, round_), {})[status] = int(count)
    return counts


def _instance_id(call: UiCall) -> int:
    return call.path_id("instance_id")


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


def _load_graph(engine: Engine, definitions: DefinitionCache, instance_id: int) -> dict[str, Any]:
    """The diagram's statuses alone (what each live refresh reads): no inputs, outputs or events."""
    with engine.connect() as conn:
        instance = instance_row(conn, instance_id)
        mine = S.c.instance_id == instance_id
        own = conn.execute(select(S.c.step_id, S.c.round, S.c.item, S.c.status, S.c.attempt, S.c.max_attempts,
                                  S.c.items_total).where(mine, S.c.item.is_(None))).all()
        graph = graph_of(definitions.get(conn, instance.definition_id), own, _item_counts(conn, instance_id))
    return {**graph, "instance_status": instance.status}


async def instance_graph(call: UiCall) -> Response:
    graph = await call.db(_load_graph, call.reader, call.request.app.state.definitions, _instance_id(call))
    return JSONResponse(graph, headers=SECURITY_HEADERS)


DONE_MESSAGES = {
    "cancelled": "The instance was cancelled.",
    "retried": "The step is ready to run again.",
    "step-cancelled": "The step was cancelled; its successors go on as after a skipped step.",
    "paused": "The instance is paused: no new step starts until it resumes (running steps finish).",
    "resumed": "The instance resumed: its steps start as they are due.",
    "rerun": "The instance runs again from that step: it and the steps after it run as new rounds.",
}


def _back(instance_id: int, done: str) -> Response:
    return RedirectResponse(f"/ui/instances/{instance_id}?done={done}", status_code=303)


async def cancel(call: UiCall) -> Response:
    instance_id = _instance_id(call)
    await call.db(cancel_instance, call.engine, instance_id, f"cancelled by {call.who.identity} in the web UI",
                  call.wakeups)
    return _back(instance_id, "cancelled")


async def pause(call: UiCall) -> Response:
    instance_id = _instance_id(call)
    await call.db(pause_instance, call.engine, instance_id, f"{call.who.identity} (web UI)", call.wakeups)
    return _back(instance_id, "paused")


async def resume(call: UiCall) -> Response:
    instance_id = _instance_id(call)
    await call.db(resume_instance, call.engine, instance_id, f"{call.who.identity} (web UI)", call.wakeups)
    return _back(instance_id, "resumed")


async def rerun(call: UiCall) -> Response:
    instance_id = _instance_id(call)
    await call.db(rerun_instance, call.engine, instance_id, call.request.path_params["step_id"],
                  f"{call.who.identity} (web UI)", None, call.wakeups)
    return _back(instance_id, "rerun")


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
