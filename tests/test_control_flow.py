"""Control flow on both databases: gateways, loops (R1-R4), joins (R5, R6), `end`, cancelling one step.

Each test runs a real process with an in-process worker and checks exact statuses and run counts.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from flowdb.approvals import decide
from flowdb.control import StepNotCancellable, cancel_step
from flowdb.db.tables import approvals, events

from conftest import EXAMPLES, Database, flowdb_cli
from helpers import approval_rows, drive, instance, runs, start, steps, waiting_for_decision, work

AGENTS = Path(__file__).resolve().parent / "agents_control_flow.yaml"


def statuses(db: Database, iid: int) -> dict[str, str]:
    return {sid: row.status for sid, row in steps(db.engine, iid).items()}


def event_list(db: Database, iid: int, kind: str) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [row.payload or {} for row in conn.execute(
            select(events.c.payload).where(events.c.instance_id == iid, events.c.type == kind).order_by(events.c.id))]


# -- the user's example --------------------------------------------------------------------------

@pytest.mark.parametrize(("score", "taken"), [(90, "publish"), (60, "review"), (20, "reprocess")])
def test_conditional_flow_runs_as_written(db: Database, monkeypatch: pytest.MonkeyPatch, score: int,
                                          taken: str) -> None:
    monkeypatch.setenv("FLOWDB_TEST_QUALITY", str(score))
    [iid] = start(db.engine, EXAMPLES / "conditional-flow.yaml")
    if taken == "review":
        drive(db.engine, waiting_for_decision(db.engine), AGENTS)
        [approval] = approval_rows(db.engine)
        decide(db.engine, approval.id, "approve", "manager@company.com")
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    expected = {"analyze": "completed", "gateway-quality": "completed", "publish": "skipped", "review": "skipped",
                "reprocess": "skipped"}
    expected[taken] = "completed"
    assert statuses(db, iid) == expected
    assert steps(db.engine, iid)["gateway-quality"].output == {"routes": [taken]}


# -- gateways ------------------------------------------------------------------------------------

PARALLEL = """
process:
  name: parallel-split
  steps:
    - {id: start, type: agent_task, agent: noop, message: go}
    - id: split
      type: gateway
      gateway_type: parallel
      depends_on: [start]
      routes: [{next: a}, {next: b}, {next: c}]
    - {id: a, type: agent_task, agent: noop, message: a}
    - {id: b, type: agent_task, agent: noop, message: b}
    - {id: c, type: agent_task, agent: noop, message: c}
    - {id: merge, type: agent_task, agent: noop, message: m, depends_on: [a, b, c]}
"""


def test_parallel_routes_need_no_condition(db: Database) -> None:
    [iid] = start(db.engine, PARALLEL)
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    assert set(statuses(db, iid).values()) == {"completed"}
    assert len(runs(db.engine, iid, "merge")) == 1


INCLUSIVE = """
process:
  name: inclusive-split
  inputs: {a: {type: boolean}, b: {type: boolean}, c: {type: boolean}}
  steps:
    - {id: start, type: agent_task, agent: noop, message: go}
    - id: split
      type: gateway
      gateway_type: inclusive
      depends_on: [start]
      routes:
        - {condition: "{{ inputs.a }}", next: a}
        - {condition: "{{ inputs.b }}", next: b}
        - {condition: "{{ inputs.c }}", next: c}
    - {id: a, type: agent_task, agent: noop, message: a}
    - {id: b, type: agent_task, agent: noop, message: b}
    - {id: c, type: agent_task, agent: noop, message: c}
    - {id: merge, type: agent_task, agent: noop, message: m, depends_on: [a, b, c]}
"""


@pytest.mark.parametrize("chosen", ["", "a", "ab", "abc"])
def test_inclusive_split_and_its_join(db: Database, chosen: str) -> None:
    [iid] = start(db.engine, INCLUSIVE, {k: k in chosen for k in "abc"})
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    got = statuses(db, iid)
    for branch in "abc":
        assert got[branch] == ("completed" if branch in chosen else "skipped")
    # Dead-path elimination: with no route taken the join is skipped too; otherwise it runs once.
    assert got["merge"] == ("completed" if chosen else "skipped")
    assert len(runs(db.engine, iid, "merge")) == 1


# -- loops -----------------------------------------------------------------------------------------

REVIEW_LOOP = """
process:
  name: review-loop
  steps:
    - id: draft
      type: agent_task
      agent: echo
      max_visits: %(max_visits)s
      message: "draft{%% if steps.check.output %%} after {{ steps.check.output.quality_score }}{%% endif %%}"
    - id: check
      type: agent_task
      agent: scorer
      depends_on: [draft]
      message: "{{ steps.draft.visit * 30 }}"
    - id: decide
      type: gateway
      gateway_type: exclusive
      depends_on: [check]
      routes:
        - {condition: "{{ steps.check.output.quality_score }} >= 80", next: publish}
        - {condition: "{{ steps.check.output.quality_score }} < 80", next: draft}
        - {default: true, next: give-up}
    - {id: publish, type: agent_task, agent: noop, message: "publish"}
    - {id: give-up, type: agent_task, agent: noop, message: "give up"}
