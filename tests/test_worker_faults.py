"""Workers under faults: a database restart, a step that crashes its worker, a stop in the middle of
steps, a lease lost while a step runs, a result the database refuses. Real worker processes."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select, update

from flowdb.db.claims import ClaimStatements
from flowdb.db.progress import ProgressWriter
from flowdb.db.tables import events, process_definitions, step_instances

from conftest import Database, flowdb_cli
from helpers import start, steps, work
from pgserver import PgServer
from processes import Fleet, event_count, instance_statuses, read_call_log, wait_until

CHAIN = """\
process:
  name: outage-chain
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


def _deploy_and_start(env: dict[str, str], folder: Path, text: str, name: str, count: int) -> list[int]:
    (folder / f"{name}.yaml").write_text(text)
    result = flowdb_cli("deploy", str(folder / f"{name}.yaml"), env=env)
    assert result.returncode == 0, result.stderr
    inputs = folder / f"{name}.jsonl"
    inputs.write_text("{}\n" * count)
    result = flowdb_cli("start", name, "--inputs-file", str(inputs), env=env)
    assert result.returncode == 0, result.stderr
    return [int(line) for line in result.stdout.split()]


@pytest.mark.slow
def test_workers_ride_out_a_database_restart(private_pg: PgServer, tmp_path: Path) -> None:
    """PostgreSQL stopped for a while and started again under three busy workers: none exits, every
    instance completes, no step completes twice, and each worker logs the outage once, not per try."""
    env = private_pg.cli_env()
    ids = _deploy_and_start(env, tmp_path, CHAIN, "outage-chain", 200)
    call_log = tmp_path / "calls.log"
    env.update(FLOWDB_LEASE_SECONDS="30", FLOWDB_POLL_SECONDS="0.1", FLOWDB_TEST_SLEEP="0.02",
               FLOWDB_TEST_CALL_LOG=str(call_log))
    engine = private_pg.engine
    fleet = Fleet(env, tmp_path, "--concurrency", "8")
    try:
        fleet.start(3)
        fleet.wait_ready()  # every worker is in its loop when the database goes away
        wait_until(lambda: sum(1 for kind, *_ in read_call_log(call_log) if kind == "end") >= 60, 60,
                   "60 steps to run", 0.05, fleet)
        engine.dispose()
        private_pg.stop()  # fast shutdown: the server disconnects every client
        time.sleep(3)
        assert all(proc.poll() is None for proc in fleet.procs), fleet.all_output()[-5000:]
        private_pg.start()
        wait_until(lambda: instance_statuses(engine) == {"completed": 200}, 120, "every instance to complete",
                   0.2, fleet)
        codes = fleet.terminate(30)
        assert codes == {pid: 0 for pid in fleet.pids}, fleet.all_output()[-5000:]
    finally:
        fleet.close()

    with engine.connect() as conn:
        completed = Counter(conn.execute(select(events.c.step_instance_id).where(events.c.type == "step.completed"))
                            .scalars())
    assert len(completed) == 3 * len(ids) and set(completed.values()) == {1}
    ends = Counter((iid, step) for kind, iid, step, _, _ in read_call_log(call_log) if kind == "end")
    assert set(ends) == {(iid, step) for iid in ids for step in "abc"}
    for pid in fleet.pids:
        output = fleet.output(pid)
        went = output.count("the database is unavailable")
        assert went >= 1 and output.count("the database is back after") == went, output[-3000:]
        assert went <= 2, output[-3000:]  # one line per outage (a second if a try landed during start-up)


@pytest.mark.slow
def test_a_worker_started_while_the_database_is_down_waits_for_it(private_pg: PgServer, tmp_path: Path) -> None:
    env = private_pg.cli_env()
    [iid] = _deploy_and_start(env, tmp_path, CHAIN, "outage-chain", 1)
    private_pg.engine.dispose()
    private_pg.stop()
    fleet = Fleet({**env, "FLOWDB_POLL_SECONDS": "0.1"}, tmp_path)
    try:
        [pid] = fleet.start(1)
        wait_until(lambda: "is unavailable" in fleet.output(pid), 30, "the worker to notice", 0.1, fleet)
        time.sleep(1)
        assert fleet.procs[0].poll() is None, fleet.all_output()
        private_pg.start()
        wait_until(lambda: instance_statuses(private_pg.engine) == {"completed": 1}, 60, "the instance to complete",
                   0.1, fleet)
        assert fleet.terminate(30) == {pid: 0}
    finally:
        fleet.close()
    assert fleet.output(pid).count("is unavailable") == 1, fleet.output(pid)
    assert steps(private_pg.engine, iid)["c"].status == "completed"


