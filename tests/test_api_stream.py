"""The live event stream (SSE), /healthz and /openapi.json through a real uvicorn server and httpx."""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.sql import func

from flowdb.db.clock import Clock
from flowdb.db.engine import make_engine
from flowdb.db.tables import events
from flowdb.notify import EVENTS_CHANNEL, publish_events_sync
from flowdb.settings import Settings
from flowdb_api.app import create_app
from flowdb_api.routes import events as events_route
from flowdb_api.routes.events import Gap, Horizon, Snapshot

from apiserver import ApiServer, api_for, serve
from conftest import Database
from helpers import start, work
from servers import free_port

TWO_STEPS = """
process:
  name: stream-test
  steps:
    - id: first
      type: agent_task
      agent: noop
      message: go
    - id: second
      type: agent_task
      agent: echo
      message: "after {{ steps.first.status }}"
      depends_on: [first]
"""
STREAM = "/v1/events/stream"


@pytest.fixture(autouse=True)
def quick_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pings every 0.2 s: they are tested, and they let a reader notice it was asked to stop.
    monkeypatch.setattr(events_route, "PING_SECONDS", 0.2)


@dataclass
class Sse:
    id: str | None
    event: str | None
    data: str

    @property
    def json(self) -> Any:
        return json.loads(self.data)