"""


def test_a_loop_runs_until_its_condition_lets_it_out(db: Database) -> None:
    [iid] = start(db.engine, REVIEW_LOOP % {"max_visits": 10})
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    # Rounds 1, 2, 3 score 30, 60, 90: three rounds of the body, then the exit.
    for sid in ("draft", "check", "decide"):
        assert [r.round for r in runs(db.engine, iid, sid)] == [1, 2, 3], sid
        assert {r.status for r in runs(db.engine, iid, sid)} == {"completed"}
    assert [r.output["quality_score"] for r in runs(db.engine, iid, "check")] == [30, 60, 90]
    assert statuses(db, iid) == {"draft": "completed", "check": "completed", "decide": "completed",
                                 "publish": "completed", "give-up": "skipped"}
    assert [e["round"] for e in event_list(db, iid, "step.loop_back")] == [2, 3]
    # A step reads a later step of its loop as of the round before (nothing in the first round).
    assert [r.output for r in runs(db.engine, iid, "draft")] == ["draft", "draft after 30", "draft after 60"]


def test_max_visits_exhausted_takes_the_default(db: Database) -> None:
    [iid] = start(db.engine, REVIEW_LOOP % {"max_visits": 2})
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    assert [r.round for r in runs(db.engine, iid, "draft")] == [1, 2]
    assert statuses(db, iid)["give-up"] == "completed"
    assert statuses(db, iid)["publish"] == "skipped"
    [exhausted] = event_list(db, iid, "gateway.loop_exhausted")
    assert exhausted == {"target": "draft", "max_visits": 2, "rounds": 2}


def test_an_exhausted_loop_without_another_route_fails_naming_the_limit(db: Database) -> None:
    definition = (REVIEW_LOOP % {"max_visits": 2}).replace("        - {default: true, next: give-up}\n", "") \
        .replace("{condition: \"{{ steps.check.output.quality_score }} >= 80\", next: publish}",
                 "{condition: \"{{ steps.check.output.quality_score }} >= 999\", next: publish}")
    definition = definition.replace("    - {id: give-up, type: agent_task, agent: noop, message: \"give up\"}\n", "")
    [iid] = start(db.engine, definition)
    work(db.engine, AGENTS)
    row = instance(db.engine, iid)
    assert row.status == "failed"
    assert "'decide'" in row.error and "max_visits 2" in row.error


JOIN_AFTER_LOOP = """
process:
  name: join-after-loop
  steps:
    - {id: start, type: agent_task, agent: noop, message: go}
    - {id: draft, type: agent_task, agent: noop, message: d, depends_on: [start]}
    - {id: check, type: agent_task, agent: scorer, depends_on: [draft], message: "{{ steps.draft.visit * 40 }}"}
    - id: decide
      type: gateway
      gateway_type: exclusive
      depends_on: [check]
      routes:
        - {condition: "{{ steps.check.output.quality_score }} < 80", next: draft}
        - {default: true, next: done}
    - {id: done, type: agent_task, agent: noop, message: done}
    - {id: side, type: agent_task, agent: noop, message: side, depends_on: [start]}
    - {id: merge, type: agent_task, agent: noop, message: merge, depends_on: [done, side]}