POISON = """\
process:
  name: poison
  steps:
    - id: bad
      type: agent_task
      agent: poison
      message: "{how}"
      retry: {{max_attempts: 3, initial_interval: 0s}}
"""
INNOCENT = """\
process:
  name: innocent
  steps:
    - id: work
      type: agent_task
      agent: counted
      message: "work"
      retry: {max_attempts: 3, initial_interval: 0s}
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "kill", "term"])
def test_a_step_that_crashes_its_worker_fails_alone(db: Database, tmp_path: Path, how: str) -> None:
    """A poison step among 30 innocent ones, two workers restarted as they die: the 30 complete without
    being charged for the crashes; the poison fails once its attempts are spent, however its worker died."""
    env = db.cli_env()
    innocent = _deploy_and_start(env, tmp_path, INNOCENT, "innocent", 15)
    [poisoned] = _deploy_and_start(env, tmp_path, POISON.format(how=how), "poison", 1)
    innocent += _deploy_and_start(env, tmp_path, INNOCENT, "innocent", 15)
    call_log = tmp_path / "calls.log"
    env.update(FLOWDB_LEASE_SECONDS="1.5", FLOWDB_POLL_SECONDS="0.1", FLOWDB_TEST_SLEEP="0.3",
               FLOWDB_TEST_CALL_LOG=str(call_log))
    fleet = Fleet(env, tmp_path, "--grace", "1")
    deaths = 0
    try:
        fleet.start(2)
        deadline = time.monotonic() + 150
        while instance_statuses(db.engine).get("running", 0):
            assert time.monotonic() < deadline, f"instances still running: {instance_statuses(db.engine)}\n" \
                                                 + fleet.all_output()[-5000:]
            for proc in fleet.procs:
                if proc.poll() is not None and not getattr(proc, "restarted", False):
                    proc.restarted = True  # type: ignore[attr-defined]
                    deaths += 1
                    fleet.start(1)
            time.sleep(0.1)
        fleet.terminate(30)
    finally:
        fleet.close()

    rows = {row.instance_id: row for row in _step_rows(db)}
    assert {iid: rows[iid].status for iid in innocent} == dict.fromkeys(innocent, "completed")
    assert {rows[iid].attempt for iid in innocent} == {1}  # never charged for another step's crash
    poison = rows[poisoned]
    assert poison.status == "failed" and "no attempts left (3 allowed)" in poison.error, poison.error
    assert instance_statuses(db.engine) == {"completed": 30, "failed": 1}
    assert event_count(db.engine, "step.completed") == 30

    runs = Counter((iid, step) for kind, iid, step, _, _ in read_call_log(call_log) if kind == "start")
    assert all(runs[(iid, "work")] in (1, 2) for iid in innocent), runs  # twice only if taken over from a crash
    if how == "term":
        # A stopping worker gives the step back: free three times, charged after that.
        assert "gave it back unfinished 6 times" in poison.error, poison.error
        assert runs[(poisoned, "bad")] == 6 and poison.releases == 6 and poison.reclaims == 0
    else:
        # The first crash is shared with the steps claimed beside it and charged to none; then the step
        # runs alone, and each crash of a run alone is its own.
        assert "crashes the workers that run it" in poison.error, poison.error
        assert runs[(poisoned, "bad")] == 4 and poison.reclaims == 4
        _assert_suspects_ran_alone(db)
    assert deaths >= runs[(poisoned, "bad")] - 1


def _assert_suspects_ran_alone(db: Database) -> None:
    """A worker that took a step over started nothing else until that step's run ended (its outcome; a
    worker the run took down starts nothing more at all)."""
    with db.engine.connect() as conn:
        rows = conn.execute(select(events.c.id, events.c.step_instance_id, events.c.type, events.c.payload)
                            .where(events.c.step_instance_id.is_not(None)).order_by(events.c.id)).all()
    taken_over = [row for row in rows if row.type == "step.started" and (row.payload or {}).get("suspect")]
    assert taken_over
    for began in taken_over:
        worker = began.payload["worker"]
        end = next((row.id for row in rows if row.id > began.id and row.step_instance_id == began.step_instance_id
                    and row.type != "step.started"), rows[-1].id + 1)
        beside = [row for row in rows if began.id < row.id < end and row.type in ("step.started", "step.woken")
                  and (row.payload or {}).get("worker") == worker]
        assert beside == [], (began, beside)


def _step_rows(db: Database) -> list:  # type: ignore[type-arg]
    with db.engine.connect() as conn:
        return list(conn.execute(select(step_instances)))


SLOW_STEP = """\
process:
  name: slow-step
  steps:
    - id: slow
      type: agent_task
      agent: sleepy
      message: "slow"
