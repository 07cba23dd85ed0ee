"""The budget endpoints of the HTTP API (GET/POST /v1/instances/{id}/budgets) through a real uvicorn server and
httpx, on both databases: what they show after a worker ran, a raised limit waking a step a `pause` budget
holds, the refusals (each leaving the budgets as they were), the roles, and an `ask` budget's approval
decided or cancelled through the approver's inbox."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from flowdb.db.tables import events

from apiserver import ApiServer, assert_problem, client
from helpers import drive, instance, start, steps, waiting_for_decision, work

OPERATOR = "ops@example.com"
FINANCE = "finance@example.com"

# pricey costs $0.25 and 150 tokens a call: a and b spend the process's $0.5, so c is held before it starts.
HELD = """\
process:
  name: held
  budget: {max_cost_usd: 0.5, on_exceed: pause}
  steps:
    - {id: a, type: agent_task, agent: pricey, message: "1"}
    - {id: b, type: agent_task, agent: pricey, message: "2", depends_on: [a], budget: {max_tokens: 1000}}
    - {id: c, type: agent_task, agent: pricey, message: "3", depends_on: [b]}
"""

# The same chain, but the approver (written in other case than the token's identity) is asked to raise it.
ASKED = """\
process:
  name: asked
  budget: {max_cost_usd: 0.5, on_exceed: ask, approver: Finance@Example.com}
  steps:
    - {id: a, type: agent_task, agent: pricey, message: "1"}
    - {id: b, type: agent_task, agent: pricey, message: "2", depends_on: [a]}
    - {id: c, type: agent_task, agent: pricey, message: "3", depends_on: [b]}
"""

NO_BUDGETS = """\
process:
  name: unlimited
  steps:
    - {id: a, type: agent_task, agent: pricey, message: "1"}
"""


def budget(step_id: str | None, max_cost_usd: float | None, max_tokens: int | None, on_exceed: str,
           spent_usd: float, spent_tokens: int, *, approver: str | None = None, raises: int = 0,
           running_steps: int = 0) -> dict[str, Any]:
    """One item of a BudgetList as the API answers it."""
    return {"scope": "process" if step_id is None else "step", "step_id": step_id, "max_cost_usd": max_cost_usd,
            "max_tokens": max_tokens, "on_exceed": on_exceed, "approver": approver, "raises": raises,
            "spent_usd": spent_usd, "spent_tokens": spent_tokens, "running_steps": running_steps}


def held_instance(server: ApiServer) -> int:
    """An instance of HELD with a and b done and c held by the process's budget."""
    [iid] = start(server.engine, HELD)
    drive(server.engine, lambda: steps(server.engine, iid)["c"].status == "waiting")
    return iid


def budget_events(server: ApiServer, iid: int, kind: str) -> list[dict[str, Any]]:
    with server.engine.connect() as conn:
        return list(conn.execute(select(events.c.payload).where(events.c.instance_id == iid, events.c.type == kind)
                                 .order_by(events.c.id)).scalars())


def operator(server: ApiServer) -> httpx.Client:
    # Operator is the least role the budget endpoints take: every call here is made with it.
    return client(server, "operator", OPERATOR)


@pytest.mark.slow
def test_budgets_show_the_process_first_then_steps_with_what_was_spent(api_server: ApiServer) -> None:
    iid = held_instance(api_server)
    with operator(api_server) as http:
        shown = http.get(f"/v1/instances/{iid}/budgets")
        assert shown.status_code == 200, shown.text
        # The process's budget counts a and b ($0.5, 300 tokens); b's own counts b alone.
        assert shown.json() == {"items": [budget(None, 0.5, None, "pause", 0.5, 300),
                                          budget("b", None, 1000, "fail", 0.25, 150)]}


