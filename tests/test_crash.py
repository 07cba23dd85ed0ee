"""Crashes: a worker killed with SIGKILL loses no work, and a stale worker's late result is refused."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import pytest
from sqlalchemy import select

from flowdb.db.claims import ClaimStatements
from flowdb.db.progress import ProgressStatements, ProgressWriter
from flowdb.db.tables import events, step_instances
from flowdb.outcomes import Outcome

from conftest import Database, flowdb_cli
from helpers import definition_from, event_types, instance, start, steps
from processes import Fleet, event_count, instance_statuses, read_call_log, step_statuses, wait_until

INSTANCES = 300
CHAIN = """\
process:
  name: crash-chain
  steps:
    - id: a
      type: agent_task
      agent: counted
      message: "a"
    - id: b
      type: agent_task
      agent: counted
      message: "b"
      depends_on: [a]
    - id: c
      type: agent_task
      agent: counted
      message: "c"
      depends_on: [b]
"""


def _held_by(db: Database, pid: int) -> set[int]:
    """Ids of the steps whose lease a worker process holds (its name is host:pid:random)."""
    with db.engine.connect() as conn:
        rows = conn.execute(select(step_instances.c.id, step_instances.c.lease_owner)
                            .where(step_instances.c.status == "running")).all()
    return {row.id for row in rows if row.lease_owner and row.lease_owner.split(":")[-2] == str(pid)}


@pytest.mark.slow
def test_killed_worker_loses_no_work_and_only_its_steps_rerun(db: Database, tmp_path: Path) -> None:
    env = db.cli_env()
    (tmp_path / "chain.yaml").write_text(CHAIN)
    result = flowdb_cli("deploy", str(tmp_path / "chain.yaml"), env=env)
    assert result.returncode == 0, result.stderr
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("{}\n" * INSTANCES)
    result = flowdb_cli("start", "crash-chain", "--inputs-file", str(inputs), env=env)
    assert result.returncode == 0, result.stderr
    ids = [int(line) for line in result.stdout.split()]
    assert len(set(ids)) == INSTANCES

    call_log = tmp_path / "calls.log"
    env.update(FLOWDB_LEASE_SECONDS="2", FLOWDB_POLL_SECONDS="0.1", FLOWDB_TEST_SLEEP="0.05",
               FLOWDB_TEST_CALL_LOG=str(call_log))
    fleet = Fleet(env, tmp_path)
    try:
        fleet.start(3)

        def busy_worker() -> int | None:
            # Some work done, and a worker holds leases with a handler of its own under way. (On
            # SQLite one worker may take most of the work, so the victim is whichever is busy.)
            if step_statuses(db.engine).get("completed", 0) < 60:
                return None
            running = {pid for kind, *_, pid in read_call_log(call_log) if kind == "start"}
            return next((pid for pid in fleet.pids if pid in running and _held_by(db, pid)), None)

        victim = wait_until(busy_worker, 60, "a worker to hold steps after 60 completions", 0.02, fleet)
        fleet.kill(victim)
        killed_at = time.monotonic()

        wait_until(lambda: instance_statuses(db.engine) == {"completed": INSTANCES}, 120,
                   "every instance to complete", 0.2, fleet)
        recovery = time.monotonic() - killed_at
        codes = fleet.terminate(30)
        assert codes == {pid: 0 for pid in fleet.pids if pid != victim}, fleet.all_output()[-5000:]
    finally:
        fleet.close()

    assert step_statuses(db.engine) == {"completed": 3 * INSTANCES}
    assert event_count(db.engine, "step.completed") == 3 * INSTANCES
    assert event_count(db.engine, "instance.completed") == INSTANCES
    assert event_count(db.engine, "step.late_result_dropped") == 0  # no live worker lost a lease

    # What the dead worker held: its claims that no completion followed. (Read from the events once
    # all is done, not from the rows at the kill: on PostgreSQL a COMMIT it sent just before dying
    # can still land after it is gone.)
    with db.engine.connect() as conn:
        started = conn.execute(select(events.c.step_instance_id, events.c.payload)
                               .where(events.c.type == "step.started")).all()
        completed = conn.execute(select(events.c.step_instance_id, events.c.payload)
                                 .where(events.c.type == "step.completed")).all()
        attempts = dict(conn.execute(select(step_instances.c.id, step_instances.c.attempt)).all())
    [victim_name] = {row.payload["worker"] for row in started if row.payload["worker"].split(":")[-2] == str(victim)}
    done_attempts = {(row.step_instance_id, row.payload["attempt"]) for row in completed}
    held = {row.step_instance_id for row in started if row.payload["worker"] == victim_name
            and (row.step_instance_id, row.payload["attempt"]) not in done_attempts}
    assert held

    # Every step the dead worker held was claimed again (attempt 2, flagged as a reclaim); no other was.
    reclaimed = {row.step_instance_id for row in started if row.payload.get("reclaimed")}
    assert reclaimed == held
    assert {sid for sid, attempt in attempts.items() if attempt != 1} == held
    assert all(attempts[sid] == 2 for sid in held)

    # The call log: every step ran to its end; a handler ran twice only where the dead worker began it.
    calls = read_call_log(call_log)
    ended = {(iid, step) for kind, iid, step, _, _ in calls if kind == "end"}
    assert ended == {(iid, step) for iid in ids for step in "abc"}
    starts: dict[tuple[int, str], list[int]] = defaultdict(list)
    for kind, iid, step, _, pid in calls:
        if kind == "start":
            starts[(iid, step)].append(pid)
    twice = {key: pids for key, pids in starts.items() if len(pids) > 1}
    assert all(pids[0] == victim and len(pids) == 2 for pids in twice.values()), twice
    with db.engine.connect() as conn:
        held_keys = {(row.instance_id, row.step_id) for row in conn.execute(
            select(step_instances.c.instance_id, step_instances.c.step_id).where(step_instances.c.id.in_(held)))}
    assert set(twice) <= held_keys
    assert recovery < 60


ONE_THEN_ANOTHER = """\
process:
  name: fenced
  steps:
    - id: a
      type: agent_task
      agent: noop
      message: "a"
    - id: b
      type: agent_task
      agent: noop
      message: "b"
      depends_on: [a]
