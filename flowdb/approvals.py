"""Deciding and listing approvals: the one implementation the command line and the HTTP API share.

A decision is one transaction: check the caller is an approver, lock the instance row
(PostgreSQL; SQLite's write transactions are serial anyway), check the approval is pending, count
the vote, and when it decides the approval (quorum reached, or any rejection) close the approval
with a conditional update and make the waiting step claimable. The first valid decision wins; every
later one gets AlreadyDecided naming who decided and when.

Who may learn what: a caller that may see every approval (the command line, an API operator) is
told when the decider is not one of the approvers, and who the approvers are (NotAnApprover). A
caller that only sees its own approvals (an API approver token) gets, for an approval that does not
list it, exactly what it gets for one that does not exist (ApprovalNotFound, the same message as
get_approval's): nothing about other people's approvals leaks through a decision.

What is written: a decision, and an approver's attempt refused because of the approval's state
(already decided, already voted, closed) as an `approval.refused` event. Malformed input (a bad
decision word, no identity, a long comment), an approval that does not exist and a decider who is
not an approver write nothing: otherwise anyone holding a token could grow the events table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from flowdb.db.approvals import ApprovalRow, ApprovalStatements, approver_key, row_of
from flowdb.db.clock import Clock
from flowdb.db.engine import read_only
from flowdb.db.events import EventWriter, event_row
from flowdb.db.tables import approval_approvers, approvals, process_instances
from flowdb.engine.status import ApprovalStatus, word
from flowdb.errors import FlowdbError, NotFound
from flowdb.notify import Wakeups

A, AA, I = approvals, approval_approvers, process_instances  # noqa: E741
# The words a decision may be given as, the same on the command line and over the API (any case).
DECISION_WORDS = {"approve": "approved", "approved": "approved", "reject": "rejected", "rejected": "rejected"}
APPROVAL_STATUSES = ("pending", "approved", "rejected", "expired", "cancelled")


class ApprovalError(FlowdbError):
    """A decision that was refused; nothing was changed (an approver's refused attempt is an event)."""

    reason = "refused"
    recorded = False  # the attempt is written as an approval.refused event


class ApprovalNotFound(ApprovalError, NotFound):
    reason = "not_found"


class BadDecision(ApprovalError):
    reason = "bad_decision"


class NotAnApprover(ApprovalError):
    reason = "not_an_approver"


class AlreadyDecided(ApprovalError):
    reason = "already_decided"
    recorded = True


class AlreadyVoted(ApprovalError):
    reason = "already_voted"
    recorded = True


class ApprovalClosed(ApprovalError):
    """The approval can no longer be decided: expired, cancelled, or its instance stopped."""

    reason = "closed"
    recorded = True


@dataclass(frozen=True)
class Vote:
    """One approver's part in an approval: decision None while they have not decided."""

    approver: str
    decision: str | None
    comment: str | None
    decided_at: datetime | None


@dataclass(frozen=True)
class DecisionResult:
    approval: ApprovalRow  # as it stands after this decision
    vote: str  # approved | rejected: what this caller decided
    decided: bool  # the approval is now decided (quorum reached, or a rejection)
    approvals_needed: int  # approvals still needed when not decided


def normalize_decision(word: str) -> str:
    """approved | rejected for any of DECISION_WORDS (any case, surrounding spaces ignored); BadDecision else."""
    decision = DECISION_WORDS.get(word.strip().lower())
    if decision is None:
        from flowdb.problems import suggest  # its pydantic models: only for this message

        raise BadDecision(f"decision must be one of {', '.join(DECISION_WORDS)}, not {word!r}"
                          f"{suggest(word.strip().lower(), DECISION_WORDS)}")
    return decision


def decide(engine: Engine, approval_id: int, decision: str, identity: str, comment: str | None = None,
           redis_url: str | None = None, *, sees_all: bool = True, wakeups: Wakeups | None = None,
           ) -> DecisionResult:
    """Record `identity`'s decision on an approval. Raises an ApprovalError subclass when refused.

    `sees_all`: the caller may see every approval (the command line, an API operator); False for a
    caller that sees only the approvals listing it (an API approver), to whom an approval that does
    not list `identity` does not exist. Wake-ups go through `wakeups` (default: published at once to
    `redis_url`).
    """
    wakeups = wakeups or Wakeups(redis_url)
    statements = ApprovalStatements(engine.dialect.name)
    try:
        if not identity or not identity.strip():
            raise NotAnApprover("say who decides (an identity such as an email address)")
        vote = normalize_decision(decision)
        if comment is not None and len(comment) > 10_000:
            raise BadDecision("the comment is longer than 10,000 characters")
        with engine.begin() as conn:
            result = _decide(conn, statements, approval_id, vote, identity.strip(), comment, sees_all)
    except ApprovalError as refused:
        if refused.recorded:
            _record_refusal(engine, approval_id, identity, decision, refused)
            wakeups.notify(events=True)  # the refusal is an event: live streams show it
        raise
    wakeups.notify(events=True, workers=result.decided)  # decided: the waiting step is claimable
    return result


def not_found(approval_id: int) -> ApprovalNotFound:
    """The refusal for an approval that does not exist, or that the caller may not see: one message for both."""
    return ApprovalNotFound(f"approval {approval_id} does not exist")


def _decide(conn: Connection, q: ApprovalStatements, approval_id: int, vote: str, identity: str,
            comment: str | None, sees_all: bool) -> DecisionResult:
    found = conn.execute(select(A.c.instance_id).where(A.c.id == approval_id)).first()
    if found is None:
        raise not_found(approval_id)
    approver = approver_key(identity)
    member = select(AA.c.decision, AA.c.decided_at).where(AA.c.approval_id == approval_id, AA.c.approver == approver)
    # Who is asking comes before anything about the approval's state: a stranger learns nothing of it.
    if conn.execute(member).first() is None:
        if not sees_all:
            raise not_found(approval_id)
        listed_approvers = q.get(conn, approval_id)
        assert listed_approvers is not None
        raise NotAnApprover(f"{identity} is not an approver of approval {approval_id} "
                            f"(approvers: {', '.join(listed_approvers.approvers)})")
    # The instance row first, as the workers' writers do: a decision and a step's outcome serialize.
    lock = select(I.c.status).where(I.c.id == found.instance_id)
    instance_status = conn.execute(lock.with_for_update() if q.postgres else lock).scalar_one()
    approval = q.get(conn, approval_id)
    assert approval is not None
    if approval.status != "pending":
        raise _closed(approval)
    if instance_status != "running":
        raise ApprovalClosed(f"approval {approval_id} belongs to instance {approval.instance_id}, which is "
                             f"{instance_status}; it can no longer be decided")
    listed = conn.execute(member).one()  # again, under the lock: this approver's vote may have come meanwhile
    name = next((a for a in approval.approvers if approver_key(a) == approver), identity)  # as listed
    if listed.decision is not None:
        raise AlreadyVoted(f"{name} already {listed.decision} approval {approval_id} at "
                           f"{_when(listed.decided_at)}; {_still_needed(conn, approval)} more approval(s) needed")
    clock = Clock(conn.dialect.name)
    conn.execute(update(AA).where(AA.c.approval_id == approval_id, AA.c.approver == approver,
                                  AA.c.decision.is_(None))
                 .values(decision=vote, comment=comment, decided_at=clock.now))
    approved = _approved(conn, approval_id)
    decided = vote == "rejected" or approved >= approval.quorum
    payload: dict[str, Any] = {"approval_id": approval_id, "by": name, "decision": vote, "comment": comment}
    if decided:
        closed = conn.execute(
            update(A).where(A.c.id == approval_id, A.c.status == word(ApprovalStatus.PENDING))
            .values(status=vote, decision=vote, decided_by=name, comment=comment, decided_at=clock.now))
        if closed.rowcount != 1:  # cannot happen under the instance lock; refuse rather than guess
            raise AlreadyDecided(f"approval {approval_id} was decided at the same moment; try `flowdb approvals "
                                 f"show {approval_id}`",
                                 http=f"approval {approval_id} was decided at the same moment; "
                                      f"GET /v1/approvals/{approval_id} shows how")
        conn.execute(q.wake_step, {"sid": approval.step_instance_id})
        _event(conn, clock, approval, "approval.decided", payload)
    else:
        payload["approvals_needed"] = approval.quorum - approved
        _event(conn, clock, approval, "approval.voted", payload)
    after = q.get(conn, approval_id)
    assert after is not None
    return DecisionResult(after, vote, decided, 0 if decided else approval.quorum - approved)


def _closed(approval: ApprovalRow) -> ApprovalError:
    if approval.decided:
        who = f" by {approval.decided_by}" if approval.decided_by else ""
        return AlreadyDecided(f"approval {approval.id} was already {approval.status}{who} at "
                              f"{_when(approval.decided_at)}")
    if approval.status == "expired":
        what = f" and was {approval.decision} by its on_timeout rule" if approval.decision else ""
        return ApprovalClosed(f"approval {approval.id} expired at {_when(approval.decided_at)}{what}; "
                              "it can no longer be decided")
    return ApprovalClosed(f"approval {approval.id} is {approval.status} (its instance stopped); "
                          "it can no longer be decided")


def _approved(conn: Connection, approval_id: int) -> int:
    return int(conn.execute(select(func.count()).where(AA.c.approval_id == approval_id,
                                                       AA.c.decision == "approved")).scalar_one())


def _still_needed(conn: Connection, approval: ApprovalRow) -> int:
    return max(approval.quorum - _approved(conn, approval.id), 0)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "an unknown time"


def _event(conn: Connection, clock: Clock, approval: ApprovalRow, kind: str, payload: dict[str, Any]) -> None:
    EventWriter(conn.dialect.name).write(conn, [event_row(approval.instance_id, kind, payload,
                                                          approval.step_instance_id)])


def _record_refusal(engine: Engine, approval_id: int, identity: str, decision: str, refused: ApprovalError) -> None:
    """An approver's attempt refused for the approval's state is an event too (in its own transaction:
    the decision's was rolled back)."""
    with engine.begin() as conn:
        found = conn.execute(select(A.c.instance_id, A.c.step_instance_id).where(A.c.id == approval_id)).first()
        if found is None:
            return
        EventWriter(conn.dialect.name).write(conn, [event_row(
            found.instance_id, "approval.refused", {"approval_id": approval_id, "by": identity, "decision": decision,
                                                    "reason": refused.reason, "error": str(refused)},
            found.step_instance_id)])


def get_approval(engine: Engine, approval_id: int) -> tuple[ApprovalRow, list[Vote]]:
    statements = ApprovalStatements(engine.dialect.name)
    with read_only(engine).connect() as conn:
        approval = statements.get(conn, approval_id)
        if approval is None:
            raise not_found(approval_id)
        votes = [Vote(row.approver, row.decision, row.comment, row.decided_at) for row in conn.execute(
            select(AA).where(AA.c.approval_id == approval_id).order_by(AA.c.approver))]
    return approval, votes


def list_approvals(engine: Engine, *, approver: str | None = None, status: str | None = None,
                   instance_id: int | None = None, limit: int = 100, due_first: bool = False) -> list[ApprovalRow]:
    """Approvals, newest first (`due_first`: the soonest due first, those without a due time last);
    `approver` keeps those that list that identity (an inbox)."""
    if status is not None and status not in APPROVAL_STATUSES:
        raise BadDecision(f"status must be one of {', '.join(APPROVAL_STATUSES)}, not {status!r}")
    clock = Clock(engine.dialect.name)
    is_due = (A.c.due_at <= clock.now).label("is_due")
    order = (A.c.due_at.is_(None), A.c.due_at, A.c.id) if due_first else (A.c.id.desc(),)
    query = select(*A.c, is_due).order_by(*order).limit(limit)
    if approver is not None:
        query = query.join(AA, AA.c.approval_id == A.c.id).where(AA.c.approver == approver_key(approver))
    if status is not None:
        query = query.where(A.c.status == status)
    if instance_id is not None:
        query = query.where(A.c.instance_id == instance_id)
    with read_only(engine).connect() as conn:
        return [row_of(row) for row in conn.execute(query).mappings()]
