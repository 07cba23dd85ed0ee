"""Human approvals kept in the database: opening, deciding, quorum, timeouts, refusals; both databases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, select

from flowdb.approvals import (
    AlreadyDecided,
    AlreadyVoted,
    ApprovalClosed,
    ApprovalNotFound,
    BadDecision,
    NotAnApprover,
    decide,
    get_approval,
    list_approvals,
)
from flowdb.control import cancel_instance
from flowdb.db.tables import approval_approvers, approvals, events
from flowdb.errors import DefinitionError
from flowdb.worker import Worker

import helpers
from conftest import EXAMPLES, Database
from helpers import approval_rows, definition_from, instance, start, steps, waiting_for_decision

EXAMPLE_AGENTS = EXAMPLES / "agents.yaml"
MANAGER = "manager@company.com"


def drive(engine: Engine, until: Callable[[], bool], timeout: float = 30.0) -> Worker:
    return helpers.drive(engine, until, EXAMPLE_AGENTS, timeout)


def finished(engine: Engine, instance_id: int) -> Callable[[], bool]:
    return lambda: instance(engine, instance_id).status != "running"


def events_of(engine: Engine, instance_id: int, prefix: str = "approval.") -> list[tuple[str, dict[str, Any]]]:
    with engine.connect() as conn:
        rows = conn.execute(select(events.c.type, events.c.payload).where(events.c.instance_id == instance_id)
                            .order_by(events.c.id))
        return [(r.type, r.payload) for r in rows if r.type.startswith(prefix)]


def reviewed(timeout: str | None = "48h", on_timeout: str = "notify", quorum: int = 1,
             approvers: str = f"[{MANAGER}]") -> str:
    limit = f"\n        timeout: {timeout}" if timeout else ""
    return f"""
process:
  name: reviewed-variant
  steps:
    - id: draft
      type: agent_task
      agent: writer
      message: "Write draft report"
    - id: review
      type: human_approval
      depends_on: [draft]
      config:
        approvers: {approvers}
        quorum: {quorum}{limit}
        on_timeout: {on_timeout}
        title: "Review the draft of instance {{{{process.instance_id}}}}"
        artifacts:
          - "{{{{steps.draft.output_path}}}}"
    - id: publish
      type: agent_task
      agent: writer
      message: "Publish approved report"
      depends_on: [review]
      condition: "{{{{steps.review.decision}}}} == 'approved'"
