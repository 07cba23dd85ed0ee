"""Many real worker processes on one database: race-free joins, SQLite with several writers, SIGTERM."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from sqlalchemy import select

from flowdb.db.tables import events, step_instances

from conftest import Database
from helpers import start
from processes import Fleet, event_count, instance_statuses, read_call_log, step_statuses, wait_until

FAN_IN = """\
process:
  name: fan-in
  steps:
    - {id: left, type: agent_task, agent: noop, message: "l"}
    - {id: middle, type: agent_task, agent: noop, message: "m"}
    - {id: right, type: agent_task, agent: noop, message: "r"}
    - id: join
      type: agent_task
      agent: noop
      message: "j"
      depends_on: [left, middle, right]
"""


def _fleet_env(db: Database, **extra: str) -> dict[str, str]:
    env = db.cli_env()
    env.update(FLOWDB_LEASE_SECONDS="5", FLOWDB_POLL_SECONDS="0.05", **extra)
    return env


@pytest.mark.slow
def test_concurrent_parents_make_each_join_ready_exactly_once(db: Database, tmp_path: Path) -> None:
    count = 300
    # Small batches and few steps in flight per worker spread the parents of one join over processes.
    fleet = Fleet(_fleet_env(db), tmp_path, "--batch", "4", "--concurrency", "4")
    try:
        fleet.start(4)
        fleet.wait_ready()
        ids = start(db.engine, FAN_IN, count=count)
        wait_until(lambda: instance_statuses(db.engine) == {"completed": count}, 120,
                   "every instance to complete", 0.2, fleet)
        codes = fleet.terminate(30)
        assert codes == dict.fromkeys(fleet.pids, 0), fleet.all_output()[-5000:]
    finally:
        fleet.close()

    assert step_statuses(db.engine) == {"completed": 4 * count}
    with db.engine.connect() as conn:
        joins = conn.execute(select(step_instances.c.id, step_instances.c.instance_id, step_instances.c.status,
                                    step_instances.c.attempt, step_instances.c.pending_parents,
                                    step_instances.c.completed_parents)
                             .where(step_instances.c.step_id == "join")).all()
        rows = conn.execute(select(events.c.type, events.c.step_instance_id, events.c.payload)
                            .where(events.c.type.in_(["step.started", "step.ready"]))).all()
    assert sorted(j.instance_id for j in joins) == sorted(ids)
    assert {(j.status, j.attempt, j.pending_parents, j.completed_parents) for j in joins} == {("completed", 1, 0, 3)}
    join_ids = {j.id for j in joins}
    started = Counter(r.step_instance_id for r in rows if r.type == "step.started")
    made_ready = Counter(r.step_instance_id for r in rows if r.type == "step.ready")
    assert {started[j] for j in join_ids} == {1}
    assert {made_ready[j] for j in join_ids} == {1}
    assert event_count(db.engine, "step.completed") == 4 * count
    assert event_count(db.engine, "instance.completed") == count

    # The race was really run: in many instances the three parents ran in different processes.
    with db.engine.connect() as conn:
        owner_of = dict(conn.execute(select(step_instances.c.id, step_instances.c.instance_id)
                                     .where(step_instances.c.step_id != "join")).all())
    workers: dict[int, set[str]] = defaultdict(set)
    for r in rows:
        if r.type == "step.started" and r.step_instance_id in owner_of:
            workers[owner_of[r.step_instance_id]].add(r.payload["worker"])
    # (SQLite serializes writers, and the busy-waiting ones get the lock less often: fewer mixes.)
    mixed = sum(len(names) > 1 for names in workers.values())
    assert mixed >= (count // 4 if db.kind == "postgresql" else 1), mixed


CHAIN = """\
process:
  name: sqlite-chain
  steps:
    - {id: first, type: agent_task, agent: noop, message: "1"}
    - {id: second, type: agent_task, agent: noop, message: "2", depends_on: [first]}
"""


@pytest.mark.slow
@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_several_workers_share_one_sqlite_file_without_lock_errors(db: Database, tmp_path: Path) -> None:
    engine = db.engine
    count = 200
    fleet = Fleet(_fleet_env(db), tmp_path, "--batch", "8")
    try:
        fleet.start(4)
        fleet.wait_ready()
        start(engine, CHAIN, count=count)
        wait_until(lambda: instance_statuses(engine) == {"completed": count}, 120,
                   "every instance to complete", 0.2, fleet)
        codes = fleet.terminate(30)
        assert codes == dict.fromkeys(fleet.pids, 0), fleet.all_output()[-5000:]
    finally:
        fleet.close()
    assert step_statuses(engine) == {"completed": 2 * count}
    assert event_count(engine, "step.completed") == 2 * count
    for pid in fleet.pids:
        output = fleet.output(pid)
        for bad in ("database is locked", "Traceback", "lost the lease"):
            assert bad not in output, output[-5000:]


ONE_LONG_STEP = """\
process:
  name: long-step
  steps:
    - {id: slow, type: agent_task, agent: counted, message: "zzz"}
"""


@pytest.mark.slow
def test_sigterm_releases_the_steps_a_worker_still_runs(db: Database, tmp_path: Path) -> None:
    ids = start(db.engine, ONE_LONG_STEP, count=3)
    call_log = tmp_path / "calls.log"
    env = _fleet_env(db, FLOWDB_TEST_SLEEP="30", FLOWDB_TEST_CALL_LOG=str(call_log))
    fleet = Fleet(env, tmp_path, "--grace", "0.5")
    try:
        [pid] = fleet.start(1)
        wait_until(lambda: len(read_call_log(call_log)) == 3, 30, "three handlers to start", 0.05, fleet)
        assert step_statuses(db.engine) == {"running": 3}
        began = time.monotonic()
        codes = fleet.terminate(20)
        took = time.monotonic() - began
        assert codes == {pid: 0}, fleet.all_output()[-5000:]
    finally:
        fleet.close()
    assert took < 8, f"the worker took {took:.1f}s to stop with a 0.5s grace"
    assert "released 3 step(s)" in fleet.output(pid)
    with db.engine.connect() as conn:
        rows = conn.execute(select(step_instances).where(step_instances.c.instance_id.in_(ids))).all()
        released = conn.execute(select(events.c.step_instance_id, events.c.payload)
                                .where(events.c.type == "step.released")).all()
    assert {(r.status, r.attempt, r.lease_owner, r.lease_token) for r in rows} == {("ready", 0, None, None)}
    assert sorted(r.step_instance_id for r in released) == sorted(r.id for r in rows)
    assert all(r.payload == {"attempt": 1, "releases": 1, "charged": False} for r in released)
    assert [kind for kind, *_ in read_call_log(call_log)] == ["start"] * 3  # none ran to its end
