"""Execution semantics on both databases: joins, conditions, skips, retries, failures, costs."""

from __future__ import annotations

import pytest

from conftest import EXAMPLES, Database
from helpers import event_types, instance, start, steps, work


def test_condition_false_skips_branch_and_join_still_runs(db: Database) -> None:
    [iid] = start(db.engine, EXAMPLES / "triage-report.yaml")
    work(db.engine, EXAMPLES / "agents.yaml")
    rows = steps(db.engine, iid)
    assert {s: r.status for s, r in rows.items()} == {
        "research": "completed", "escalate": "skipped", "page-owner": "skipped", "summarize": "completed"}
    assert rows["summarize"].input["message"] == "Summarize 3 findings"
    inst = instance(db.engine, iid)
    assert inst.status == "completed"
    assert set(inst.outputs) == {"summarize"}  # page-owner was skipped, so it has no output
    types = event_types(db.engine, iid)
    assert types.count("step.skipped") == 2 and types[-1] == "action.log"


def test_condition_true_runs_every_branch(db: Database) -> None:
    [iid] = start(db.engine, EXAMPLES / "triage-report.yaml", {"priority": "urgent"})
    work(db.engine, EXAMPLES / "agents.yaml")
    rows = steps(db.engine, iid)
    assert {r.status for r in rows.values()} == {"completed"}
    assert rows["page-owner"].input["message"].startswith("Page the owner with reports/")


CHAIN = """
process:
  name: chain
  inputs:
    n: {type: integer, default: 2}
  steps:
    - id: first-step
      type: agent_task
      agent: flaky
      message: "go"
      retry: {max_attempts: 3, initial_interval: 0.01s, backoff: 1}
    - id: second
      type: agent_task
      agent: echo
      message: "{{ steps['first-step'].attempts }} attempts, n={{ inputs.n + 1 }}"
      depends_on: [first-step]
"""


def test_retry_policy_then_success_and_dash_ids_in_templates(db: Database) -> None:
    [iid] = start(db.engine, CHAIN)
    work(db.engine)
    rows = steps(db.engine, iid)
    assert rows["first-step"].status == "completed" and rows["first-step"].attempt == 3
    assert rows["second"].output == "3 attempts, n=3"
    assert event_types(db.engine, iid).count("step.retry_scheduled") == 2


FAILS = """
process:
  name: fails
  steps:
    - id: a
      type: agent_task
      agent: broken
      message: "x"
      retry: {max_attempts: 2, initial_interval: 0.01s}
    - id: b
      type: agent_task
      agent: noop
      message: "y"
    - id: c
      type: agent_task
      agent: noop
      message: "z"
      depends_on: [a]
  output:
    on_failure:
      - type: log
        level: error
        message: "{{process.name}} failed"
"""


def test_exhausted_retries_fail_the_instance_and_cancel_the_rest(db: Database) -> None:
    [iid] = start(db.engine, FAILS)
    work(db.engine)
    inst = instance(db.engine, iid)
    rows = steps(db.engine, iid)
    assert inst.status == "failed"
    assert "step 'a' failed: agent 'broken' raised RuntimeError: this agent always fails" in inst.error
    assert rows["a"].status == "failed" and rows["a"].attempt == 2
    assert rows["c"].status == "cancelled"
    assert rows["b"].status in ("completed", "cancelled")
    assert "instance.failed" in event_types(db.engine, iid)


def test_non_retryable_fails_at_once(db: Database) -> None:
    one = start(db.engine, """
process:
  name: refused
  steps:
    - {id: a, type: agent_task, agent: refuses, message: "x"}
""")[0]
    work(db.engine)
    assert steps(db.engine, one)["a"].attempt == 1 and instance(db.engine, one).error.endswith("refused on purpose")
    # An agent the worker does not have is not a failure: tests/test_unservable.py.


def test_costs_and_tokens_add_up_and_budget_stops_steps(db: Database) -> None:
    [iid] = start(db.engine, """
process:
  name: budgeted
  budget: {max_cost_usd: 0.5}
  steps:
    - {id: a, type: agent_task, agent: pricey, message: "1"}
    - {id: b, type: agent_task, agent: pricey, message: "2", depends_on: [a]}
    - {id: c, type: agent_task, agent: pricey, message: "3", depends_on: [b]}
""")
    work(db.engine)
    rows = steps(db.engine, iid)
    assert rows["a"].cost_usd == 0.25 and rows["a"].tokens_in == 100 and rows["a"].tokens_out == 50
    assert rows["c"].status == "failed"
    assert "the process's budget would be passed ($0.5 spent of $0.5)" in rows["c"].error
    assert instance(db.engine, iid).cost_usd == 0.5


