"""Budgets on the process and on agent tasks, on both databases: each `on_exceed` (fail, pause, ask),
reservations that keep parallel branches from overspending together, token limits, the operator's
`flowdb budget show|set` and the API's /budgets, and definitions whose budgets are malformed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select, text

from flowdb.approvals import decide
from flowdb.budget_ops import BadBudget, set_budget
from flowdb.db.tables import events
from flowdb.errors import DefinitionError, NotFound

from conftest import Database, flowdb_cli
from helpers import approval_rows, definition_from, drive, instance, runs, start, steps, work
from processes import Fleet, wait_until

PARALLEL = """\
process:
  name: parallel-spend
  budget: {max_cost_usd: 0.6, on_exceed: pause}
  steps:
    - {id: a, type: agent_task, agent: pricey, message: "a", estimated_cost_usd: 0.25}
    - {id: b, type: agent_task, agent: pricey, message: "b", estimated_cost_usd: 0.25}
    - {id: c, type: agent_task, agent: pricey, message: "c", estimated_cost_usd: 0.25}
"""


def chain(on_exceed: str, extra: str = "") -> str:
    return f"""\
process:
  name: chain-{on_exceed}
  budget: {{max_cost_usd: 0.5, on_exceed: {on_exceed}{extra}}}
  steps:
    - {{id: a, type: agent_task, agent: pricey, message: "1"}}
    - {{id: b, type: agent_task, agent: pricey, message: "2", depends_on: [a]}}
    - {{id: c, type: agent_task, agent: pricey, message: "3", depends_on: [b]}}
"""


def event_payloads(db: Database, iid: int, kind: str) -> list[dict]:
    with db.engine.connect() as conn:
        return list(conn.execute(select(events.c.payload).where(events.c.instance_id == iid, events.c.type == kind)
                                 .order_by(events.c.id)).scalars())


def test_fail_stops_the_step_that_would_pass_the_budget(db: Database) -> None:
    [iid] = start(db.engine, chain("fail"))
    work(db.engine)
    rows = steps(db.engine, iid)
    assert [rows[s].status for s in "abc"] == ["completed", "completed", "failed"]
    assert rows["c"].attempt == 1 and "the process's budget would be passed ($0.5 spent of $0.5)" in rows["c"].error
    assert instance(db.engine, iid).cost_usd == 0.5
    [failed] = event_payloads(db, iid, "instance.failed")
    assert failed["error_type"] == "BudgetExceeded"
    [exceeded] = event_payloads(db, iid, "budget.exceeded")
    assert (exceeded["scope"], exceeded["step_id"], exceeded["spent_usd"], exceeded["on_exceed"]) == (
        "process", None, 0.5, "fail")


def test_reservations_keep_parallel_branches_from_overspending_together(db: Database) -> None:
    [iid] = start(db.engine, PARALLEL)
    # One worker claims all three in one batch: the third would pass 0.6 with the others' 0.5 reserved.
    drive(db.engine, lambda: sorted(r.status for r in steps(db.engine, iid).values())
          == ["completed", "completed", "waiting"])
    assert instance(db.engine, iid).cost_usd == 0.5
    [exceeded] = event_payloads(db, iid, "budget.exceeded")
    assert (exceeded["spent_usd"], exceeded["reserved_usd"], exceeded["estimate_usd"]) == (0.0, 0.5, 0.25)


def test_pause_holds_the_step_until_an_operator_sets_a_higher_limit(db: Database) -> None:
    [iid] = start(db.engine, chain("pause"))
    drive(db.engine, lambda: steps(db.engine, iid)["c"].status == "waiting")
    held = steps(db.engine, iid)["c"]
    assert held.attempt == 1 and held.input["budget_held"]["spent_usd"] == 0.5
    assert instance(db.engine, iid).status == "running"
    with pytest.raises(NotFound, match="has no budget for step 'a'; its budgets: process"):
        set_budget(db.engine, iid, "a", 1.0, None, "ops")
    with pytest.raises(BadBudget, match="give a new max_cost_usd, max_tokens or both"):
        set_budget(db.engine, iid, None, None, None, "ops")
    [row] = set_budget(db.engine, iid, None, 1.0, None, "ops@example.com")
    assert (row["max_cost_usd"], row["spent_usd"]) == (1.0, 0.5)
    work(db.engine)
    assert steps(db.engine, iid)["c"].status == "completed" and steps(db.engine, iid)["c"].attempt == 1
    assert instance(db.engine, iid).status == "completed" and instance(db.engine, iid).cost_usd == 0.75
    [changed] = event_payloads(db, iid, "budget.set")
    assert (changed["by"], changed["max_cost_usd"], changed["steps_woken"]) == ("ops@example.com", 1.0, 1)


@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_ask_opens_an_approval_to_raise_the_budget(db: Database, decision: str) -> None:
    [iid] = start(db.engine, chain("ask", ", approver: Finance@Example.com"))
    drive(db.engine, lambda: bool(approval_rows(db.engine)) and approval_rows(db.engine)[0].notified_at is not None
          and steps(db.engine, iid)["c"].status == "waiting")
    [approval] = approval_rows(db.engine)
    assert approval.approvers == ["Finance@Example.com"] and approval.step_id == "c"
    assert "Raise the process's budget of instance" in approval.title
    assert "raises the budget by $0.5" in approval.instructions
    decide(db.engine, approval.id, decision, "finance@example.com", "ok" if decision == "approve" else "too dear")
    work(db.engine)
    row = steps(db.engine, iid)["c"]
    if decision == "approve":
        assert (row.status, row.attempt) == ("completed", 1)
        with db.engine.connect() as conn:
            budget = conn.execute(text("SELECT max_cost_usd, raises, spent_usd FROM v_budgets "
                                       "WHERE instance_id = :i"), {"i": iid}).one()
        assert tuple(budget) == (1.0, 1, 0.75)
        [raised] = event_payloads(db, iid, "budget.raised")
        assert (raised["approval_id"], raised["scope"], raised["step_id"]) == (approval.id, "process", None)
    else:
        assert row.status == "failed" and "approval" in row.error and "rejected by Finance@Example.com: too dear" \
            in row.error
        assert instance(db.engine, iid).status == "failed"


def test_a_step_budget_counts_all_its_attempts_and_tokens(db: Database) -> None:
    start(db.engine, """