class Reader:
    """GET an SSE URL with httpx.Client.stream in a thread; the events land in a queue."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> None:
        self.url, self.headers, self.params = url, headers or {}, params or {}
        self.events: queue.Queue[Sse] = queue.Queue()
        self.opened = threading.Event()
        self.stop = threading.Event()
        self.status: int | None = None
        self.content_type = ""
        self.pings = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Reader:
        self.thread.start()
        assert self.opened.wait(15), "the stream did not answer"
        if self.error is not None:
            raise self.error
        assert self.status == 200, self.status
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the reader did not stop"

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(15.0)) as client, \
                    client.stream("GET", self.url, headers=self.headers, params=self.params) as response:
                self.status = response.status_code
                self.content_type = response.headers.get("content-type", "")
                self.opened.set()
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith(":"):
                        self.pings += 1
                    elif line == "":
                        if fields:
                            self.events.put(Sse(fields.get("id"), fields.get("event"), fields.get("data", "")))
                        fields = {}
                    else:
                        name, _, value = line.partition(":")
                        value = value.removeprefix(" ")
                        fields[name] = f"{fields[name]}\n{value}" if name == "data" and name in fields else value
        except BaseException as exc:
            self.error = exc
        finally:
            self.opened.set()

    def take(self, count: int, timeout: float = 10.0) -> list[Sse]:
        got: list[Sse] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                got.append(self.events.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                raise AssertionError(f"got {len(got)} of {count} events in {timeout:g} s (error: {self.error})"
                                     ) from None
        return got

    def quiet(self, seconds: float) -> None:
        """Nothing arrives for `seconds`."""
        try:
            extra = self.events.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected event {extra}")


def stream(api: ApiServer, role: str = "operator", headers: dict[str, str] | None = None,
           **params: Any) -> Reader:
    return Reader(api.url + STREAM, {**api.auth(role), **(headers or {})}, params)


def db_events(engine: Engine, after: int = 0, instance_id: int | None = None) -> list[Any]:
    query = select(events).where(events.c.id > after).order_by(events.c.id)
    if instance_id is not None:
        query = query.where(events.c.instance_id == instance_id)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def max_event_id(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar_one())


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- the stream, without Redis (polling) ----------------------------------------------------------


@pytest.mark.slow
def test_stream_sends_every_event_in_id_order_and_resumes_exactly(db: Database) -> None:
    with api_for(db, api_stream_poll_seconds=0.05) as api:
        before = start(db.engine, TWO_STEPS)  # history: not part of a stream opened afterwards
        history = max_event_id(db.engine)
        with stream(api) as live:
            assert live.content_type.startswith("text/event-stream")
            started = start(db.engine, TWO_STEPS, count=2)
            work(db.engine)  # works `before` on too: its later events are new
            expected = db_events(db.engine, after=history)
            got = live.take(len(expected))
            live.quiet(0.3)
            assert live.pings > 0  # keep-alive comments between the events
        assert {e.instance_id for e in expected} == {*before, *started}
        assert [int(e.id or 0) for e in got] == [r.id for r in expected]  # in order, none missing, none twice
        assert [e.event for e in got] == [r.type for r in expected]
        assert {"step.completed", "instance.completed"} <= {e.event for e in got}
        first, row = got[0].json, expected[0]
        assert first == {"id": row.id, "instance_id": row.instance_id, "step_instance_id": row.step_instance_id,
                         "step_id": None, "round": None, "item": None,  # instance.started: about no step
                         "type": row.type, "payload": row.payload, "created_at": first["created_at"]}
        step_events = [e.json for e in got if e.json["step_instance_id"] is not None]
        assert step_events and all(e["step_id"] and e["round"] == 1 for e in step_events)
        moment = datetime.fromisoformat(first["created_at"])
        assert moment.utcoffset() == timedelta(0) and abs(datetime.now(UTC) - moment) < timedelta(minutes=5)

        # Reconnecting with Last-Event-ID: exactly the events after it (the header wins over ?after=0).
        middle = expected[len(expected) // 2].id
        with stream(api, headers={"Last-Event-ID": str(middle)}, after=0) as resumed:
            rest = db_events(db.engine, after=middle)
            assert [int(e.id or 0) for e in resumed.take(len(rest))] == [r.id for r in rest]
            resumed.quiet(0.3)
        # ?after=0: everything from the first event.
        with stream(api, after=0) as everything:
            assert [int(e.id or 0) for e in everything.take(len(db_events(db.engine)))] == \
                [r.id for r in db_events(db.engine)]


def test_stream_filters_by_instance(db: Database) -> None:
    with api_for(db, api_stream_poll_seconds=0.05) as api:
        one, two, three = start(db.engine, TWO_STEPS, count=3)
        work(db.engine)
        mine = db_events(db.engine, instance_id=two)
        with stream(api, instance=two, after=0) as live:
            got = live.take(len(mine))
            live.quiet(0.3)
        assert [int(e.id or 0) for e in got] == [r.id for r in mine]
        assert {e.json["instance_id"] for e in got} == {two}
        # Events of other instances before and after the filtered ones were read past, not sent.
        assert min(r.id for r in db_events(db.engine, instance_id=one)) < mine[0].id
        assert max(r.id for r in db_events(db.engine, instance_id=three)) > mine[-1].id


def test_stream_reads_in_pages(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_route, "PAGE", 2)
    monkeypatch.setattr(events_route, "SCAN", 3)
    with api_for(db, api_stream_poll_seconds=30) as api:  # only the pages, no poll, within the timeout
        _, two = start(db.engine, TWO_STEPS, count=2)
        work(db.engine)
        everything, mine = db_events(db.engine), db_events(db.engine, instance_id=two)
        with stream(api, after=0) as live, stream(api, after=0, instance=two) as filtered:
            assert [int(e.id or 0) for e in live.take(len(everything), 5)] == [r.id for r in everything]
            assert [int(e.id or 0) for e in filtered.take(len(mine), 5)] == [r.id for r in mine]


def test_stream_authentication_and_parameters(api_server: ApiServer) -> None:
    url = api_server.url + STREAM
    anonymous = httpx.get(url)
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == "application/problem+json"
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    approver = httpx.get(url, headers=api_server.auth("approver"))
    assert approver.status_code == 403 and approver.json()["title"] == "Forbidden"
    operator = api_server.auth("operator")
    for params, headers in [({"instance": "abc"}, {}), ({"instance": "-1"}, {}), ({"after": "1.5"}, {}),
                            ({"after": "²"}, {}), ({}, {"Last-Event-ID": "x"}),
                            ({"after": str(2**63)}, {})]:
        bad = httpx.get(url, params=params, headers={**operator, **headers})
        assert bad.status_code == 422, (params, headers)
        assert bad.headers["content-type"] == "application/problem+json"
    missing = httpx.get(url, params={"instance": "999999"}, headers=operator)
    assert missing.status_code == 404 and "999999" in missing.json()["detail"]
    # An admin may read it too (roles nest).
    with stream(api_server, role="admin"):
        pass


# -- id gaps: ids are assigned at insert, transactions commit in another order (PostgreSQL) ---------


def _insert_event(conn: Connection, instance_id: int, kind: str) -> int:
    return int(conn.execute(insert(events).values(instance_id=instance_id, type=kind, payload={"test": kind},
                                                  created_at=Clock(conn.dialect.name).now)
                            .returning(events.c.id)).scalar_one())


@pytest.mark.slow
def test_stream_never_passes_an_uncommitted_id(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    if db.kind == "sqlite":
        # SQLite has one writer at a time (BEGIN IMMEDIATE) and takes ids under the write lock, so
        # ids become visible in order and this cannot happen; test_horizon_* cover the logic there.
        pytest.skip("SQLite serializes writers: ids are visible in id order")
    [iid] = start(db.engine, TWO_STEPS)
    with api_for(db, api_stream_poll_seconds=0.05) as api, stream(api) as live:
        slow = db.engine.connect()
        try:
            # A transaction takes id k and has not committed; another takes k+1 and commits.
            with slow.begin():
                held = _insert_event(slow, iid, "test.slow")
                with db.engine.begin() as fast:
                    after = _insert_event(fast, iid, "test.fast")
                assert after > held
                live.quiet(1.0)  # k+1 is visible, k is not: the stream waits
            got = live.take(2, timeout=5)
            assert [(int(e.id or 0), e.event) for e in got] == [(held, "test.slow"), (after, "test.fast")]

            # A transaction that rolls back leaves a permanent gap: passed once every transaction
            # that was running when it was seen has ended (well before the GAP_SECONDS backstop).
            slow.begin()
            _insert_event(slow, iid, "test.rolled-back")
            with db.engine.begin() as fast:
                after = _insert_event(fast, iid, "test.after-rollback")
            live.quiet(0.5)
            slow.rollback()
            began = time.monotonic()
            [event] = live.take(1, timeout=5)
            assert (int(event.id or 0), event.event) == (after, "test.after-rollback")
            assert time.monotonic() - began < 3
        finally:
            slow.close()


@pytest.mark.slow
def test_stream_passes_a_gap_after_gap_seconds(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backstop: a transaction holding an id for longer than GAP_SECONDS no longer holds the stream."""
    if db.kind == "sqlite":
        pytest.skip("SQLite serializes writers: ids are visible in id order")
    monkeypatch.setattr(events_route, "GAP_SECONDS", 1.0)
    [iid] = start(db.engine, TWO_STEPS)
    with api_for(db, api_stream_poll_seconds=0.05) as api, stream(api) as live:
        with db.engine.connect() as slow, slow.begin():
            _insert_event(slow, iid, "test.long-transaction")
            with db.engine.begin() as fast:
                after = _insert_event(fast, iid, "test.fast")
            began = time.monotonic()
            [event] = live.take(1, timeout=5)
            assert int(event.id or 0) == after and time.monotonic() - began >= 0.5
        # Committed after the stream passed it: documented as not streamed (the table has it).
        live.quiet(0.5)