def test_exclusive_gateway_takes_first_matching_route(db: Database) -> None:
    text = """
process:
  name: gate
  inputs:
    score: {type: string}
  steps:
    - {id: analyze, type: agent_task, agent: scorer, message: "{{inputs.score}}"}
    - id: quality
      type: gateway
      gateway_type: exclusive
      depends_on: [analyze]
      routes:
        - {condition: "{{steps.analyze.output.quality_score}} >= 80", next: publish}
        - {condition: "{{steps.analyze.output.quality_score}} >= 50", next: review}
        - {default: true, next: reprocess}
    - {id: publish, type: agent_task, agent: noop, message: "p"}
    - {id: review, type: agent_task, agent: noop, message: "r"}
    - {id: reprocess, type: agent_task, agent: noop, message: "x"}
    - {id: done, type: agent_task, agent: noop, message: "d", depends_on: [publish, review, reprocess]}
"""
    high, mid, low = (start(db.engine, text, {"score": s})[0] for s in ("90", "60", "10"))
    work(db.engine)
    expected = {high: "publish", mid: "review", low: "reprocess"}
    for iid, route in expected.items():
        rows = steps(db.engine, iid)
        ran = {s for s in ("publish", "review", "reprocess") if rows[s].status == "completed"}
        assert ran == {route}
        assert rows["done"].status == "completed" and instance(db.engine, iid).status == "completed"


def test_timer_waits_without_a_lease_then_fires(db: Database) -> None:
    [iid] = start(db.engine, """
process:
  name: timed
  steps:
    - {id: wait, type: timer, config: {duration: 0.3s}}
    - {id: after, type: agent_task, agent: noop, message: "x", depends_on: [wait]}
""")
    work(db.engine)
    rows = steps(db.engine, iid)
    assert rows["wait"].status == "completed" and rows["after"].status == "completed"
    assert (rows["wait"].finished_at - rows["wait"].created_at).total_seconds() >= 0.3
    types = event_types(db.engine, iid)
    assert "step.waiting" in types and "step.woken" in types


@pytest.mark.slow
def test_heartbeats_keep_the_lease_of_a_step_that_outlives_it(db: Database, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "1.5")
    [iid] = start(db.engine, """
process:
  name: slow
  steps:
    - {id: a, type: agent_task, agent: sleepy, message: "x"}
""")
    # A 0.6 s lease for a 1.5 s handler: only heartbeats (every lease/3) keep another claim away.
    work(db.engine, lease_seconds=0.6)
    row = steps(db.engine, iid)["a"]
    assert row.status == "completed" and row.attempt == 1
    assert row.heartbeat_at > row.started_at
    assert event_types(db.engine, iid).count("step.started") == 1


def test_templates_that_read_only_process_or_whole_inputs(db: Database) -> None:
    """A template reading only `process` (or `inputs` as a whole) still gets its context."""
    [iid] = start(db.engine, """
process:
  name: only-process
  inputs:
    topic: {type: string, default: agents}
  steps:
    - {id: a, type: agent_task, agent: noop, message: "x"}
    - {id: b, type: agent_task, agent: echo, message: "run {{process.instance_id}} of {{process.name}}",
       depends_on: [a]}
    - {id: c, type: agent_task, agent: echo, message: "{{inputs}}", depends_on: [a]}
""")
    work(db.engine)
    rows = steps(db.engine, iid)
    assert rows["b"].status == "completed" and rows["b"].input["message"] == f"run {iid} of only-process"
    assert rows["c"].status == "completed" and rows["c"].input["message"] == '{"topic": "agents"}'


@pytest.mark.slow
def test_cancel_while_a_handler_runs_drops_its_late_result(db: Database, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The cancelled step's lease is cleared: the worker's result, arriving later, is dropped."""
    import asyncio
    import threading
    import time

    from sqlalchemy import select

    from flowdb.agents.registry import AgentRegistry
    from flowdb.control import cancel_instance
    from flowdb.db.tables import step_instances
    from flowdb.worker import Worker, WorkerOptions

    from helpers import AGENTS_FILE

    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "1.0")
    [iid] = start(db.engine, """
process:
  name: slow
  steps:
    - {id: slow, type: agent_task, agent: sleepy, message: "x"}
    - {id: after, type: agent_task, agent: noop, message: "y", depends_on: [slow]}
""")
    worker = Worker(db.engine, AgentRegistry.from_file(AGENTS_FILE), WorkerOptions(poll_seconds=0.05))

    def running() -> bool:
        with db.engine.connect() as conn:
            return conn.execute(select(step_instances.c.status).where(
                step_instances.c.instance_id == iid, step_instances.c.step_id == "slow")).scalar_one() == "running"

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 10
        while not running() and time.monotonic() < deadline:
            time.sleep(0.02)
        cancel_instance(db.engine, iid, "changed my mind")

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    late = time.monotonic() + 3.0
    asyncio.run(asyncio.wait_for(worker.run(until=lambda: time.monotonic() > late), 20))
    canceller.join()
    assert instance(db.engine, iid).status == "cancelled"
    assert {sid: r.status for sid, r in steps(db.engine, iid).items()} == {"slow": "cancelled", "after": "cancelled"}
    types = event_types(db.engine, iid)
    assert types.count("step.late_result_dropped") == 1 and "step.completed" not in types