"""


@pytest.mark.slow
def test_a_stopping_worker_keeps_its_leases_while_it_drains(db: Database, tmp_path: Path) -> None:
    """SIGTERM in the middle of a step longer than the lease: the worker renews the lease while it lets the
    step finish, records the result and exits 0; the other worker never takes the step over."""
    env = db.cli_env()
    [iid] = _deploy_and_start(env, tmp_path, SLOW_STEP, "slow-step", 1)
    env.update(FLOWDB_LEASE_SECONDS="1", FLOWDB_POLL_SECONDS="0.1", FLOWDB_TEST_SLEEP="4")
    first = Fleet(env, tmp_path, "--grace", "10")
    second = Fleet(env, tmp_path / "second", "--grace", "10")
    (tmp_path / "second").mkdir()
    try:
        [pid] = first.start(1)
        wait_until(lambda: steps(db.engine, iid)["slow"].status == "running", 30, "the step to start", 0.05, first)
        second.start(1)
        os.kill(pid, signal.SIGTERM)
        assert first.procs[0].wait(30) == 0, first.all_output()
        assert steps(db.engine, iid)["slow"].status == "completed"
        second.terminate(30)
    finally:
        first.close()
        second.close()
    row = steps(db.engine, iid)["slow"]
    assert (row.attempt, row.reclaims, row.releases) == (1, 0, 0)
    assert event_count(db.engine, "step.started") == 1
    assert event_count(db.engine, "step.late_result_dropped") == 0


@pytest.mark.slow
def test_a_lease_found_lost_by_the_heartbeat_is_recorded(db: Database, tmp_path: Path) -> None:
    """A worker frozen (SIGSTOP) past its lease: another takes the step over and completes it; when the first
    wakes, its heartbeat finds the lease lost, abandons the run and records it as a dropped late result."""
    env = db.cli_env()
    [iid] = _deploy_and_start(env, tmp_path, SLOW_STEP, "slow-step", 1)
    env.update(FLOWDB_LEASE_SECONDS="1", FLOWDB_POLL_SECONDS="0.1")
    frozen = Fleet({**env, "FLOWDB_TEST_SLEEP": "60"}, tmp_path)
    (tmp_path / "other").mkdir()
    other = Fleet({**env, "FLOWDB_TEST_SLEEP": "0.1"}, tmp_path / "other")
    try:
        [pid] = frozen.start(1)
        wait_until(lambda: steps(db.engine, iid)["slow"].status == "running", 30, "the step to start", 0.05, frozen)
        os.kill(pid, signal.SIGSTOP)
        other.start(1)
        wait_until(lambda: steps(db.engine, iid)["slow"].status == "completed", 30, "the take-over", 0.05, other)
        os.kill(pid, signal.SIGCONT)
        wait_until(lambda: event_count(db.engine, "step.late_result_dropped"), 30, "the loss to be recorded", 0.05)
        codes = frozen.terminate(30) | other.terminate(30)
        assert set(codes.values()) == {0}, frozen.all_output() + other.all_output()
    finally:
        frozen.close()
        other.close()
    with db.engine.connect() as conn:
        dropped = conn.execute(select(events.c.payload).where(events.c.type == "step.late_result_dropped")).all()
    assert [row.payload["outcome"] for row in dropped] == ["abandoned"]
    assert "lost the lease" in frozen.output(pid)
    row = steps(db.engine, iid)["slow"]
    assert (row.status, row.attempt, row.reclaims) == ("completed", 1, 1)
    assert event_count(db.engine, "step.completed") == 1


REFUSED = """\
process:
  name: refused-result
  steps:
    - id: odd
      type: agent_task
      agent: nul
      message: "odd"
