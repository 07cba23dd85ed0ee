"""Agents' limits and platform answers, in-process on both databases: `concurrency: N` enforced by the
claim across workers, a busy agent putting its step back without spending an attempt, and a step that
waits on a platform execution polling it (never sending again), with the binding recorded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text

from flowdb.agents.registry import AgentRegistry
from flowdb.budget_ops import set_budget
from flowdb.db import clock
from flowdb.db.tables import events, process_instances
from flowdb.errors import DefinitionError
from flowdb.worker import Worker, WorkerOptions

import agents_for_tests
from conftest import Database
from helpers import drive, event_types, start, steps, work

ONE_STEP = """\
process:
  name: limited-{agent}
  steps:
    - {{id: call, type: agent_task, agent: {agent}, message: "{message}"}}
"""


def agents_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agents.yaml"
    path.write_text("agents:\n" + body)
    return path


def max_overlap(agent: str) -> int:
    running = peak = 0
    for kind, name, _ in sorted(agents_for_tests.TRACKED, key=lambda entry: (entry[2], entry[0] == "start")):
        if name != agent:
            continue
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    return peak


def run_workers(engine: Engine, agents: Path, count: int, timeout: float = 60) -> None:
    """`count` workers in one event loop (separate claims, one database) until no instance runs."""
    registry = AgentRegistry.from_file(agents)

    def all_done() -> bool:
        with engine.connect() as conn:
            return conn.execute(select(process_instances.c.id)
                                .where(process_instances.c.status == "running").limit(1)).first() is None

    async def go() -> None:
        workers = [Worker(engine, registry, WorkerOptions(poll_seconds=0.02, batch=8, concurrency=8))
                   for _ in range(count)]
        await asyncio.wait_for(asyncio.gather(*(w.run(until=all_done) for w in workers)), timeout)

    asyncio.run(go())


def test_concurrency_caps_the_agents_steps_running_at_once_across_workers(db: Database, tmp_path: Path) -> None:
    agents_for_tests.TRACKED.clear()
    agents = agents_file(tmp_path, '  solo: {python: "agents_for_tests:tracked", concurrency: 1}\n'
                                   '  trio: {python: "agents_for_tests:tracked", concurrency: 3}\n'
                                   '  free: {python: "agents_for_tests:tracked"}\n')
    for agent in ("solo", "trio", "free"):
        start(db.engine, ONE_STEP.format(agent=agent, message="m"), count=12)
    run_workers(db.engine, agents, count=3)
    with db.engine.connect() as conn:
        statuses = dict(conn.execute(text("SELECT status, COUNT(*) FROM process_instances GROUP BY status")).all())
    assert statuses == {"completed": 36}
    assert sum(1 for kind, name, _ in agents_for_tests.TRACKED if kind == "start" and name == "solo") == 12
    assert max_overlap("solo") == 1
    assert max_overlap("trio") == 3
    assert max_overlap("free") > 3  # no limit: the workers' own slots decide


def test_a_busy_agent_puts_its_step_back_without_spending_an_attempt(db: Database, tmp_path: Path) -> None:
    agents = agents_file(tmp_path, '  platform: {python: "agents_for_tests:platform_like"}\n')
    [iid] = start(db.engine, ONE_STEP.format(agent="platform", message=f"busy 2 {db.kind}-{tmp_path.name}"))
    work(db.engine, agents)
    row = steps(db.engine, iid)["call"]
    assert (row.status, row.attempt, row.error) == ("completed", 1, None), row.error
    assert row.output == f"did busy 2 {db.kind}-{tmp_path.name}"
    assert (row.agent_backend, row.agent_session) == ("python", "s-1")
    assert event_types(db.engine, iid).count("step.deferred") == 2
    with db.engine.connect() as conn:
        deferred = conn.execute(select(events.c.payload).where(events.c.type == "step.deferred")).scalars().all()
    assert {(p["attempt"], p["retry_after_s"]) for p in deferred} == {(1, 0.05)}


def test_a_step_waits_on_a_platform_execution_and_polls_it(db: Database, tmp_path: Path) -> None:
    agents = agents_file(tmp_path, '  platform: {python: "agents_for_tests:platform_like"}\n')
    [iid] = start(db.engine, ONE_STEP.format(agent="platform", message="queue 3"))
    work(db.engine, agents)
    row = steps(db.engine, iid)["call"]
    execution = f"exe-{iid}-call-1"
    assert (row.status, row.attempt, row.output) == ("completed", 1, f"done {execution}")
    assert (row.agent_backend, row.agent_execution) == ("python", execution)
    kinds = event_types(db.engine, iid)
    assert kinds.count("step.waiting") == 3  # queued, then two polls that found it still running
    assert kinds.count("step.started") == 1 and kinds.count("step.woken") == 3
    with db.engine.connect() as conn:
        view = conn.execute(text("SELECT backend, execution_id, status, attempts FROM v_agent_runs "
                                 "WHERE instance_id = :i"), {"i": iid}).one()
    assert tuple(view) == ("python", execution, "completed", 1)


def test_a_poll_that_fails_is_retried_as_a_poll_of_the_same_execution(db: Database, tmp_path: Path) -> None:
    agents = agents_file(tmp_path, '  platform: {python: "agents_for_tests:platform_like"}\n')
    message = f"queue-unreachable 3 {db.kind}-{tmp_path.name}"
    [iid] = start(db.engine, ONE_STEP.format(agent="platform", message=message))
    work(db.engine, agents)
    row = steps(db.engine, iid)["call"]
    assert (row.status, row.attempt, row.output) == ("completed", 2, f"done exe-{iid}-call-1")
    assert agents_for_tests.SENT.count(message) == 1  # sent once; the failed poll's retry polled again
    assert "step.retry_scheduled" in event_types(db.engine, iid)


@pytest.mark.parametrize(("body", "message"), [
    ("concurrency: 0", "concurrency must be a whole number of 1 or more, not 0"),
    ("concurrency: two", "concurrency must be a whole number of 1 or more, not 'two'"),
    ("tokens_per_minute: -5", "tokens_per_minute must be a whole number of 1 or more, not -5"),
    ("colour: red", "unknown: colour"),
])
def test_bad_limits_in_the_agents_file_are_refused(tmp_path: Path, body: str, message: str) -> None:
    path = agents_file(tmp_path, f'  a: {{python: "agents_for_tests:noop", {body}}}\n')
    with pytest.raises(DefinitionError) as caught:
        AgentRegistry.from_file(path)
    assert message in str(caught.value)
    assert f"{path}:2:" in str(caught.value)


def test_tokens_per_minute_holds_the_agents_steps_until_the_window_moves(db: Database, tmp_path: Path) -> None:
    agents = agents_file(tmp_path, '  metered: {python: "agents_for_tests:pricey", tokens_per_minute: 300}\n')
    [iid] = start(db.engine, """