def test_horizon_on_sqlite_passes_gaps_at_once() -> None:
    now = datetime.now(UTC)
    horizon = Horizon(10, serialized=True)
    assert horizon.advance([(11, now), (14, now), (15, now)], None) == 15
    assert not horizon.blocked


def test_horizon_waits_for_transactions_then_passes_a_gap() -> None:
    now = datetime.now(UTC)
    horizon = Horizon(10, serialized=False, gap_seconds=30)
    # Read 1: 12 is missing; first sighting, no xmax yet.
    assert horizon.advance([(11, now), (13, now), (14, now)], Snapshot(100, 105, now)) == 11
    assert horizon.blocked and horizon.gaps == [Gap(12, 12, None)]
    horizon.settled = 11
    # Read 2: still missing; the gap takes this read's xmax. Transaction 100 is still running.
    assert horizon.advance([(13, now), (14, now)], Snapshot(100, 107, now)) == 11
    assert horizon.gaps == [Gap(12, 12, 107)]
    # Read 3: every transaction below 107 has ended and 12 is still not there: rolled back.
    assert horizon.advance([(13, now), (14, now)], Snapshot(107, 109, now)) == 14
    assert not horizon.blocked


def test_horizon_sends_a_late_commit_in_order() -> None:
    now = datetime.now(UTC)
    horizon = Horizon(0, serialized=False, gap_seconds=30)
    assert horizon.advance([(1, now), (3, now)], Snapshot(50, 52, now)) == 1
    horizon.settled = 1
    assert horizon.advance([(2, now), (3, now), (5, now)], Snapshot(50, 53, now)) == 3  # 2 committed; 4 is new
    assert horizon.gaps == [Gap(4, 4, None)]


def test_horizon_passes_an_old_gap_by_the_database_clock() -> None:
    now = datetime.now(UTC)
    horizon = Horizon(0, serialized=False, gap_seconds=30)
    old = now - timedelta(seconds=31)
    # A long writer keeps xmin back, but the row after the gap is 31 s old: passed (resuming over
    # old rolled-back ids costs nothing). SQLite-style naive times are taken as UTC.
    assert horizon.advance([(1, old), (5, old.replace(tzinfo=None)), (7, now)], Snapshot(10, 90, now)) == 5
    assert horizon.blocked and horizon.gaps == [Gap(2, 4, None), Gap(6, 6, None)]


