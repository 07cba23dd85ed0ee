"""Pause and resume (issue 15, part 2), and retry.on_exhausted: pause, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from flowdb.agents import AgentRegistry
from flowdb.control import NotPausable, NotPaused, cancel_instance, pause_instance, resume_instance
from flowdb.db.tables import events, process_instances, step_instances
from flowdb.worker import Worker, WorkerOptions

from apiserver import ApiServer, assert_problem, client, csrf_of, ui_session
from conftest import Database, flowdb_cli
from helpers import AGENTS_FILE, background_worker, event_types, instance, start, steps, until, work
from processes import Fleet, instance_statuses, wait_until

CHAIN = """
process:
  name: chain
  steps:
    - {id: a, type: agent_task, agent: noop, message: a}
    - {id: b, type: agent_task, agent: noop, message: b, depends_on: [a]}
    - {id: c, type: agent_task, agent: noop, message: c, depends_on: [b]}
"""


def run_for(db: Database, seconds: float) -> None:
    """A worker for a while, whatever is left to do (a paused instance stays `running`)."""
    worker = Worker(db.engine, AgentRegistry.from_file(AGENTS_FILE), WorkerOptions(poll_seconds=0.05))
    deadline = time.monotonic() + seconds
    asyncio.run(worker.run(until=lambda: time.monotonic() > deadline))


def started_after(db: Database, instance_id: int, since: Any) -> list[str]:
    with db.engine.connect() as conn:
        return list(conn.execute(select(events.c.type).where(
            events.c.instance_id == instance_id, events.c.type == "step.started",
            events.c.created_at > since)).scalars())


def test_a_paused_instance_starts_nothing_until_it_resumes(db: Database) -> None:
    [iid] = start(db.engine, CHAIN)
    pause_instance(db.engine, iid, "ops@x.com")
    paused = instance(db.engine, iid)
    assert (paused.status, paused.paused_by) == ("running", "ops@x.com") and paused.paused_at is not None
    assert {row.paused for row in steps(db.engine, iid).values()} == {True}
    run_for(db, 1.0)
    assert {s.status for s in steps(db.engine, iid).values()} == {"ready", "pending"}
    assert "step.started" not in event_types(db.engine, iid)

    resume_instance(db.engine, iid, "ops@x.com")
    assert instance(db.engine, iid).paused_at is None
    work(db.engine)
    assert instance(db.engine, iid).status == "completed"
    kinds = event_types(db.engine, iid)
    assert kinds.count("instance.paused") == 1 and kinds.count("instance.resumed") == 1
    assert kinds.count("step.completed") == 3


def test_pausing_twice_resuming_what_is_not_paused_and_pausing_a_finished_one_are_refused(db: Database) -> None:
    [iid] = start(db.engine, CHAIN)
    with pytest.raises(NotPaused, match="is not paused"):
        resume_instance(db.engine, iid, "x")
    pause_instance(db.engine, iid, "x")
    with pytest.raises(NotPausable, match="paused already"):
        pause_instance(db.engine, iid, "x")
    cancel_instance(db.engine, iid)
    assert instance(db.engine, iid).paused_at is None  # a finished instance is not paused
    with pytest.raises(NotPausable, match="only running instances can be paused"):
        pause_instance(db.engine, iid, "x")
    result = flowdb_cli("pause", str(iid), env=db.cli_env())
    assert result.returncode != 0 and "only running instances can be paused" in result.stderr
    result = flowdb_cli("pause", env=db.cli_env())
    assert result.returncode == 2 and "give an instance id or --process NAME" in result.stderr


TIMED = """
process:
  name: timed
  steps:
    - {id: wait, type: timer, duration: 1s}
    - {id: after, type: agent_task, agent: noop, message: go, depends_on: [wait]}
"""


def test_a_timer_keeps_its_due_time_and_fires_when_the_instance_resumes(db: Database) -> None:
    [iid] = start(db.engine, TIMED)
    run_for(db, 0.3)  # the timer is claimed and parks until its time
    assert steps(db.engine, iid)["wait"].status == "waiting"
    due = steps(db.engine, iid)["wait"].claimable_at
    pause_instance(db.engine, iid, "x")
    run_for(db, 1.5)  # its time passes while paused
    held = steps(db.engine, iid)["wait"]
    assert (held.status, held.claimable_at, held.paused) == ("waiting", due, True)
    resume_instance(db.engine, iid, "x")
    began = time.monotonic()
    work(db.engine)
    assert time.monotonic() - began < 5  # at once: its due time had passed
    assert instance(db.engine, iid).status == "completed"


EXHAUSTED = """
process:
  name: exhausted
  steps:
    - id: ask
      type: agent_task
      agent: broken
      message: go
      retry: {max_attempts: 2, initial_interval: 0.01, on_exhausted: pause}
    - {id: after, type: agent_task, agent: noop, message: go, depends_on: [ask]}