def test_an_unknown_instance_is_404_and_one_without_budgets_has_none(api_server: ApiServer) -> None:
    [iid] = start(api_server.engine, NO_BUDGETS)
    with operator(api_server) as http:
        assert_problem(http.get("/v1/instances/999999/budgets"), 404, "instance 999999 does not exist")
        assert_problem(http.post("/v1/instances/999999/budgets", json={"max_cost_usd": 1}), 404,
                       "instance 999999 does not exist")
        shown = http.get(f"/v1/instances/{iid}/budgets")
        assert shown.status_code == 200 and shown.json() == {"items": []}
        assert_problem(http.post(f"/v1/instances/{iid}/budgets", json={"max_cost_usd": 1}), 404,
                       f"instance {iid} has no budget for the process; it has no budgets")


@pytest.mark.slow
def test_a_raised_limit_wakes_the_held_step_and_the_instance_completes(api_server: ApiServer) -> None:
    iid = held_instance(api_server)
    with operator(api_server) as http:
        raised = http.post(f"/v1/instances/{iid}/budgets", json={"max_cost_usd": 1.0})
        assert raised.status_code == 200, raised.text
        assert raised.json()["items"] == [budget(None, 1.0, None, "pause", 0.5, 300),
                                          budget("b", None, 1000, "fail", 0.25, 150)]
        # A step's own budget is set by naming the step; the process's stays as it was.
        tokens = http.post(f"/v1/instances/{iid}/budgets", json={"step_id": "b", "max_tokens": 2000})
        assert tokens.status_code == 200, tokens.text
        assert tokens.json()["items"][1] == budget("b", None, 2000, "fail", 0.25, 150)
        assert tokens.json()["items"][0]["max_cost_usd"] == 1.0
        work(api_server.engine)
        held = steps(api_server.engine, iid)["c"]
        assert (held.status, held.attempt) == ("completed", 1)
        assert http.get(f"/v1/instances/{iid}").json()["status"] == "completed"
        assert http.get(f"/v1/instances/{iid}/budgets").json()["items"] == [
            budget(None, 1.0, None, "pause", 0.75, 450), budget("b", None, 2000, "fail", 0.25, 150)]
        first, second = budget_events(api_server, iid, "budget.set")
        assert (first["scope"], first["step_id"], first["max_cost_usd"], first["by"], first["steps_woken"]) == (
            "process", None, 1.0, OPERATOR, 1)
        assert (second["scope"], second["step_id"], second["max_tokens"]) == ("step", "b", 2000)
        # Finished: no budget of it can change any more, and it still shows.
        assert_problem(http.post(f"/v1/instances/{iid}/budgets", json={"max_cost_usd": 5}), 409,
                       f"instance {iid} is completed")
        assert assert_problem(http.post(f"/v1/instances/{iid}/budgets", json={"max_cost_usd": 5}), 409)["type"] \
            .endswith("/instance-not-running")
        assert http.get(f"/v1/instances/{iid}/budgets").json()["items"][0]["max_cost_usd"] == 1.0


REFUSED: list[Any] = [
    # body (JSON, or raw bytes sent as application/json), status, problem type, text in the detail
    ({"step_id": "zzz", "max_cost_usd": 1}, 404, "not-found", "has no budget for step 'zzz'; its budgets: b, process"),
    ({"step_id": "a", "max_tokens": 10}, 404, "not-found", "has no budget for step 'a'; its budgets: b, process"),
    ({}, 422, "bad-budget", "give a new max_cost_usd, max_tokens or both"),
    ({"step_id": "b"}, 422, "bad-budget", "give a new max_cost_usd, max_tokens or both"),
    ({"max_cost_usd": None, "max_tokens": None}, 422, "bad-budget", "give a new max_cost_usd"),
    ({"max_cost_usd": 0}, 422, "invalid-body", "max_cost_usd"),
    ({"max_cost_usd": -1.5}, 422, "invalid-body", "max_cost_usd"),
    ({"max_cost_usd": 2, "max_tokens": 0}, 422, "invalid-body", "max_tokens"),
    ({"max_tokens": -5}, 422, "invalid-body", "max_tokens"),
    ({"max_tokens": 1.5}, 422, "invalid-body", "max_tokens"),
    ({"max_cost_usd": "lots"}, 422, "invalid-body", "max_cost_usd"),
    ({"max_cost": 2}, 422, "invalid-body", "unknown body field(s) 'max_cost'"),
    ({"max_cost_usd": 2, "approver": "me@example.com"}, 422, "invalid-body", "'approver'"),
    ({"max_cost_usd": 2, "on_exceed": "fail"}, 422, "invalid-body", "'on_exceed'"),
    ([{"max_cost_usd": 2}], 422, "invalid-body", "the body must be a JSON object"),
    (b'{"max_cost_usd": NaN}', 400, "bad-request", "not valid JSON"),
    # Python's json reads 1e999 as inf: no limit is that (stored, SQLite answered 500 about it from then on).
    (b'{"max_cost_usd": 1e999}', 422, "invalid-body", "max_cost_usd"),
]