"""


def test_stale_workers_late_completion_is_refused_by_the_lease_token(db: Database) -> None:
    definition = definition_from(ONE_THEN_ANOTHER)
    [iid] = start(db.engine, definition)
    dialect = db.engine.dialect.name
    claims = ClaimStatements(dialect)
    writer = ProgressWriter(ProgressStatements(dialect))

    with db.engine.begin() as conn:
        [stale] = claims.claim_steps(conn, "stale-worker", "token-stale", 10, 0.3)
    assert (stale.step_id, stale.attempt, stale.expired_lease) == ("a", 1, None)
    with db.engine.begin() as conn:  # the lease is held: nobody else gets the step
        assert claims.claim_steps(conn, "fresh-worker", "token-fresh", 10, 30) == []
    time.sleep(0.6)  # the stale worker stops heartbeating; its lease runs out (on the database's clock)
    with db.engine.begin() as conn:
        [fresh] = claims.claim_steps(conn, "fresh-worker", "token-fresh", 10, 30)
    assert (fresh.id, fresh.attempt) == (stale.id, 2)
    assert fresh.expired_lease and "stale-worker" in fresh.expired_lease

    definitions = {stale.definition_id: definition}
    late = Outcome(stale, "completed", output={"by": "stale"}, input={"message": "a"})
    with db.engine.begin() as conn:
        assert claims.heartbeat_steps(conn, [stale], 30) == {stale.id}  # a stale heartbeat is refused too
        progress = writer.apply(conn, [late], definitions)
    assert progress.late == [late]
    assert progress.made_ready == 0 and progress.finished_instances == []

    row = steps(db.engine, iid)["a"]
    assert (row.status, row.lease_token, row.lease_owner, row.attempt, row.output) == (
        "running", "token-fresh", "fresh-worker", 2, None)
    assert steps(db.engine, iid)["b"].status == "pending"
    with db.engine.connect() as conn:
        dropped = conn.execute(select(events.c.step_instance_id, events.c.payload)
                               .where(events.c.type == "step.late_result_dropped")).all()
    assert [(r.step_instance_id, _payload(r.payload)) for r in dropped] == [
        (stale.id, {"attempt": 1, "outcome": "completed"})]
    assert "step.completed" not in event_types(db.engine, iid)

    with db.engine.begin() as conn:  # the stale worker cannot release it either
        assert claims.release_steps(conn, [stale]) == 0
    with db.engine.begin() as conn:
        progress = writer.apply(conn, [Outcome(fresh, "completed", output={"by": "fresh"})], definitions)
    assert progress.late == [] and progress.made_ready == 1
    rows = steps(db.engine, iid)
    assert (rows["a"].status, rows["a"].output, rows["a"].lease_token) == ("completed", {"by": "fresh"}, None)
    assert rows["b"].status == "ready"
    assert event_types(db.engine, iid).count("step.completed") == 1
    assert instance(db.engine, iid).status == "running"


def _payload(value: object) -> object:
    return json.loads(value) if isinstance(value, str) else value