"""


def test_a_join_after_a_loop_waits_for_the_loops_exit(db: Database) -> None:
    [iid] = start(db.engine, JOIN_AFTER_LOOP)
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    assert [r.round for r in runs(db.engine, iid, "draft")] == [1, 2]
    [merge] = runs(db.engine, iid, "merge")
    last_decision = runs(db.engine, iid, "decide")[-1]
    assert merge.status == "completed" and merge.started_at >= last_decision.finished_at
    assert [r.status for r in runs(db.engine, iid, "done")] == ["completed"]


ANY_IN_LOOP = """
process:
  name: any-in-loop
  steps:
    - {id: draft, type: agent_task, agent: noop, message: d}
    - {id: a1, type: agent_task, agent: sleepy, message: s, depends_on: [draft]}
    - {id: a2, type: agent_task, agent: noop, message: s, depends_on: [a1]}
    - {id: b, type: agent_task, agent: noop, message: s, depends_on: [draft]}
    - {id: meet, type: agent_task, agent: noop, message: m, depends_on: [a2, b], join: any}
    - {id: out, type: agent_task, agent: noop, message: o, depends_on: [a2]}
    - id: decide
      type: gateway
      gateway_type: exclusive
      depends_on: [meet]
      routes:
        - {condition: "{{ steps.draft.visit }} < 2", next: draft}
        - {default: true, next: done}
    - {id: done, type: agent_task, agent: noop, message: done}
"""


@pytest.mark.slow
def test_a_loop_back_cancels_what_its_round_left_open(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A join: any in a loop body lets the loop go back while a parent of the round still runs: that
    round's open steps are cancelled, and never count into the next round (found by the fleet test)."""
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "1")
    [iid] = start(db.engine, ANY_IN_LOOP)
    work(db.engine, AGENTS, timeout=20)
    assert instance(db.engine, iid).status == "completed"
    assert [(r.round, r.status) for r in runs(db.engine, iid, "a1")] == [(1, "cancelled"), (2, "completed")]
    assert [(r.round, r.status) for r in runs(db.engine, iid, "a2")] == [(1, "cancelled"), (2, "completed")]
    a1, a2 = runs(db.engine, iid, "a1")[1], runs(db.engine, iid, "a2")[1]
    assert a2.started_at >= a1.finished_at  # round 2's a2 waited for round 2's a1
    # `out` leaves the loop from a2: its edge counts in the first round only, where a2 was cancelled.
    assert [(r.round, r.status) for r in runs(db.engine, iid, "out")] == [(1, "skipped")]


LOOP_WITH_OUTSIDE_PARENT = """
process:
  name: loop-with-outside-parent
  steps:
    - {id: guidelines, type: agent_task, agent: noop, message: g}
    - {id: brief, type: agent_task, agent: noop, message: b}
    - {id: draft, type: agent_task, agent: noop, message: d, depends_on: [brief]}
    - {id: review, type: agent_task, agent: noop, message: r, depends_on: [draft, guidelines]}
    - id: ok
      type: gateway
      gateway_type: exclusive
      depends_on: [review]
      routes:
        - {condition: "{{ steps.draft.visit }} < 3", next: draft}
        - {default: true, next: publish}
    - {id: publish, type: agent_task, agent: noop, message: p}
"""


def test_a_loop_whose_body_has_a_parent_outside_it(db: Database) -> None:
    """`review` waits for `guidelines` (outside the loop) in its first round only; the loop is found
    whatever the order of the steps in the file."""
    [iid] = start(db.engine, LOOP_WITH_OUTSIDE_PARENT)
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    assert [r.round for r in runs(db.engine, iid, "review")] == [1, 2, 3]
    assert [r.round for r in runs(db.engine, iid, "guidelines")] == [1]
    assert statuses(db, iid)["publish"] == "completed"


# -- joins -----------------------------------------------------------------------------------------

JOINS = """
process:
  name: joins
  steps:
    - {id: fast, type: agent_task, agent: noop, message: f}
    - {id: also-fast, type: agent_task, agent: noop, message: f}
    - {id: slow, type: agent_task, agent: sleepy, message: s, retry: {max_attempts: 1}}
    - id: after
      type: agent_task
      agent: noop
      message: a
      depends_on: %(parents)s
      join: %(join)s
      cancel_others: %(cancel)s
"""


@pytest.mark.slow
def test_join_any_does_not_wait_for_the_slow_parent(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "1.5")
    [iid] = start(db.engine, JOINS % {"parents": "[fast, slow]", "join": "any", "cancel": "false"})
    work(db.engine, AGENTS)
    rows = steps(db.engine, iid)
    assert instance(db.engine, iid).status == "completed"
    assert rows["after"].status == "completed" and rows["slow"].status == "completed"
    assert rows["after"].finished_at < rows["slow"].finished_at
    assert len(runs(db.engine, iid, "after")) == 1


@pytest.mark.slow
def test_join_at_least_two_of_three(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "1.5")
    [iid] = start(db.engine, JOINS % {"parents": "[fast, also-fast, slow]", "join": "{at_least: 2}",
                                      "cancel": "false"})
    work(db.engine, AGENTS)
    rows = steps(db.engine, iid)
    assert {sid: r.status for sid, r in rows.items()} == dict.fromkeys(rows, "completed")
    assert rows["after"].finished_at < rows["slow"].finished_at