"""
FINE = """\
process:
  name: fine
  steps:
    - id: fine
      type: agent_task
      agent: noop
      message: "fine"
"""


@pytest.mark.slow
def test_a_result_the_database_refuses_fails_its_step_only(db: Database, tmp_path: Path) -> None:
    """PostgreSQL refuses a NUL character in JSON: the step whose result holds one fails with a clear
    error (SQLite stores it), the steps claimed beside it complete, and the worker goes on."""
    env = db.cli_env()
    fine = _deploy_and_start(env, tmp_path, FINE, "fine", 3)
    odd = _deploy_and_start(env, tmp_path, REFUSED, "refused-result", 3)
    fine += _deploy_and_start(env, tmp_path, FINE, "fine", 3)
    env.update(FLOWDB_POLL_SECONDS="0.1")
    fleet = Fleet(env, tmp_path)
    try:
        fleet.start(1)
        wait_until(lambda: not instance_statuses(db.engine).get("running"), 60, "the instances to finish", 0.1,
                   fleet)
        assert fleet.terminate(30) == {fleet.pids[0]: 0}, fleet.all_output()
    finally:
        fleet.close()
    assert {steps(db.engine, iid)["fine"].status for iid in fine} == {"completed"}
    for iid in odd:
        row = steps(db.engine, iid)["odd"]
        if db.kind == "postgresql":
            assert row.status == "failed"
            assert row.error.startswith("flowdb could not store this step's result:"), row.error
        else:
            assert (row.status, row.output) == ("completed", "before\x00after")
    expected = {"completed": 6, "failed": 3} if db.kind == "postgresql" else {"completed": 9}
    assert instance_statuses(db.engine) == expected


ENDLESS = """\
process:
  name: endless-template
  steps:
    - id: spin
      type: agent_task
      agent: noop
      message: "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}\\
{% endfor %}{% endfor %}{% endfor %}done"
"""
HUGE = """\
process:
  name: huge-template
  steps:
    - id: blow
      type: agent_task
      agent: noop
      message: "{{ 'a' * 10000000000 }}"
"""
@pytest.mark.slow
def test_hostile_templates_fail_their_step_within_the_limits(db: Database, tmp_path: Path) -> None:
    """An endless template and a 10 GB one fail their steps without retry, at the limits; the workers keep
    heartbeating through the render (no take-over with a lease shorter than the render), and the
    other steps complete."""
    env = db.cli_env()
    [spin] = _deploy_and_start(env, tmp_path, ENDLESS, "endless-template", 1)
    [blow] = _deploy_and_start(env, tmp_path, HUGE, "huge-template", 1)
    fine = _deploy_and_start(env, tmp_path, FINE, "fine", 5)
    env.update(FLOWDB_LEASE_SECONDS="1", FLOWDB_POLL_SECONDS="0.1", FLOWDB_TEMPLATE_TIMEOUT_SECONDS="3")
    fleet = Fleet(env, tmp_path)
    began = time.monotonic()
    try:
        fleet.start(2)
        wait_until(lambda: not instance_statuses(db.engine).get("running"), 60, "the instances to finish", 0.1,
                   fleet)
        took = time.monotonic() - began
        assert set(fleet.terminate(30).values()) == {0}, fleet.all_output()
    finally:
        fleet.close()
    assert took < 30, f"{took:.1f}s"
    row = steps(db.engine, spin)["spin"]
    assert (row.status, row.attempt, row.reclaims) == ("failed", 1, 0)
    assert row.error.startswith("step 'spin': ") and \
        "longer than the 3 s time limit (FLOWDB_TEMPLATE_TIMEOUT_SECONDS)" in row.error, row.error
    row = steps(db.engine, blow)["blow"]
    assert (row.status, row.attempt) == ("failed", 1)
    assert "1,000,000-byte limit (FLOWDB_TEMPLATE_MAX_BYTES)" in row.error, row.error
    assert {steps(db.engine, iid)["fine"].status for iid in fine} == {"completed"}
    assert event_count(db.engine, "step.retry_scheduled") == 0


@pytest.mark.slow
def test_a_worker_answers_sigterm_while_a_template_renders(db: Database, tmp_path: Path) -> None:
    env = db.cli_env()
    [spin] = _deploy_and_start(env, tmp_path, ENDLESS, "endless-template", 1)
    env.update(FLOWDB_POLL_SECONDS="0.1", FLOWDB_TEMPLATE_TIMEOUT_SECONDS="60")
    fleet = Fleet(env, tmp_path, "--grace", "1")
    try:
        [pid] = fleet.start(1)
        wait_until(lambda: steps(db.engine, spin)["spin"].status == "running", 30, "the render to start", 0.05,
                   fleet)
        time.sleep(0.5)
        began = time.monotonic()
        codes = fleet.terminate(20)
        took = time.monotonic() - began
    finally:
        fleet.close()
    assert codes == {pid: 0} and took < 10, (codes, took, fleet.all_output())
    row = steps(db.engine, spin)["spin"]
    assert (row.status, row.attempt, row.releases) == ("ready", 0, 1)  # given back, not charged


NUL_ACTION = """\
process:
  name: nul-action
  steps:
    - id: fine
      type: agent_task
      agent: noop
      message: "fine"
  output:
    on_success:
      - type: log
        message: '{{ "before\\x00after" }}'  # a Jinja escape: the YAML holds no NUL, the rendered text does