@pytest.mark.parametrize(("body", "status", "kind", "text"), REFUSED)
def test_refused_changes_leave_the_budgets_as_they_were(api_server: ApiServer, body: Any,
                                                         status: int, kind: str, text: str) -> None:
    [iid] = start(api_server.engine, HELD)
    with operator(api_server) as http:
        before = http.get(f"/v1/instances/{iid}/budgets").json()
        assert before["items"][0]["max_cost_usd"] == 0.5
        sent = http.post(f"/v1/instances/{iid}/budgets", content=body,
                         headers={"content-type": "application/json"}) if isinstance(body, bytes) \
            else http.post(f"/v1/instances/{iid}/budgets", json=body)
        problem = assert_problem(sent, status, text)
        assert problem["type"].endswith(f"/{kind}"), problem
        assert http.get(f"/v1/instances/{iid}/budgets").json() == before
    assert budget_events(api_server, iid, "budget.set") == []


@pytest.mark.parametrize("limit", [1e12, 1e15])
def test_a_limit_too_large_to_store_is_an_answer_not_a_500(api_server: ApiServer, limit: float) -> None:
    # max_cost_usd is NUMERIC(18, 6) on PostgreSQL: at most 999999999999.999999, so $1e12 itself does not fit.
    [iid] = start(api_server.engine, HELD)
    with operator(api_server) as http:
        before = http.get(f"/v1/instances/{iid}/budgets").json()
        sent = http.post(f"/v1/instances/{iid}/budgets", json={"max_cost_usd": limit})
        assert sent.status_code in (200, 422), sent.text
        after = http.get(f"/v1/instances/{iid}/budgets").json()
        if sent.status_code == 200:
            assert after == sent.json() and after["items"][0]["max_cost_usd"] == limit
        else:
            assert sent.json()["type"].endswith("/invalid-body") and after == before


@pytest.mark.slow
def test_an_approver_token_may_neither_see_nor_set_budgets(api_server: ApiServer) -> None:
    iid = held_instance(api_server)
    with client(api_server, "approver", FINANCE) as approver, operator(api_server) as http:
        before = http.get(f"/v1/instances/{iid}/budgets").json()
        assert_problem(approver.get(f"/v1/instances/{iid}/budgets"), 403,
                       f"this needs the viewer role; the token of {FINANCE} has the approver role")
        assert_problem(approver.post(f"/v1/instances/{iid}/budgets", json={"max_cost_usd": 10}), 403,
                       "needs the operator role")
        assert_problem(httpx.post(f"{api_server.url}/v1/instances/{iid}/budgets", json={"max_cost_usd": 10}), 401)
        assert http.get(f"/v1/instances/{iid}/budgets").json() == before
        with client(api_server, "viewer", "auditor@x.com") as viewer:  # a viewer reads them and changes nothing
            assert viewer.get(f"/v1/instances/{iid}/budgets").json() == before
            assert_problem(viewer.post(f"/v1/instances/{iid}/budgets", json={"max_cost_usd": 10}), 403,
                           "needs the operator role")
        assert budget_events(api_server, iid, "budget.set") == []
        assert steps(api_server.engine, iid)["c"].status == "waiting"
        # Nothing woke it: a worker finds nothing to do, the step stays held.
        drive(api_server.engine, lambda: True)
        assert steps(api_server.engine, iid)["c"].status == "waiting"
        assert instance(api_server.engine, iid).cost_usd == 0.5