"""


def test_on_exhausted_pause_keeps_the_instance_for_a_person_to_fix_and_resume(db: Database) -> None:
    [iid] = start(db.engine, EXHAUSTED)
    run_for(db, 1.5)
    row = instance(db.engine, iid)
    assert (row.status, row.paused_by) == ("running", "flowdb") and row.paused_at is not None
    ask = steps(db.engine, iid)["ask"]
    assert (ask.status, ask.attempt, ask.max_attempts, ask.paused) == ("ready", 2, 4, True)  # fresh attempts
    assert ask.error_type == "RuntimeError"
    kinds = event_types(db.engine, iid)
    assert kinds.count("step.exhausted") == 1 and "instance.failed" not in kinds
    # `flowdb run` of such a process stops at the pause and says how to go on.
    # Resumed (the agent still fails): two more attempts, then paused again, never failed.
    resume_instance(db.engine, iid, "x")
    run_for(db, 1.5)
    ask = steps(db.engine, iid)["ask"]
    assert (ask.status, ask.attempt, ask.max_attempts) == ("ready", 4, 6)
    assert instance(db.engine, iid).paused_at is not None
    assert event_types(db.engine, iid).count("step.exhausted") == 2


def test_the_api_pauses_and_resumes_an_instance_and_a_process(api_server: ApiServer) -> None:
    [first, second] = start(api_server.engine, CHAIN, count=2)
    with client(api_server, "operator") as http:
        paused = http.post(f"/v1/instances/{first}/pause")
        assert paused.status_code == 200 and paused.json()["paused"] is True, paused.text
        assert http.get(f"/v1/instances/{first}").json()["paused_by"].endswith("(api)")
        assert_problem(http.post(f"/v1/instances/{first}/pause"), 409, "paused already")
        by_process = http.post("/v1/processes/chain/pause").json()
        assert by_process == {"process": "chain", "paused": True, "instances": [second]}
        assert http.post("/v1/processes/chain/resume").json()["instances"] == [first, second]
        assert_problem(http.post(f"/v1/instances/{first}/resume"), 409, "is not paused")
        assert_problem(http.post("/v1/processes/nothing/pause"), 404, "no instance of process")
        assert_problem(http.post("/v1/instances/999/pause"), 404)
    with client(api_server, "viewer") as viewer:
        assert_problem(viewer.post(f"/v1/instances/{first}/pause"), 403, "needs the operator role")
    assert instance(api_server.engine, first).paused_at is None


SLOW_CHAIN = """
process:
  name: slow-chain
  steps:
    - {id: a, type: agent_task, agent: sleepy, message: a}
    - {id: b, type: agent_task, agent: sleepy, message: b, depends_on: [a]}
    - {id: c, type: agent_task, agent: sleepy, message: c, depends_on: [b]}
    - {id: d, type: agent_task, agent: sleepy, message: d, depends_on: [c]}
    - {id: e, type: agent_task, agent: sleepy, message: e, depends_on: [d]}
    - {id: f, type: agent_task, agent: sleepy, message: f, depends_on: [e]}