"""


@pytest.mark.slow
def test_an_event_the_database_refuses_is_dropped_and_the_worker_goes_on(db: Database, tmp_path: Path) -> None:
    """An output action whose message PostgreSQL cannot store (a NUL character): its event is dropped and
    logged; the worker goes on working (SQLite stores it)."""
    env = db.cli_env()
    ids = _deploy_and_start(env, tmp_path, NUL_ACTION, "nul-action", 2)
    fleet = Fleet({**env, "FLOWDB_POLL_SECONDS": "0.1"}, tmp_path)
    try:
        [pid] = fleet.start(1)
        wait_until(lambda: instance_statuses(db.engine) == {"completed": 2}, 60, "the instances to complete", 0.1,
                   fleet)
        later = _deploy_and_start(env, tmp_path, FINE, "fine", 2)
        wait_until(lambda: instance_statuses(db.engine) == {"completed": 4}, 60, "more work to be done", 0.1, fleet)
        assert fleet.terminate(30) == {pid: 0}, fleet.all_output()
    finally:
        fleet.close()
    logged = event_count(db.engine, "action.log")
    if db.kind == "postgresql":
        assert logged == 0
        assert fleet.output(pid).count("dropped a action.log event") == len(ids), fleet.output(pid)
    else:
        assert logged == len(ids)
    assert {steps(db.engine, iid)["fine"].status for iid in later} == {"completed"}


HANG_THEN_SUSPECT = """\
process:
  name: hang
  steps:
    - id: hang
      type: agent_task
      agent: sleepy
      message: "hang"
"""


@pytest.mark.slow
def test_a_suspect_is_handed_back_when_its_worker_cannot_get_free(db: Database, tmp_path: Path) -> None:
    """A worker that takes a step over while one of its own steps hangs waits FLOWDB_SUSPECT_WAIT_SECONDS
    for it, then hands the suspect back (its attempt given back); an idle worker takes it over and runs it."""
    env = db.cli_env()
    [orphan] = _deploy_and_start(env, tmp_path, FINE, "fine", 1)
    with db.engine.begin() as conn:  # a worker claims it and dies at once: its lease runs out in 4 s
        ClaimStatements(db.kind).claim_steps(conn, "dead-worker", "dead-token", 1, 4)
    [hang] = _deploy_and_start(env, tmp_path, HANG_THEN_SUSPECT, "hang", 1)
    env.update(FLOWDB_LEASE_SECONDS="5", FLOWDB_POLL_SECONDS="0.1", FLOWDB_SUSPECT_WAIT_SECONDS="2")
    busy = Fleet({**env, "FLOWDB_TEST_SLEEP": "600"}, tmp_path, "--grace", "1")
    (tmp_path / "idle").mkdir()
    idle = Fleet({**env, "FLOWDB_TEST_SLEEP": "0.1"}, tmp_path / "idle")
    try:
        [busy_pid] = busy.start(1)
        wait_until(lambda: steps(db.engine, hang)["hang"].status == "running", 30, "the hang to start", 0.05, busy)
        wait_until(lambda: steps(db.engine, orphan)["fine"].reclaims == 1, 30, "the busy worker's take-over", 0.05,
                   busy)
        idle.start(1)
        wait_until(lambda: steps(db.engine, orphan)["fine"].status == "completed", 30, "the idle worker to run it",
                   0.05, idle)
        codes = busy.terminate(10) | idle.terminate(10)
        assert set(codes.values()) == {0}, busy.all_output() + idle.all_output()
    finally:
        busy.close()
        idle.close()
    row = steps(db.engine, orphan)["fine"]
    assert (row.attempt, row.reclaims, row.suspect, row.isolated) == (1, 1, False, False)
    assert event_count(db.engine, "step.handed_back") == 1
    assert "handed step fine (instance 1) back" in busy.output(busy_pid)
    with db.engine.connect() as conn:
        [reason] = conn.execute(select(events.c.payload).where(events.c.type == "step.handed_back")).scalars()
    assert reason == {"attempt": 1, "reason": "its worker's other steps did not finish within 2 s"}
    _assert_suspects_ran_alone(db)


CHAIN_WITH_ACTION = """\
process:
  name: commit-in-doubt
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
  output:
    on_success:
      - {type: log, message: "done {{ process.instance_id }}"}