@pytest.mark.slow
def test_a_race_cancels_the_loser(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "6")
    [iid] = start(db.engine, JOINS % {"parents": "[fast, slow]", "join": "any", "cancel": "true"})
    work(db.engine, AGENTS, timeout=20)
    row = instance(db.engine, iid)
    assert row.status == "completed"
    assert (row.finished_at - row.started_at).total_seconds() < 4  # it did not wait for the loser
    assert statuses(db, iid) == {"fast": "completed", "also-fast": "completed", "slow": "cancelled",
                                 "after": "completed"}
    assert any("cancel_others" in e.get("reason", "") for e in event_list(db, iid, "step.cancelled"))


@pytest.mark.slow
def test_a_cancelling_partial_join(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """at_least: 2 of 3 with cancel_others: the third parent is cancelled once two completed (WCP 32)."""
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "6")
    [iid] = start(db.engine, JOINS % {"parents": "[fast, also-fast, slow]", "join": "{at_least: 2}",
                                      "cancel": "true"})
    work(db.engine, AGENTS, timeout=20)
    row = instance(db.engine, iid)
    assert row.status == "completed" and (row.finished_at - row.started_at).total_seconds() < 4
    assert statuses(db, iid) == {"fast": "completed", "also-fast": "completed", "slow": "cancelled",
                                 "after": "completed"}


DEFERRED_CHOICE = """
process:
  name: deferred-choice
  steps:
    - {id: start, type: agent_task, agent: noop, message: go}
    - {id: manager-decides, type: human_approval, approvers: [boss@example.com], depends_on: [start]}
    - {id: deadline, type: timer, duration: 0.5s, depends_on: [start]}
    - id: next
      type: agent_task
      agent: noop
      message: n
      depends_on: [manager-decides, deadline]
      join: any
      cancel_others: true
"""


def test_a_deferred_choice_between_a_decision_and_a_timer(db: Database) -> None:
    """Whichever happens first, the decision or the deadline, wins; the other is withdrawn (WCP 16)."""
    [iid] = start(db.engine, DEFERRED_CHOICE)
    work(db.engine, AGENTS, timeout=20)
    assert instance(db.engine, iid).status == "completed"
    assert statuses(db, iid) == {"start": "completed", "manager-decides": "cancelled", "deadline": "completed",
                                 "next": "completed"}
    assert [r.status for r in approval_rows(db.engine)] == ["cancelled"]


@pytest.mark.slow
def test_retrying_a_failure_gives_back_only_what_the_failure_cancelled(db: Database,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A race's loser stays cancelled when a later failure is retried (it was cancelled for its own sake)."""
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "4")
    definition = (JOINS % {"parents": "[fast, slow]", "join": "any", "cancel": "true"}) + \
        "    - {id: last, type: agent_task, agent: refuses, message: x, depends_on: [after]}\n" + \
        "    - {id: other, type: agent_task, agent: sleepy, message: y, depends_on: [fast]}\n"
    [iid] = start(db.engine, definition)
    work(db.engine, timeout=30)
    assert instance(db.engine, iid).status == "failed"
    assert statuses(db, iid) == {"fast": "completed", "also-fast": "completed", "slow": "cancelled",
                                 "after": "completed", "last": "failed", "other": "cancelled"}
    from flowdb.control import retry_step

    retry_step(db.engine, iid, "last")
    after_retry = statuses(db, iid)
    assert after_retry["slow"] == "cancelled"  # the race's loser: not given back
    assert after_retry["other"] == "ready"  # cancelled by the failure: given back
    assert after_retry["last"] == "ready"


def test_every_parent_skipped_skips_a_join_any(db: Database) -> None:
    definition = """
process:
  name: any-all-skipped
  steps:
    - {id: a, type: agent_task, agent: noop, message: a, condition: "1 == 2"}
    - {id: b, type: agent_task, agent: noop, message: b, condition: "1 == 2"}
    - {id: c, type: agent_task, agent: noop, message: c, depends_on: [a, b], join: any}
"""
    [iid] = start(db.engine, definition)
    work(db.engine, AGENTS)
    assert statuses(db, iid) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert instance(db.engine, iid).status == "completed"


# -- end -------------------------------------------------------------------------------------------

