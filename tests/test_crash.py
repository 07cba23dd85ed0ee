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

    # What the dead worker held: the steps it started that another worker had to start again. (Read
    # from the events once all is done, not from the rows at the kill: on PostgreSQL a COMMIT it sent
    # just before dying can still land after it is gone.)
    with db.engine.connect() as conn:
        started = conn.execute(select(events.c.id, events.c.step_instance_id, events.c.payload)
                               .where(events.c.type == "step.started").order_by(events.c.id)).all()
        rows = {row.id: row for row in conn.execute(select(step_instances.c.id, step_instances.c.attempt,
                                                           step_instances.c.reclaims, step_instances.c.suspect))}
    [victim_name] = {row.payload["worker"] for row in started if row.payload["worker"].split(":")[-2] == str(victim)}
    victims_last = {row.step_instance_id: row.id for row in started if row.payload["worker"] == victim_name}
    held = {row.step_instance_id for row in started
            if row.step_instance_id in victims_last and row.id > victims_last[row.step_instance_id]}
    assert held

    # Every step the dead worker held was taken over as a suspect, and no other; the crash was charged
    # to none of them (they did not run alone), so each completed at attempt 1.
    reclaimed = {row.step_instance_id for row in started if row.payload.get("reclaimed")}
    assert reclaimed == held
    assert {sid for sid, row in rows.items() if row.reclaims} == held
    assert {row.attempt for row in rows.values()} == {1}
    assert not any(row.suspect for row in rows.values())

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
    assert (stale.step_id, stale.attempt, stale.suspect) == ("a", 1, False)
    with db.engine.begin() as conn:  # the lease is held: nobody else gets the step
        assert claims.claim_steps(conn, "fresh-worker", "token-fresh", 10, 30) == []
    time.sleep(0.6)  # the stale worker stops heartbeating; its lease runs out (on the database's clock)
    with db.engine.begin() as conn:  # a step whose worker died is not claimed with others, but taken over
        assert claims.claim_steps(conn, "fresh-worker", "token-fresh", 10, 30) == []
        fresh = claims.take_over_step(conn, "fresh-worker", "token-fresh", 30)
    assert fresh is not None
    assert (fresh.id, fresh.attempt, fresh.suspect, fresh.reclaims) == (stale.id, 1, True, 1)
    assert "stale-worker" in steps(db.engine, iid)["a"].error

    definitions = {stale.definition_id: definition}
    late = Outcome(stale, "completed", output={"by": "stale"}, input={"message": "a"})
    with db.engine.begin() as conn:
        assert claims.heartbeat_steps(conn, [stale], 30) == {stale.id: False}  # a stale heartbeat is refused too
        progress = writer.apply(conn, [late], definitions)
    assert progress.late == [late]
    assert progress.made_ready == 0 and progress.finished_instances == []

    row = steps(db.engine, iid)["a"]
    assert (row.status, row.lease_token, row.lease_owner, row.attempt, row.output) == (
        "running", "token-fresh", "fresh-worker", 1, None)
    assert steps(db.engine, iid)["b"].status == "pending"
    with db.engine.connect() as conn:
        dropped = conn.execute(select(events.c.step_instance_id, events.c.payload)
                               .where(events.c.type == "step.late_result_dropped")).all()
    # Both doors that find a lease lost record it: the heartbeat (which abandons the run) and the completion.
    assert [(r.step_instance_id, _payload(r.payload)) for r in dropped] == [
        (stale.id, {"attempt": 1, "outcome": "abandoned", "reason": "a heartbeat found the lease lost; the run was "
                                                                     "cancelled"}),
        (stale.id, {"attempt": 1, "outcome": "completed", "reason": "its lease was lost"})]
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