"""


@pytest.mark.slow
def test_pausing_fifty_instances_under_three_workers_starts_nothing_and_loses_nothing(
        db: Database, tmp_path: Path) -> None:
    ids = start(db.engine, SLOW_CHAIN, count=50)
    env = {**db.cli_env(), "FLOWDB_TEST_SLEEP": "0.3", "FLOWDB_POLL_SECONDS": "0.05"}
    fleet = Fleet(env, tmp_path)
    fleet.start(3)
    try:
        wait_until(lambda: _count(db, "step.completed") >= 10, 60, "some steps to complete", fleet=fleet)
        paused = flowdb_cli("pause", "--process", "slow-chain", env=db.cli_env())
        assert paused.returncode == 0, paused.stderr
        pauses = _pauses(db)  # instance -> when it was paused
        assert f"paused {len(pauses)} running instance(s)" in paused.stdout
        assert len(pauses) >= 25, "the pause came mid-flight"  # however loaded the machine, most were running
        time.sleep(2.0)  # what ran at the pause finishes; nothing new starts
        assert {i: started_after(db, i, since) for i, since in pauses.items()} == {i: [] for i in pauses}
        with db.engine.connect() as conn:
            running = conn.execute(select(step_instances.c.id).where(step_instances.c.status == "running")).all()
            still = conn.execute(select(process_instances.c.id).where(
                process_instances.c.paused_at.is_not(None))).scalars().all()
        assert running == [] and still  # a paused instance whose last step ran at the pause completed
        resumed = flowdb_cli("resume", "--process", "slow-chain", env=db.cli_env())
        assert resumed.returncode == 0 and f"resumed {len(still)} paused instance(s)" in resumed.stdout
        wait_until(lambda: instance_statuses(db.engine).get("completed") == 50, 120, "every instance to complete",
                   fleet=fleet)
    finally:
        fleet.terminate()
    with db.engine.connect() as conn:
        done = Counter(conn.execute(select(events.c.instance_id, events.c.step_instance_id)
                                    .where(events.c.type == "step.completed")).all())
    assert len(done) == 50 * 6 and set(done.values()) == {1}  # each step completed exactly once, none lost
    assert {i for i, _ in done} == set(ids)


def _pauses(db: Database) -> dict[int, Any]:
    with db.engine.connect() as conn:
        return dict(conn.execute(select(events.c.instance_id, events.c.created_at)
                                 .where(events.c.type == "instance.paused")).all())


def _count(db: Database, kind: str) -> int:
    with db.engine.connect() as conn:
        return len(conn.execute(select(events.c.id).where(events.c.type == kind)).all())


def test_the_web_ui_shows_pause_and_resume(api_server: ApiServer) -> None:
    """The instance page's Pause / Resume button (an operator's), and the paused badge."""
    [iid] = start(api_server.engine, CHAIN)
    with ui_session(api_server) as http:
        page = http.get(f"/ui/instances/{iid}")
        csrf = csrf_of(page)
        assert ">Pause</button>" in page.text
        assert http.post(f"/ui/instances/{iid}/pause", data={"csrf": csrf}).status_code == 303
        page = http.get(f"/ui/instances/{iid}")
        assert ">Resume</button>" in page.text and 'data-paused="true"' in page.text
        assert http.post(f"/ui/instances/{iid}/resume", data={"csrf": csrf}).status_code == 303
    assert instance(api_server.engine, iid).paused_at is None


def test_a_failure_while_paused_leaves_nothing_held_for_a_retry(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The instance fails (ending its pause); a retry of the failed step runs it and what follows."""
    from flowdb.control import retry_step

    monkeypatch.setenv("FLOWDB_TEST_FAIL_a", "1")
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "0.5")
    text = """
process:
  name: fails-paused
  steps:
    - {id: a, type: agent_task, agent: failif, message: slow a, retry: {max_attempts: 1}}
    - {id: b, type: agent_task, agent: failif, message: b, depends_on: [a]}
"""
    [iid] = start(db.engine, text)
    with background_worker(db.engine):
        until(lambda: steps(db.engine, iid)["a"].status == "running")
        pause_instance(db.engine, iid, "ops")
        until(lambda: instance(db.engine, iid).status == "failed")
    assert instance(db.engine, iid).paused_at is None
    monkeypatch.delenv("FLOWDB_TEST_FAIL_a")
    retry_step(db.engine, iid, "a")
    work(db.engine, timeout=20)
    assert instance(db.engine, iid).status == "completed"


def test_a_pause_that_loses_a_deadlock_to_a_claim_runs_again(db: Database) -> None:
    """A worker's claim holds a step row and then locks the instance row (its budget check); a pause holds
    the instance row and then updates the step rows. PostgreSQL aborts one of them: the pause runs again."""
    if db.kind != "postgresql":
        pytest.skip("SQLite runs one writer at a time: no deadlock")
    import threading
    import uuid

    from flowdb.db.budgets import BudgetChecks
    from flowdb.db.claims import ClaimStatements

    text = """
process:
  name: two
  steps:
    - {id: a, type: agent_task, agent: noop, message: a}
    - {id: b, type: agent_task, agent: noop, message: b}
"""
    [iid] = start(db.engine, text)
    errors: list[BaseException] = []

    def pause() -> None:
        try:
            pause_instance(db.engine, iid, "ops")
        except BaseException as exc:
            errors.append(exc)

    with db.engine.connect() as conn:
        with conn.begin():
            assert len(ClaimStatements("postgresql").claim_steps(conn, "w1", uuid.uuid4().hex, 1, 30.0)) == 1
            thread = threading.Thread(target=pause)
            thread.start()
            time.sleep(0.5)  # the pause holds the instance row and waits for the claimed step row
            conn.execute(BudgetChecks("postgresql").lock_instance, {"iid": iid}).all()
    thread.join(20)
    assert errors == [] and instance(db.engine, iid).paused_at is not None