"""


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "lost"])
def test_a_commit_that_loses_its_answer_is_looked_up(db: Database, landed: bool,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The connection dies while a batch of completions commits (PostgreSQL over a network; a local SQLite
    file cannot lose the answer). Whether the COMMIT landed or not, the worker finds out before anything
    else: each step completes once, no result is dropped as late, no step is taken over, no output action
    is lost."""
    if db.kind == "sqlite":
        pytest.skip("a COMMIT to a local SQLite file cannot lose its answer")
    ids = start(db.engine, CHAIN_WITH_ACTION, count=3)
    dialect = db.engine.dialect
    real_commit = dialect.do_commit
    writer_apply = ProgressWriter.apply
    state = {"recording": False, "faults": 0}

    def apply(self: ProgressWriter, conn: Any, outcomes: Any, definitions: Any) -> Any:
        state["recording"] = bool(outcomes)
        return writer_apply(self, conn, outcomes, definitions)

    def do_commit(dbapi_connection: Any) -> None:
        fault = state["recording"] and state["faults"] == 0
        state["recording"] = False
        if fault and landed:
            real_commit(dbapi_connection)
        if fault:  # the answer never comes back: the connection is gone
            state["faults"] += 1
            dbapi_connection.dbapi_connection.close()  # the driver's connection under the pool's wrapper
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        real_commit(dbapi_connection)

    caplog.set_level(logging.WARNING, "flowdb.worker")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProgressWriter, "apply", apply)
        patch.setattr(dialect, "do_commit", do_commit)
        work(db.engine, timeout=30)
    assert state["faults"] == 1
    assert ("it had landed" if landed else "it had not landed: trying again") in caplog.text
    assert instance_statuses(db.engine) == {"completed": 3}
    assert event_count(db.engine, "step.completed") == 6
    assert event_count(db.engine, "step.late_result_dropped") == 0
    assert event_count(db.engine, "action.log") == 3
    assert {(row.attempt, row.reclaims) for iid in ids for row in steps(db.engine, iid).values()} == {(1, 0)}


def test_a_stored_definition_that_no_longer_compiles_fails_its_steps_only(db: Database) -> None:
    """A definition deployed under other rules (here: edited in place to what this flowdb refuses) fails the
    steps claimed from it, with the reason, instead of stopping the worker; other processes run on."""
    [broken] = start(db.engine, FINE.replace("name: fine", "name: old"))
    [fine] = start(db.engine, FINE)
    nested = "{% if x %}" * 30 + "y" + "{% endif %}" * 30
    with db.engine.begin() as conn:
        conn.execute(update(process_definitions).where(process_definitions.c.name == "old").values(
            source=FINE.replace("name: fine", "name: old").replace('message: "fine"', f"message: '{nested}'")))
    work(db.engine, timeout=30)
    row = steps(db.engine, broken)["fine"]
    assert (row.status, row.attempt) == ("failed", 1)
    assert row.error.startswith("old version 1 does not compile with this flowdb (") and "blocks nest 30 deep" in \
        row.error and row.error.endswith("deploy it again under the current rules"), row.error
    assert steps(db.engine, fine)["fine"].status == "completed"
    assert instance_statuses(db.engine) == {"completed": 1, "failed": 1}