def asked_instance(server: ApiServer) -> tuple[int, dict[str, Any]]:
    """An instance of ASKED with c waiting on the budget approval; the approval from FINANCE's inbox."""
    [iid] = start(server.engine, ASKED)
    drive(server.engine, waiting_for_decision(server.engine))
    with client(server, "approver", FINANCE) as finance:
        [approval] = finance.get("/v1/approvals").json()["items"]
    return iid, approval


@pytest.mark.slow
def test_an_ask_budget_is_raised_from_the_approvers_inbox(api_server: ApiServer) -> None:
    iid, approval = asked_instance(api_server)
    assert (approval["instance_id"], approval["step_id"], approval["status"]) == (iid, "c", "pending")
    assert approval["approvers"] == ["Finance@Example.com"]
    assert approval["title"] == f"Raise the process's budget of instance {iid} (asked)?"
    assert "raises the budget by $0.5" in approval["instructions"]
    with client(api_server, "approver", "someone@example.com") as other:
        assert other.get("/v1/approvals").json()["items"] == []
    with client(api_server, "approver", FINANCE) as finance, operator(api_server) as http:
        assert http.get(f"/v1/instances/{iid}/budgets").json()["items"] == [
            budget(None, 0.5, None, "ask", 0.5, 300, approver="Finance@Example.com")]
        decided = finance.post(f"/v1/approvals/{approval['id']}/decision", json={"decision": "approve",
                                                                                   "comment": "go on"})
        assert decided.status_code == 200, decided.text
        assert (decided.json()["decided"], decided.json()["approval"]["status"]) == (True, "approved")
        work(api_server.engine)
        held = steps(api_server.engine, iid)["c"]
        assert (held.status, held.attempt) == ("completed", 1)
        assert http.get(f"/v1/instances/{iid}").json()["status"] == "completed"
        # Approved: raised once by the budget's own $0.5.
        assert http.get(f"/v1/instances/{iid}/budgets").json()["items"] == [
            budget(None, 1.0, None, "ask", 0.75, 450, approver="Finance@Example.com", raises=1)]
        shown = finance.get(f"/v1/approvals/{approval['id']}").json()
        # The decider is named as the definition lists them (the token's identity is matched case-blind).
        assert (shown["status"], shown["decided_by"], shown["comment"]) == ("approved", "Finance@Example.com", "go on")
        assert finance.get("/v1/approvals").json()["items"] == []


@pytest.mark.slow
def test_cancelling_the_instance_cancels_the_pending_budget_approval(api_server: ApiServer) -> None:
    iid, approval = asked_instance(api_server)
    with client(api_server, "approver", FINANCE) as finance, operator(api_server) as http:
        cancelled = http.post(f"/v1/instances/{iid}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["cancelled_steps"] == ["c"], cancelled.text
        shown = finance.get(f"/v1/approvals/{approval['id']}")
        assert shown.status_code == 200 and shown.json()["status"] == "cancelled", shown.text
        assert finance.get("/v1/approvals").json()["items"] == []
        assert [a["id"] for a in finance.get("/v1/approvals", params={"status": "cancelled"}).json()["items"]] == [
            approval["id"]]
        assert_problem(finance.post(f"/v1/approvals/{approval['id']}/decision", json={"decision": "approve"}), 409)
        assert_problem(http.post(f"/v1/instances/{iid}/budgets", json={"max_cost_usd": 2}), 409,
                       f"instance {iid} is cancelled")
        assert http.get(f"/v1/instances/{iid}/budgets").json()["items"] == [
            budget(None, 0.5, None, "ask", 0.5, 300, approver="Finance@Example.com")]
        assert steps(api_server.engine, iid)["c"].status == "cancelled"