# -- Redis ---------------------------------------------------------------------------------------------


def _connected(redis_url: str, name: str) -> list[dict[str, Any]]:
    """The Redis connections named `name` (the shared Redis may have other users: count only ours)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return [c for c in client.client_list() if c.get("name") == name]
    finally:
        client.close()


def test_stream_wakes_on_redis_messages_and_unsubscribes_when_the_client_leaves(db: Database,
                                                                               redis_url: str) -> None:
    # A poll interval of 30 s: only Redis messages can bring the events within seconds.
    with api_for(db, redis_url=redis_url, api_stream_poll_seconds=30) as api:
        with stream(api) as live:
            bell = api.app.state.event_bell
            wait_for(lambda: bell.listening, 5, "the stream to subscribe")
            [connection] = _connected(redis_url, bell.name)
            assert connection["sub"] == "1"  # subscribed to one channel: flowdb:events
            with redis.Redis.from_url(redis_url) as client:
                assert EVENTS_CHANNEL.encode() in client.pubsub_channels()
            with stream(api) as second:  # a second stream shares the subscription
                wait_for(lambda: len(bell.rings) == 2, 5, "the second stream to start")
                assert len(_connected(redis_url, bell.name)) == 1
                [iid] = start(db.engine, TWO_STEPS)
                publish_events_sync(redis_url)  # what code outside the worker does after a commit
                initial = db_events(db.engine, instance_id=iid)
                assert [int(e.id or 0) for e in live.take(len(initial), timeout=5)] == [r.id for r in initial]
                assert [int(e.id or 0) for e in second.take(len(initial), timeout=5)] == [r.id for r in initial]
            wait_for(lambda: len(bell.rings) == 1, 5, "the second stream to stop")
            # The worker publishes on flowdb:events after each batch of recorded outcomes.
            work(db.engine, redis_url=redis_url)
            rest = db_events(db.engine, after=initial[-1].id)
            got = live.take(len(rest), timeout=5)
            assert [int(e.id or 0) for e in got] == [r.id for r in rest]
            assert got[-1].event == "instance.completed"
        # The client went away: the stream's generator ended, the shared subscription closed.
        wait_for(lambda: not bell.rings and not bell.listening, 5, "the stream to stop")
        wait_for(lambda: not _connected(redis_url, bell.name), 5, "the Redis subscription to close")


def test_stream_polls_when_redis_is_down_and_healthz_says_degraded(db: Database) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with api_for(db, redis_url=closed, api_stream_poll_seconds=0.1) as api:
        health = httpx.get(api.url + "/healthz")
        assert health.status_code == 200  # Redis is optional: degraded, still serving
        body = health.json()
        assert body["status"] == "degraded" and body["database"] == "ok"
        assert body["redis"] not in ("ok", "not configured") and "connect" in body["redis"].lower()
        with stream(api) as live:
            [iid] = start(db.engine, TWO_STEPS)
            publish_events_sync(closed)  # logs a warning, raises nothing
            expected = db_events(db.engine, instance_id=iid)
            assert [int(e.id or 0) for e in live.take(len(expected), timeout=5)] == [r.id for r in expected]


# -- /healthz and /openapi.json ------------------------------------------------------------------------


def test_healthz_ok_without_redis(api_server: ApiServer) -> None:
    answer = httpx.get(api_server.url + "/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "database": "ok", "redis": "not configured"}


def test_healthz_ok_with_redis(db: Database, redis_url: str) -> None:
    with api_for(db, redis_url=redis_url) as api:
        answer = httpx.get(api.url + "/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "database": "ok", "redis": "ok"}


def test_healthz_degraded_when_the_database_does_not_answer() -> None:
    engine = make_engine(f"postgresql://flowdb@127.0.0.1:{free_port()}/nothing")
    settings = Settings.model_construct(database_url="postgresql://unused", redis_url=None)
    with serve(create_app(settings, engine)) as url:
        answer = httpx.get(url + "/healthz", timeout=15)
    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "degraded" and body["redis"] == "not configured"
    assert body["database"] != "ok" and "\n" not in body["database"]


def test_openapi_json_is_served_without_a_token(api_server: ApiServer) -> None:
    answer = httpx.get(api_server.url + "/openapi.json")
    assert answer.status_code == 200
    document = answer.json()
    assert document["openapi"].startswith("3.")
    assert {"/healthz", "/openapi.json", STREAM} <= set(document["paths"])
    operation = document["paths"][STREAM]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"instance", "after", "Last-Event-ID"}
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    assert document["paths"]["/healthz"]["get"]["security"] == []
