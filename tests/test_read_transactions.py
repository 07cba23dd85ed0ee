"""Read-only transactions (flowdb.db.engine.read_only): on SQLite they are deferred, so a report or an API
read never holds the write lock the workers need, nor waits for it; on both databases they refuse writes."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import DBAPIError

from flowdb.db import migrate
from flowdb.db.engine import make_engine, read_only
from flowdb.db.tables import events, process_instances
from flowdb.reports import run_report

from apiserver import api_for
from conftest import Database
from helpers import start
from processes import Fleet, instance_statuses, wait_until

CHAIN = """\
process:
  name: chain
  steps:
    - {id: one, type: agent_task, agent: noop, message: "1"}
    - {id: two, type: agent_task, agent: noop, message: "2", depends_on: [one]}
    - {id: three, type: agent_task, agent: noop, message: "3", depends_on: [two]}
"""
# Far below SQLite's busy_timeout (60 s): a reader holding the write lock would blow through it.
BOUND_SECONDS = 30


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    url = f"sqlite:///{tmp_path / 'flowdb.sqlite3'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    return Database("sqlite", url, engine)


@pytest.mark.slow
def test_a_report_held_open_does_not_delay_a_worker_on_sqlite(sqlite_db: Database, tmp_path: Path) -> None:
    db = sqlite_db
    [first] = start(db.engine, CHAIN)
    env = {**db.cli_env(), "FLOWDB_POLL_SECONDS": "0.05"}
    fleet = Fleet(env, tmp_path)
    try:
        fleet.start(1)
        fleet.wait_ready()
        wait_until(lambda: instance_statuses(db.engine) == {"completed": 1}, BOUND_SECONDS, "the first instance",
                   0.05, fleet)
        with read_only(db.engine).connect() as report_conn:
            before = run_report(report_conn, "v_instance_summary")  # the read transaction is open from here
            assert [(r[0], r[3]) for r in before.rows] == [(first, "completed")], before
            began = time.monotonic()
            [second] = start(db.engine, CHAIN)  # a writer, while the report's transaction is open
            wait_until(lambda: instance_statuses(db.engine) == {"completed": 2}, BOUND_SECONDS,
                       "the worker to complete an instance while the report's transaction is open", 0.05, fleet)
            assert time.monotonic() - began < BOUND_SECONDS
            # Still the same transaction: its snapshot does not show the instance started after it began.
            again = run_report(report_conn, "v_instance_summary")
            assert again.rows == before.rows
        codes = fleet.terminate(30)
        assert codes == dict.fromkeys(fleet.pids, 0), fleet.all_output()[-3000:]
    finally:
        fleet.close()
    with read_only(db.engine).connect() as conn:
        after = run_report(conn, "v_instance_summary")
    assert [(r[0], r[3]) for r in after.rows] == [(first, "completed"), (second, "completed")]


def test_api_reads_work_while_a_writer_holds_the_lock_on_sqlite(sqlite_db: Database) -> None:
    db = sqlite_db
    [iid] = start(db.engine, CHAIN)
    with api_for(db) as server:
        headers = server.auth("operator")
        with db.engine.begin() as writer:  # BEGIN IMMEDIATE: the write lock, held until the block ends
            writer.execute(insert(events).values(instance_id=iid, type="test.held", payload=None,
                                                 created_at=text("CURRENT_TIMESTAMP")))
            began = time.monotonic()
            got = httpx.get(f"{server.url}/v1/instances/{iid}", headers=headers, timeout=BOUND_SECONDS)
            listed = httpx.get(f"{server.url}/v1/instances", headers=headers, timeout=BOUND_SECONDS)
            health = httpx.get(f"{server.url}/healthz", timeout=BOUND_SECONDS)
            assert time.monotonic() - began < BOUND_SECONDS
            assert got.status_code == 200, got.text
            assert (got.json()["id"], got.json()["status"]) == (iid, "running")
            assert listed.status_code == 200 and [i["id"] for i in listed.json()["items"]] == [iid]
            assert health.status_code == 200 and health.json()["database"] == "ok"
            events_page = httpx.get(f"{server.url}/v1/instances/{iid}/events", headers=headers, timeout=10)
            assert "test.held" not in [e["type"] for e in events_page.json()["items"]]  # not committed yet
        events_page = httpx.get(f"{server.url}/v1/instances/{iid}/events", headers=headers, timeout=10)
        assert [e["type"] for e in events_page.json()["items"]][-1] == "test.held"


def test_a_read_only_transaction_refuses_writes(db: Database) -> None:
    [iid] = start(db.engine, CHAIN)
    reader = read_only(db.engine)
    assert read_only(reader) is reader
    with reader.connect() as conn:
        assert conn.execute(select(process_instances.c.status).where(process_instances.c.id == iid)).scalar_one() \
            == "running"
        refusal = ("attempt to write a readonly database" if db.kind == "sqlite"
                   else "cannot execute UPDATE in a read-only transaction")
        with pytest.raises(DBAPIError, match=refusal):
            conn.execute(process_instances.update().where(process_instances.c.id == iid).values(status="failed"))
    # The pooled connection that refused goes back to writing for the writing engine.
    with db.engine.begin() as conn:
        conn.execute(process_instances.update().where(process_instances.c.id == iid).values(error="kept"))
    with reader.connect() as conn:
        row = conn.execute(select(process_instances.c.status, process_instances.c.error)
                           .where(process_instances.c.id == iid)).one()
    assert tuple(row) == ("running", "kept")