process:
  name: step-tokens
  steps:
    - id: loop
      type: agent_task
      agent: pricey
      message: "x"
      budget: {max_tokens: 300}
      for_each: [1, 2, 3]
      max_parallel: 1
""")
    work(db.engine)
    with db.engine.connect() as conn:
        items = conn.execute(text("SELECT item, status, error FROM step_instances WHERE step_id = 'loop' AND "
                                  "item IS NOT NULL ORDER BY item"), {}).all()
    # 150 tokens an item: two fit under 300, the third finds 300 spent.
    assert [(i.item, i.status) for i in items] == [(0, "completed"), (1, "completed"), (2, "failed")]
    assert "the budget of step 'loop' would be passed (300 tokens spent of 300)" in items[2].error


@pytest.mark.parametrize(("budget", "message"), [
    ("{}", "a budget needs max_cost_usd, max_tokens or both"),
    ("{max_cost_usd: 1, on_exceed: ask}", "on_exceed: ask needs an approver"),
    ("{max_cost_usd: 1, approver: a@b.c}", "approver is only for on_exceed: ask"),
    ("{max_cost_usd: 1, on_exceed: shout}", "on_exceed"),
    ("{max_cost_usd: -1}", "max_cost_usd"),
])
def test_malformed_budgets_are_refused_before_anything_is_written(budget: str, message: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        definition_from(f"process:\n  name: bad\n  budget: {budget}\n  steps:\n"
                        "    - {id: a, type: agent_task, agent: noop, message: x}\n")
    assert message in str(caught.value)


@pytest.mark.slow
def test_the_command_line_shows_and_sets_budgets(db: Database, tmp_path: Path) -> None:
    [iid] = start(db.engine, chain("pause"))
    drive(db.engine, lambda: steps(db.engine, iid)["c"].status == "waiting")
    env = db.cli_env()
    shown = flowdb_cli("budget", "show", str(iid), env=env)
    assert shown.returncode == 0, shown.stderr
    assert "process" in shown.stdout and "$0.5000" in shown.stdout and "pause" in shown.stdout
    as_json = json.loads(flowdb_cli("budget", "show", str(iid), "--json", env=env).stdout)
    assert as_json[0]["spent_usd"] == 0.5 and as_json[0]["max_cost_usd"] == 0.5
    refused = flowdb_cli("budget", "set", str(iid), "--step", "zzz", "--max-cost-usd", "2", env=env)
    assert refused.returncode != 0 and "has no budget for step 'zzz'" in refused.stderr
    done = flowdb_cli("budget", "set", str(iid), "--max-cost-usd", "2", env=env)
    assert done.returncode == 0 and "$0.5000 spent of $2.0000" in done.stdout
    work(db.engine)
    assert instance(db.engine, iid).status == "completed"


def test_a_step_called_process_has_a_budget_of_its_own(db: Database) -> None:
    [iid] = start(db.engine, """
process:
  name: named-process
  budget: {max_cost_usd: 5}
  steps:
    - {id: process, type: agent_task, agent: pricey, message: "x", budget: {max_cost_usd: 0.2, on_exceed: pause},
       for_each: [1, 2], max_parallel: 1}
""")
    # The first item spends $0.25; the second finds the step's $0.2 spent and waits.
    drive(db.engine, lambda: [r.status for r in runs(db.engine, iid, "process")][1:] == ["completed", "waiting"])
    rows = set_budget(db.engine, iid, "process", 1.0, None, "ops")
    assert [(r["scope"], r["step_id"], r["max_cost_usd"]) for r in rows] == [("process", None, 5.0),
                                                                             ("step", "process", 1.0)]
    work(db.engine)
    assert instance(db.engine, iid).status == "completed"


@pytest.mark.slow
def test_workers_in_separate_processes_do_not_overspend_together(db: Database, tmp_path: Path) -> None:
    """Eight parallel branches, each reserving $0.25, under a $1 budget: whichever of two worker processes
    claims them, exactly four run."""
    branches = "\n".join(f'    - {{id: b{n}, type: agent_task, agent: pricey, message: "{n}", '
                         'estimated_cost_usd: 0.25}' for n in range(8))
    ids = start(db.engine, f"process:\n  name: fan-spend\n  budget: {{max_cost_usd: 1.0, on_exceed: pause}}\n"
                           f"  steps:\n{branches}\n", count=3)
    env = db.cli_env()
    env.update(FLOWDB_LEASE_SECONDS="5", FLOWDB_POLL_SECONDS="0.05")
    fleet = Fleet(env, tmp_path, "--batch", "2", "--concurrency", "4")
    try:
        fleet.start(2)

        def settled() -> bool:
            return all(sorted(r.status for r in steps(db.engine, iid).values()) == ["completed"] * 4 + ["waiting"] * 4
                       for iid in ids)

        wait_until(settled, 60, "four branches of each instance to run and four to wait", 0.1, fleet)
        fleet.terminate()
    finally:
        fleet.close()
    assert {instance(db.engine, iid).cost_usd for iid in ids} == {1.0}