process:
  name: metered
  steps:
    - {id: a, type: agent_task, agent: metered, message: "1"}
    - {id: b, type: agent_task, agent: metered, message: "2", depends_on: [a]}
    - {id: c, type: agent_task, agent: metered, message: "3", depends_on: [b]}
""")
    # 150 tokens a call: a and b use the minute's 300; c waits, ready, for the window to move.
    drive(db.engine, lambda: steps(db.engine, iid)["b"].status == "completed", agents_file=agents)
    deadline = time.monotonic() + 1.0
    drive(db.engine, lambda: time.monotonic() > deadline, agents_file=agents)
    assert steps(db.engine, iid)["c"].status == "ready"
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT SUM(tokens) FROM agent_token_usage WHERE agent = 'metered'")).scalar() == 300
    clock.set_offset(61)  # a minute later (the workers' clock, which the buckets use)
    try:
        work(db.engine, agents)
    finally:
        clock.set_offset(0)
    assert steps(db.engine, iid)["c"].status == "completed"


def test_a_held_step_that_finds_its_agent_busy_keeps_its_attempts(db: Database, tmp_path: Path) -> None:
    """A step a budget held back, woken by a higher limit, then put back three times by a busy agent:
    no attempt is spent on any of it (one attempt allowed, and it runs)."""
    agents = agents_file(tmp_path, '  platform: {python: "agents_for_tests:platform_like"}\n'
                                   '  pricey: {python: "agents_for_tests:pricey"}\n')
    message = f"busy 3 {db.kind}-{tmp_path.name}"
    [iid] = start(db.engine, f"""
process:
  name: held-then-busy
  budget: {{max_cost_usd: 0.25, on_exceed: pause}}
  steps:
    - {{id: a, type: agent_task, agent: pricey, message: "a"}}
    - {{id: b, type: agent_task, agent: platform, message: "{message}", depends_on: [a], retry: {{max_attempts: 1}}}}
""")
    drive(db.engine, lambda: steps(db.engine, iid)["b"].status == "waiting", agents_file=agents)
    set_budget(db.engine, iid, None, 1.0, None, "ops")
    work(db.engine, agents)
    row = steps(db.engine, iid)["b"]
    assert (row.status, row.attempt, row.output) == ("completed", 1, f"did {message}"), row.error
    assert event_types(db.engine, iid).count("step.deferred") == 3
