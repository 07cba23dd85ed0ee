"""GET /v1/events/stream: the events table as server-sent events, in id order, resumable.

Every event row becomes one SSE message: `id:` the row's id, `event:` its type (`step.completed`...),
`data:` the row as JSON (EventOut). The stream starts after the newest event when it is opened (once
the response headers have arrived, every event committed later is delivered), after `?after=N`, or,
when a client reconnects, after its `Last-Event-ID` (which wins over `?after`, since an EventSource
reconnects to the same URL). `?instance=N` keeps one instance's events.

The table is the truth: the stream always reads it, in pages, in id order. Between reads it waits
for a message on the Redis channel `flowdb:events` (published after commits that wrote events) or
for `api_stream_poll_seconds`, whichever comes first; without Redis, or while Redis is down, it
just polls. A comment line (`: ping`) goes out every 15 s to keep proxies from closing the stream.
While the database is unavailable an open stream stays open and reads again every few seconds (a
new stream is refused with 503 until it is back); no event is skipped, since the cursor only moves
on what was read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, func, select, text
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import Response

from flowdb.db.engine import database_unavailable
from flowdb.db.tables import events as E
from flowdb.db.tables import process_instances
from flowdb.db.tables import step_instances as S
from flowdb.errors import NotFound
from flowdb.notify import EVENTS_CHANNEL

from ..convert import utc
from ..endpoints import Call, Endpoint, Header, Query
from ..problems import ApiError
from ..schemas import EventOut

log = logging.getLogger("flowdb_api.events")

PAGE = 500  # events sent per read
SCAN = 2000  # event ids examined per read, looking for gaps (cheap: the primary key's index)
PING_SECONDS = 15
RECHECK_SECONDS = 30.0  # how often an open stream checks that its token or UI session is still good
GAP_SECONDS = 10.0  # a gap this old (by the database's clock) is passed even if nothing proved it empty
GAP_RECHECK_SECONDS = 0.2  # how soon to read again while a gap holds the stream back
REDIS_RETRY_SECONDS = 5.0
DATABASE_RETRY_SECONDS = (0.5, 5.0)  # while the database is unavailable: first wait, longest wait
MAX_ID = 2**63 - 1

# PostgreSQL: the snapshot the read runs in (REPEATABLE READ: one snapshot for every statement of it).
SNAPSHOT_SQL = text("SELECT pg_snapshot_xmin(s)::text::bigint AS xmin, pg_snapshot_xmax(s)::text::bigint AS xmax, "
                    "clock_timestamp() AS now FROM pg_current_snapshot() AS s")


# -- which ids are safe to send ------------------------------------------------------------------
#
# Ids are assigned when a row is inserted, not when its transaction commits. On PostgreSQL, two
# writers can take ids 10 and 11 and the one holding 11 can commit first: a reader then sees 11
# but not 10. A stream that sent 11 and moved its cursor past it would never send 10 (and a client
# resuming with Last-Event-ID: 11 would never see it either). So a stream never sends past a gap in
# the ids until the gap is known to stay empty ("closed"):
#
# * SQLite: writers are serialized (one write transaction at a time, ids taken under the write
#   lock), so ids become visible in order and a gap (rows deleted by hand) is permanent: closed.
# * PostgreSQL, exactly: every read records its snapshot's xmin (the oldest transaction still
#   running) and xmax (the next transaction id to be handed out). A gap seen on one read gets the
#   xmax of a later read's snapshot (by then the transaction holding the missing id has its
#   transaction id, which is below that xmax; taking the first read's xmax could, in a window of
#   microseconds, precede it). Once a read's xmin reaches that xmax, every transaction that could
#   hold a missing id has ended; the read's own scan (same snapshot) shows the ids they committed,
#   and whatever is still missing was rolled back: closed. A rolled-back insert therefore delays
#   the stream by two or three quick re-reads (GAP_RECHECK_SECONDS apart), not more.
# * PostgreSQL, backstop: a long writing transaction anywhere in the cluster (transaction ids are
#   cluster-wide: a migration or a bulk import, in any database) keeps xmin back; so a gap whose
#   next present row is GAP_SECONDS old by the database's clock is closed anyway, and a stream
#   never stalls for longer than that. The cost: an event whose transaction stays open for more
#   than GAP_SECONDS after inserting it, and then commits, is not streamed (it is in the table, and
#   GET /v1/instances/{id}/events shows it). flowdb's own transactions last milliseconds. Resuming
#   from an old Last-Event-ID passes old gaps (rolled-back ids) at once: their next rows are old.
#
# An instance filter does not change this: gaps are judged on all ids (another instance's event
# in flight is a gap too, since the stream cannot know whose it is until it is committed).


@dataclass
class Gap:
    start: int
    end: int  # inclusive
    xmax: int | None = None  # PostgreSQL: a snapshot's xmax, taken on a read after the one that first saw the gap


@dataclass(frozen=True)
class Snapshot:
    xmin: int
    xmax: int
    now: datetime  # the database's clock


@dataclass
class Horizon:
    """How far a stream has read (`settled`: every event up to it is sent or filtered out) and the gaps beyond."""

    settled: int
    serialized: bool  # ids become visible in order (SQLite)
    gap_seconds: float = GAP_SECONDS
    gaps: list[Gap] = field(default_factory=list)
    blocked: bool = False  # a gap not yet closed holds the stream back

    def advance(self, seen: Sequence[tuple[int, datetime]], snapshot: Snapshot | None) -> int:
        """The highest id up to which every event is present or in a closed gap.

        `seen`: (id, created_at) of events with ids above `settled`, in id order (the first ones).
        """
        gaps: list[Gap] = []
        safe = self.settled
        blocked = False
        expect = self.settled + 1
        for event_id, created_at in seen:
            if event_id > expect:
                gap = self._track(expect, event_id - 1, snapshot)
                gaps.append(gap)
                blocked = blocked or not self._closed(gap, created_at, snapshot)
            if not blocked:
                safe = event_id
            expect = event_id + 1
        self.gaps = gaps
        self.blocked = blocked
        return safe

    def _track(self, start: int, end: int, snapshot: Snapshot | None) -> Gap:
        """The gap start..end, with what earlier reads learnt about the ids in it."""
        before = [g for g in self.gaps if g.start <= end and start <= g.end]
        if not before:
            return Gap(start, end)  # first seen on this read: its xmax comes from the next one
        known = [g.xmax for g in before if g.xmax is not None]
        if known:
            return Gap(start, end, max(known))
        return Gap(start, end, snapshot.xmax if snapshot is not None else None)

    def _closed(self, gap: Gap, next_created_at: datetime, snapshot: Snapshot | None) -> bool:
        if self.serialized:
            return True
        if snapshot is None:
            return False
        if gap.xmax is not None and snapshot.xmin >= gap.xmax:
            return True
        created = utc(next_created_at)
        assert created is not None
        now = utc(snapshot.now)
        assert now is not None
        return (now - created).total_seconds() >= self.gap_seconds


@dataclass
class Read:
    rows: list[Any]
    more: bool  # a read right away may find more


def event_rows() -> Select[Any]:
    """Events with the step they are about (its id, round and item), read through the step row."""
    return select(*E.c, S.c.step_id, S.c.round, S.c.item).select_from(
        E.outerjoin(S, S.c.id == E.c.step_instance_id))


def read_events(engine: Engine, horizon: Horizon, instance_id: int | None) -> Read:
    """The next page of events after `horizon.settled` that are safe to send; advances the horizon."""
    if horizon.serialized:  # ids become visible in order: no gap to look for, one query
        query = event_rows().where(E.c.id > horizon.settled)
        if instance_id is not None:
            query = query.where(E.c.instance_id == instance_id)
        with engine.connect() as conn:
            page = list(conn.execute(query.order_by(E.c.id).limit(PAGE)).all())
        if page:
            horizon.settled = int(page[-1].id)
        return Read(page, more=len(page) == PAGE)
    # PostgreSQL (flowdb's other database).
    with engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ")  # one snapshot for the statements below
        with conn.begin():
            found = conn.execute(SNAPSHOT_SQL).one()
            snapshot = Snapshot(int(found.xmin), int(found.xmax), found.now)
            seen = conn.execute(select(E.c.id, E.c.created_at).where(E.c.id > horizon.settled)
                                .order_by(E.c.id).limit(SCAN)).all()
            safe = horizon.advance([(int(r.id), r.created_at) for r in seen], snapshot)
            rows: list[Any] = []
            if safe > horizon.settled:
                query = event_rows().where(E.c.id > horizon.settled, E.c.id <= safe)
                if instance_id is not None:
                    query = query.where(E.c.instance_id == instance_id)
                rows = list(conn.execute(query.order_by(E.c.id).limit(PAGE)).all())
    full = len(rows) == PAGE
    horizon.settled = int(rows[-1].id) if full else safe
    return Read(rows, more=full or (len(seen) == SCAN and not horizon.blocked))


def event_out(row: Any) -> EventOut:
    return EventOut(id=row.id, instance_id=row.instance_id, step_instance_id=row.step_instance_id,
                    step_id=row.step_id, round=row.round, item=row.item, type=row.type, payload=row.payload,
                    created_at=utc(row.created_at))


# -- Redis -----------------------------------------------------------------------------------------


class Bell:
    """One Redis subscription to flowdb:events shared by an app's streams: each message rings every stream.

    It runs while at least one stream is open. When Redis is down it retries every few seconds;
    meanwhile the streams poll (they wait at most api_stream_poll_seconds for a ring anyway).
    """

    def __init__(self, redis_url: str) -> None:
        self.url = redis_url
        self.name = f"flowdb-api-events-{os.getpid()}-{id(self):x}"  # CLIENT LIST shows the subscription as this
        self.rings: set[asyncio.Event] = set()
        self.listening = False
        self._task: asyncio.Task[None] | None = None

    def join(self) -> asyncio.Event:
        ring = asyncio.Event()
        self.rings.add(ring)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen())
        return ring

    def leave(self, ring: asyncio.Event) -> None:
        self.rings.discard(ring)
        if not self.rings and self._task is not None:
            self._task.cancel()
            self._task = None

    def _ring(self) -> None:
        for ring in self.rings:
            ring.set()

    async def _listen(self) -> None:
        import redis.asyncio as aredis

        warned = False
        while True:
            client = aredis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=10,
                                           health_check_interval=30, client_name=self.name)
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(EVENTS_CHANNEL)
                    self.listening, warned = True, False
                    self._ring()  # events committed while nobody listened: read now
                    while True:
                        if await pubsub.get_message(timeout=5.0) is not None:
                            self._ring()
                finally:
                    self.listening = False
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed in redis 6+
            except (aredis.RedisError, OSError) as exc:
                if not warned:
                    log.warning("event streams cannot listen to Redis (%s); they poll until it is back", exc)
                    warned = True
            finally:
                try:
                    await client.aclose()
                except Exception:  # closing a connection to a Redis that is gone
                    pass
            await asyncio.sleep(REDIS_RETRY_SECONDS)


def _bell(call: Call) -> Bell | None:
    url = call.settings.redis_url
    if not url:
        return None
    state = call.request.app.state
    bell = getattr(state, "event_bell", None)
    if not isinstance(bell, Bell) or bell.url != url:
        bell = Bell(url)
        state.event_bell = bell
    return bell


# -- the endpoint ------------------------------------------------------------------------------------


def _whole(raw: str, what: str, kind: str) -> int:
    value = raw.strip()
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_ID:
        raise ApiError(422, f"{what} must be a whole number of 0 or more, not {raw[:40]!r}", kind=kind)
    return int(value)


def _start(engine: Engine, instance_id: int | None, after: int | None) -> int:
    """Check the instance exists; the id to stream after (the newest event's when not given)."""
    with engine.connect() as conn:
        if instance_id is not None:
            found = conn.execute(select(process_instances.c.id).where(process_instances.c.id == instance_id)).first()
            if found is None:
                raise NotFound(f"instance {instance_id} does not exist")
        if after is not None:
            return after
        return int(conn.execute(select(func.coalesce(func.max(E.c.id), 0))).scalar_one())


async def _events(call: Call, horizon: Horizon, instance_id: int | None,
                  bell: Bell | None) -> AsyncIterator[ServerSentEvent]:
    ring = bell.join() if bell is not None else None
    poll = call.settings.api_stream_poll_seconds
    outage = 0.0  # the wait before the next read while the database is unavailable (0: it answers)
    checked = time.monotonic()
    try:
        while True:
            if time.monotonic() - checked > RECHECK_SECONDS:  # a revoked token or an ended session stops here
                checked = time.monotonic()
                try:
                    if not await call.db(call.still_allowed):
                        return
                except Exception as exc:
                    if not database_unavailable(exc):
                        raise
            if ring is not None:
                ring.clear()  # before reading: a message during the read makes the next wait return at once
            try:
                batch = await call.db(read_events, call.engine, horizon, instance_id)
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                if not outage:
                    log.warning("an event stream cannot read the database (%s); it retries until it can",
                                str(exc).strip().splitlines()[0])
                outage = min(outage * 2, DATABASE_RETRY_SECONDS[1]) if outage else DATABASE_RETRY_SECONDS[0]
                await asyncio.sleep(outage)
                continue
            outage = 0.0
            for row in batch.rows:
                yield ServerSentEvent(data=event_out(row).model_dump_json(), id=str(row.id), event=row.type)
            if batch.more:
                continue
            wait = min(poll, GAP_RECHECK_SECONDS) if horizon.blocked else poll
            if ring is None:
                await asyncio.sleep(wait)
            else:
                try:
                    await asyncio.wait_for(ring.wait(), wait)
                except TimeoutError:
                    pass
    finally:  # the client went away (sse-starlette cancels us) or the server is stopping
        if bell is not None and ring is not None:
            bell.leave(ring)


async def stream(call: Call) -> Response:
    params = call.request.query_params
    instance_id = _whole(params["instance"], "instance", "invalid-query") if "instance" in params else None
    after = _whole(params["after"], "after", "invalid-query") if "after" in params else None
    last = call.request.headers.get("last-event-id", "").strip()
    if last:
        after = _whole(last, "Last-Event-ID", "invalid-header")
    # The starting point is fixed before the response starts: once a client has the headers, it gets every
    # event with a higher id (an id taken before by a transaction still open then is not "after the request").
    start = await call.db(_start, call.engine, instance_id, after)
    horizon = Horizon(start, serialized=call.engine.dialect.name == "sqlite", gap_seconds=GAP_SECONDS)
    return EventSourceResponse(_events(call, horizon, instance_id, _bell(call)), ping=PING_SECONDS)


ENDPOINTS = [
    Endpoint(
        "GET", "/v1/events/stream", stream,
        "Live events as server-sent events (id = event id, event = type, data = the event as JSON)",
        role="viewer", tag="events", stream=True, responses={200: None}, errors=(404, 422),
        query=(
            Query("instance", {"type": "integer", "minimum": 0}, "Only this instance's events."),
            Query("after", {"type": "integer", "minimum": 0},
                  "Start after this event id (0: from the first event). Without it (and without Last-Event-ID) "
                  "the stream starts with the events committed after it was opened."),
        ),
        headers=(
            Header("Last-Event-ID", "Resume after this event id (sent by EventSource clients when they reconnect); "
                                    "takes precedence over `after`."),
        ),
    ),
]