END = """
process:
  name: end-early
  steps:
    - id: review
      type: human_approval
      approvers: [boss@example.com]
    - {id: work, type: agent_task, agent: noop, message: w}
    - {id: finish, type: end, depends_on: [work]}
    - {id: never, type: agent_task, agent: noop, message: n, depends_on: [review]}
"""


def test_end_completes_the_instance_and_cancels_a_waiting_approval(db: Database) -> None:
    [iid] = start(db.engine, END)
    work(db.engine, AGENTS)
    row = instance(db.engine, iid)
    assert row.status == "completed"
    assert statuses(db, iid) == {"review": "cancelled", "work": "completed", "finish": "completed",
                                 "never": "cancelled"}
    with db.engine.connect() as conn:
        assert [r.status for r in conn.execute(select(approvals.c.status))] == ["cancelled"]
    assert event_list(db, iid, "instance.completed") == [{"reason": "ended by step 'finish'"}]


# -- cancelling one step -------------------------------------------------------------------------

CANCEL = """
process:
  name: cancel-one
  steps:
    - {id: long, type: agent_task, agent: sleepy, message: l, retry: {max_attempts: 1}}
    - {id: short, type: agent_task, agent: noop, message: s}
    - {id: both, type: agent_task, agent: noop, message: b, depends_on: [long, short]}
    - {id: only-long, type: agent_task, agent: noop, message: o, depends_on: [long]}
"""


@pytest.mark.slow
def test_cancel_a_running_step_and_its_successors_go_on(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "8")  # long enough for the CLI to start on a loaded machine
    [iid] = start(db.engine, CANCEL)

    def running() -> bool:
        return statuses(db, iid)["long"] == "running" and statuses(db, iid)["short"] == "completed"

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 20
        while not running() and time.monotonic() < deadline:
            time.sleep(0.05)
        result = flowdb_cli("cancel", str(iid), "--step", "long", env=db.cli_env())
        assert result.returncode == 0, result.stderr

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    work(db.engine, AGENTS, timeout=30)
    canceller.join()
    assert instance(db.engine, iid).status == "completed"
    assert statuses(db, iid) == {"long": "cancelled", "short": "completed", "both": "completed",
                                 "only-long": "skipped"}
    # The worker's late result for `long` was dropped, not recorded.
    assert event_list(db, iid, "step.late_result_dropped")


def test_cancel_a_waiting_approval_step(db: Database) -> None:
    definition = """
process:
  name: cancel-approval
  steps:
    - {id: review, type: human_approval, approvers: [boss@example.com]}
    - {id: other, type: agent_task, agent: noop, message: o}
    - {id: after, type: agent_task, agent: noop, message: a, depends_on: [review, other]}
"""
    [iid] = start(db.engine, definition)
    drive(db.engine, waiting_for_decision(db.engine), AGENTS)
    cancel_step(db.engine, iid, "review", "not needed")
    [approval] = approval_rows(db.engine)
    assert approval.status == "cancelled"
    work(db.engine, AGENTS)
    assert statuses(db, iid) == {"review": "cancelled", "other": "completed", "after": "completed"}
    assert instance(db.engine, iid).status == "completed"
    with pytest.raises(StepNotCancellable):
        cancel_step(db.engine, iid, "other")


def test_cancelling_a_finished_step_is_refused_and_writes_nothing(db: Database) -> None:
    [iid] = start(db.engine, PARALLEL)
    work(db.engine, AGENTS)
    before = len(event_list(db, iid, "step.completed"))
    result = flowdb_cli("cancel", str(iid), "--step", "merge", env=db.cli_env())
    assert result.returncode != 0
    assert "instance" in result.stderr and "running" in result.stderr
    assert len(event_list(db, iid, "step.completed")) == before


# -- for_each --------------------------------------------------------------------------------------

FAN_OUT = """
process:
  name: fan-out
  inputs: {count: {type: integer, default: 5}}
  steps:
    - {id: list, type: agent_task, agent: lister, message: "{{ inputs.count }}"}
    - id: research
      type: agent_task
      agent: echo
      depends_on: [list]
      for_each: "{{ steps.list.output.companies }}"
      message: "research {{ item }} #{{ index }}"
    - id: merge
      type: agent_task
      agent: echo
      depends_on: [research]
      message: "{{ steps.research.output | length }} results"
"""