"""


def test_reviewed_report_approved_then_published(db: Database) -> None:
    [iid] = start(db.engine, EXAMPLES / "reviewed-report.yaml")
    drive(db.engine, waiting_for_decision(db.engine))
    [row] = approval_rows(db.engine)
    draft = steps(db.engine, iid)["draft"]
    assert (row.instance_id, row.step_id, row.status, row.quorum, row.on_timeout) == (iid, "review", "pending", 1,
                                                                                         "notify")
    assert row.approvers == [MANAGER]
    assert row.artifacts == [draft.output["output_path"]]
    assert row.timeout_s == 48 * 3600
    assert abs((row.due_at - row.created_at).total_seconds() - 48 * 3600) < 1
    assert steps(db.engine, iid)["review"].lease_token is None  # waiting holds no lease
    assert [a.id for a in list_approvals(db.engine, approver="Manager@Company.com", status="pending")] == [row.id]
    assert list_approvals(db.engine, approver="someone@else.com") == []

    result = decide(db.engine, row.id, "approve", MANAGER, comment="ship it")
    assert result.decided and result.approval.status == "approved" and result.approval.decided_by == MANAGER
    drive(db.engine, finished(db.engine, iid))

    assert instance(db.engine, iid).status == "completed"
    rows = steps(db.engine, iid)
    assert {sid: r.status for sid, r in rows.items()} == {"draft": "completed", "review": "completed",
                                                          "publish": "completed"}
    output = rows["review"].output
    assert (output["decision"], output["decided_by"], output["comment"], output["approval_id"]) == (
        "approved", MANAGER, "ship it", row.id)
    assert output["decided_at"] and output["timed_out"] is False
    kinds = [kind for kind, _ in events_of(db.engine, iid)]
    assert kinds == ["approval.requested", "approval.notified", "approval.decided"]
    [(_, notified)] = events_of(db.engine, iid, "approval.notified")
    assert notified["channel"] == "log" and notified["ok"] is True


def test_rejection_skips_publish_and_the_instance_completes(db: Database) -> None:
    [iid] = start(db.engine, EXAMPLES / "reviewed-report.yaml")
    drive(db.engine, waiting_for_decision(db.engine))
    [row] = approval_rows(db.engine)
    decide(db.engine, row.id, "reject", MANAGER, comment="not yet")
    drive(db.engine, finished(db.engine, iid))
    assert instance(db.engine, iid).status == "completed"
    rows = steps(db.engine, iid)
    assert (rows["review"].status, rows["review"].output["decision"], rows["publish"].status) == (
        "completed", "rejected", "skipped")
    [after] = approval_rows(db.engine)
    assert (after.status, after.decision, after.decided_by, after.comment) == ("rejected", "rejected", MANAGER,
                                                                               "not yet")


@pytest.mark.parametrize(("on_timeout", "approval_decision", "publish", "final"), [
    ("approve", "approved", "completed", "completed"),
    ("reject", "rejected", "skipped", "completed"),
    ("fail", None, "cancelled", "failed"),
])
@pytest.mark.slow
def test_timeout_actions_decide_for_nobody(db: Database, on_timeout: str, approval_decision: str | None,
                                           publish: str, final: str) -> None:
    [iid] = start(db.engine, reviewed(timeout="1s", on_timeout=on_timeout))
    drive(db.engine, finished(db.engine, iid))
    assert instance(db.engine, iid).status == final
    [row] = approval_rows(db.engine)
    assert (row.status, row.decision, row.decided_by) == ("expired", approval_decision, None)
    assert row.decided_at >= row.due_at
    rows = steps(db.engine, iid)
    assert rows["publish"].status == publish
    if on_timeout == "fail":
        assert rows["review"].status == "failed"
        assert "expired: nobody decided within 1s (on_timeout: fail)" in rows["review"].error
    else:
        assert rows["review"].output["timed_out"] is True
        assert rows["review"].output["decision"] == approval_decision
    with pytest.raises(ApprovalClosed, match="expired"):
        decide(db.engine, row.id, "approve", MANAGER)


@pytest.mark.slow
def test_timeout_notify_reminds_each_timeout_and_keeps_waiting(db: Database) -> None:
    [iid] = start(db.engine, reviewed(timeout="1s", on_timeout="notify"))
    drive(db.engine, lambda: bool(approval_rows(db.engine)) and approval_rows(db.engine)[0].reminders >= 2,
          timeout=30)
    [row] = approval_rows(db.engine)
    assert row.status == "pending" and row.decision is None
    reminders = [p for _, p in events_of(db.engine, iid, "approval.notified") if p["reminder"]]
    assert len(reminders) >= 2
    assert len([k for k, _ in events_of(db.engine, iid) if k == "approval.reminded"]) == row.reminders
    decide(db.engine, row.id, "approve", MANAGER)
    drive(db.engine, finished(db.engine, iid))
    assert steps(db.engine, iid)["publish"].status == "completed"


def test_quorum_two_of_three(db: Database) -> None:
    [iid] = start(db.engine, reviewed(quorum=2, approvers="[a@x.com, b@x.com, c@x.com]"))
    drive(db.engine, waiting_for_decision(db.engine))
    [row] = approval_rows(db.engine)
    first = decide(db.engine, row.id, "approve", "a@x.com")
    assert not first.decided and first.approvals_needed == 1 and first.approval.status == "pending"
    with pytest.raises(AlreadyVoted, match=r"a@x\.com already approved"):
        decide(db.engine, row.id, "approve", "A@x.com")
    assert steps(db.engine, iid)["review"].status == "waiting"
    second = decide(db.engine, row.id, "approve", "c@x.com", comment="agreed")
    assert second.decided and second.approval.status == "approved" and second.approval.decided_by == "c@x.com"
    with pytest.raises(AlreadyDecided, match=r"already approved by c@x\.com"):
        decide(db.engine, row.id, "approve", "b@x.com")
    drive(db.engine, finished(db.engine, iid))
    assert steps(db.engine, iid)["publish"].status == "completed"
    _, votes = get_approval(db.engine, row.id)
    assert {(v.approver, v.decision) for v in votes} == {("a@x.com", "approved"), ("b@x.com", None),
                                                        ("c@x.com", "approved")}


def test_a_rejection_before_the_quorum_decides_rejected(db: Database) -> None:
    [iid] = start(db.engine, reviewed(quorum=2, approvers="[a@x.com, b@x.com, c@x.com]"))
    drive(db.engine, waiting_for_decision(db.engine))
    [row] = approval_rows(db.engine)
    decide(db.engine, row.id, "approve", "a@x.com")
    result = decide(db.engine, row.id, "reject", "b@x.com", comment="numbers are wrong")
    assert result.decided and result.approval.status == "rejected"
    drive(db.engine, finished(db.engine, iid))
    rows = steps(db.engine, iid)
    assert rows["review"].output["decision"] == "rejected" and rows["publish"].status == "skipped"


def snapshot(engine: Engine) -> tuple[list[Any], list[Any]]:
    with engine.connect() as conn:
        return (list(conn.execute(select(approvals).order_by(approvals.c.id))),
                list(conn.execute(select(approval_approvers).order_by(approval_approvers.c.approver))))


def test_malformed_or_foreign_decisions_change_nothing_and_write_nothing(db: Database) -> None:
    [iid] = start(db.engine, EXAMPLES / "reviewed-report.yaml")
    drive(db.engine, waiting_for_decision(db.engine))
    [row] = approval_rows(db.engine)
    before = snapshot(db.engine)
    events_before = events_of(db.engine, iid, "")
    with pytest.raises(NotAnApprover, match=r"intruder@evil.com is not an approver of approval \d+ "
                                            r"\(approvers: manager@company.com\)"):
        decide(db.engine, row.id, "approve", "intruder@evil.com")
    # A caller who sees only its own approvals: one that does not list it does not exist.
    with pytest.raises(ApprovalNotFound) as hidden:
        decide(db.engine, row.id, "approve", "intruder@evil.com", sees_all=False)
    assert str(hidden.value) == f"approval {row.id} does not exist"
    with pytest.raises(ApprovalNotFound) as missing:
        decide(db.engine, 9999, "approve", MANAGER, sees_all=False)
    assert str(missing.value) == "approval 9999 does not exist"
    with pytest.raises(BadDecision, match="decision must be one of approve, approved, reject, rejected, not 'maybe'"):
        decide(db.engine, row.id, "maybe", MANAGER)
    with pytest.raises(NotAnApprover, match="say who decides"):
        decide(db.engine, row.id, "approve", "  ")
    with pytest.raises(ApprovalNotFound, match="approval 9999 does not exist"):
        decide(db.engine, 9999, "approve", MANAGER)
    assert snapshot(db.engine) == before
    assert events_of(db.engine, iid, "") == events_before


def test_an_approvers_refused_attempt_is_recorded(db: Database) -> None:
    [iid] = start(db.engine, EXAMPLES / "reviewed-report.yaml")
    drive(db.engine, waiting_for_decision(db.engine))
    [row] = approval_rows(db.engine)
    decide(db.engine, row.id, "approve", MANAGER, sees_all=False)
    with pytest.raises(AlreadyDecided, match=f"approval {row.id} was already approved by {MANAGER} at "):
        decide(db.engine, row.id, "reject", MANAGER, sees_all=False)
    refused = [p for kind, p in events_of(db.engine, iid) if kind == "approval.refused"]
    assert [(p["by"], p["decision"], p["reason"]) for p in refused] == [(MANAGER, "reject", "already_decided")]


def test_a_cancelled_instance_cancels_its_approval_and_refuses_decisions(db: Database) -> None:
    [iid] = start(db.engine, EXAMPLES / "reviewed-report.yaml")
    drive(db.engine, waiting_for_decision(db.engine))
    [row] = approval_rows(db.engine)
    assert sorted(cancel_instance(db.engine, iid, "no longer needed")) == ["publish", "review"]
    [after] = approval_rows(db.engine)
    assert after.status == "cancelled"
    before = snapshot(db.engine)
    with pytest.raises(ApprovalClosed, match="is cancelled"):
        decide(db.engine, row.id, "approve", MANAGER)
    assert snapshot(db.engine) == before
    assert instance(db.engine, iid).status == "cancelled"
    assert {sid: r.status for sid, r in steps(db.engine, iid).items()} == {
        "draft": "completed", "review": "cancelled", "publish": "cancelled"}


def test_a_decision_while_the_notices_go_out_is_not_missed(db: Database) -> None:
    """Decided between the opening turn and the notify turn: the step still wakes and completes."""
    [iid] = start(db.engine, EXAMPLES / "reviewed-report.yaml")
    drive(db.engine, lambda: bool(approval_rows(db.engine)))  # opened; the notify turn may not have run
    [row] = approval_rows(db.engine)
    decide(db.engine, row.id, "approve", MANAGER)
    drive(db.engine, finished(db.engine, iid), timeout=20)
    assert steps(db.engine, iid)["publish"].status == "completed"


def test_approvers_and_quorum_are_checked_at_deploy() -> None:
    with pytest.raises(DefinitionError, match="is listed twice"):
        definition_from(reviewed(approvers="[a@x.com, A@X.com]"))
    with pytest.raises(DefinitionError, match="more than the 1 approvers"):
        definition_from(reviewed(quorum=2))