def test_for_each_over_a_previous_steps_output(db: Database) -> None:
    [iid] = start(db.engine, FAN_OUT, {"count": 5})
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    research = runs(db.engine, iid, "research")
    own, items = research[0], research[1:]
    assert own.item is None and [r.item for r in items] == [0, 1, 2, 3, 4]
    assert own.output == [f"research company-{i} #{i}" for i in range(5)]
    assert {r.status for r in research} == {"completed"}
    assert [r.item_value for r in items] == [f"company-{i}" for i in range(5)]
    assert steps(db.engine, iid)["merge"].output == "5 results"


def test_for_each_over_an_empty_list_completes_with_no_item(db: Database) -> None:
    [iid] = start(db.engine, FAN_OUT, {"count": 0})
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    [own] = runs(db.engine, iid, "research")
    assert own.status == "completed" and own.output == []
    assert steps(db.engine, iid)["merge"].output == "0 results"


PARALLEL_ITEMS = """
process:
  name: limited
  steps:
    - id: each
      type: agent_task
      agent: timed
      for_each: [a, b, c, d, e, f, g]
      max_parallel: 2
      message: "{{ item }}"
"""


@pytest.mark.slow
def test_max_parallel_is_never_exceeded_and_items_start_in_order(db: Database,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "0.3")
    [iid] = start(db.engine, PARALLEL_ITEMS)
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    items = [r for r in runs(db.engine, iid, "each") if r.item is not None]
    spans = [(r.output["began"], r.output["ended"]) for r in items]
    for began, _ in spans:
        running = sum(1 for b, e in spans if b <= began < e)
        assert running <= 2, spans
    assert max(sum(1 for b, e in spans if b <= began < e) for began, _ in spans) == 2  # it did run two at once
    starts = [r.started_at for r in items]
    assert starts == sorted(starts)
    assert runs(db.engine, iid, "each")[0].output == [r.output for r in items]


COMPLETE_WHEN = """
process:
  name: first-two
  steps:
    - id: each
      type: agent_task
      agent: timed
      for_each: [a, b, c, d, e, f]
      max_parallel: 2
      complete_when: "{{ completed >= 2 }}"
      cancel_remaining: %s
      message: "{{ item }}"
    - {id: after, type: agent_task, agent: noop, message: x, depends_on: [each]}
"""


def test_complete_when_releases_the_successors_and_cancels_the_rest(db: Database,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "0.4")
    [iid] = start(db.engine, COMPLETE_WHEN % "true")
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    own, *items = runs(db.engine, iid, "each")
    done = [r for r in items if r.status == "completed"]
    assert len(done) >= 2 and own.status == "completed"
    assert {r.status for r in items} <= {"completed", "cancelled"}
    assert any(r.status == "cancelled" for r in items)
    assert own.output[:2] == [r.output for r in items[:2]] and own.output.count(None) == len(items) - len(
        [r for r in items if r.status == "completed" and own.output[r.item] is not None])
    assert steps(db.engine, iid)["after"].status == "completed"


def test_complete_when_without_cancel_lets_the_items_finish(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "0.2")
    [iid] = start(db.engine, COMPLETE_WHEN % "false")
    work(db.engine, AGENTS)
    assert instance(db.engine, iid).status == "completed"
    _own, *items = runs(db.engine, iid, "each")
    assert {r.status for r in items} == {"completed"}
    after = steps(db.engine, iid)["after"]
    assert after.started_at < max(r.finished_at for r in items)  # released before the last item finished


def test_an_item_that_fails_fails_the_step_and_the_instance(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "0")
    definition = PARALLEL_ITEMS.replace("[a, b, c, d, e, f, g]", "[a, fail, c]")
    [iid] = start(db.engine, definition)
    work(db.engine, AGENTS)
    row = instance(db.engine, iid)
    assert row.status == "failed" and "item 1 of step 'each'" in row.error
    own, *items = runs(db.engine, iid, "each")
    assert own.status == "failed" and items[1].status == "failed"


@pytest.mark.slow
def test_cancel_a_for_each_step_cancels_its_unfinished_items(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "1")
    [iid] = start(db.engine, PARALLEL_ITEMS)

    def two_done() -> bool:
        return sum(r.status == "completed" for r in runs(db.engine, iid, "each")) >= 2

    drive(db.engine, two_done, AGENTS)
    cancel_step(db.engine, iid, "each", "enough")
    work(db.engine, AGENTS)
    own, *items = runs(db.engine, iid, "each")
    assert own.status == "cancelled"
    assert sum(r.status == "completed" for r in items) >= 2  # finished items stand
    assert {r.status for r in items} == {"completed", "cancelled"}
    assert instance(db.engine, iid).status == "completed"
