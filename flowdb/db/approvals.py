"""Approval rows as a human_approval step moves through them, written in the outcome's transaction.

A human_approval step is claimed like any step, and comes back to a worker the same way:
1. first claim: its handler renders the request; here the `approvals` row is inserted and the step
   parks, claimable at once (phase `notify`);
2. the notify claim sends the notices; here the step parks until the approval's `due_at` (never,
   without a timeout) or at once if someone decided meanwhile;
3. a decision (flowdb/approvals.py) makes the waiting step claimable; so does `due_at` passing.
   That claim completes the step with the decision, or carries out `on_timeout`.
Timeouts are therefore rows that the claim query finds: exactly one worker fires each.

Lock order, on PostgreSQL: the outcome's writer locks the instance row, then the step; a decision
locks the instance row first too, so the two serialize and cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BindParameter,
    Connection,
    Update,
    bindparam,
    case,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.sql.elements import ColumnClause, ColumnElement

from flowdb.db.claims import LEASE_DROPPED
from flowdb.db.clock import Clock
from flowdb.db.tables import approval_approvers, approvals, step_instances
from flowdb.engine.status import ApprovalStatus, StepStatus, word
from flowdb.outcomes import Outcome

if TYPE_CHECKING:
    from collections.abc import Callable

A, S, AA = approvals, step_instances, approval_approvers
PENDING: ColumnClause[str] = word(ApprovalStatus.PENDING)


@dataclass(frozen=True)
class OpenApproval:
    """Open an approval for the claimed step (its first claim)."""

    approvers: list[str]
    quorum: int
    on_timeout: str
    timeout_s: float | None
    title: str
    instructions: str | None
    artifacts: list[str]
    state: dict[str, Any] | None = None  # kept in the waiting step's input beside the approval's id


@dataclass(frozen=True)
class ParkApproval:
    """Wait for the decision (or due_at): after the first notices, after a reminder, or again."""

    approval_id: int
    notified: bool = False  # the first notices went out: set notified_at
    remind: bool = False  # on_timeout notify fired: due_at moves one timeout on, a reminder counted
    state: dict[str, Any] | None = None  # kept in the waiting step's input beside the approval's id


@dataclass(frozen=True)
class ExpireApproval:
    """Nobody decided in time: close the approval as `expired`, with on_timeout's decision if any."""

    approval_id: int
    decision: str | None


ApprovalChange = OpenApproval | ParkApproval | ExpireApproval


@dataclass(frozen=True)
class Parked:
    approval_id: int
    claimable_now: bool  # the next turn follows at once (other workers may be woken for it)


@dataclass(frozen=True)
class ApprovalRow:
    """An approval as a handler or a command sees it."""

    id: int
    instance_id: int
    step_instance_id: int
    step_id: str
    approvers: list[str]
    quorum: int
    status: str
    decision: str | None
    decided_by: str | None
    comment: str | None
    title: str
    instructions: str | None
    artifacts: list[str]
    on_timeout: str
    timeout_s: float | None
    due_at: datetime | None
    reminders: int
    created_at: datetime
    notified_at: datetime | None
    decided_at: datetime | None
    is_due: bool  # due_at has passed, by the database's clock

    @property
    def decided(self) -> bool:
        return self.status in ("approved", "rejected")


class ApprovalStatements:
    def __init__(self, dialect_name: str) -> None:
        clock = Clock(dialect_name)
        self.postgres = dialect_name == "postgresql"
        self.clock = clock
        aid: BindParameter[int] = bindparam("aid")
        is_due: ColumnElement[Any] = case((A.c.due_at <= clock.now, literal(1)), else_=literal(0))
        self.load = select(*A.c, is_due.label("is_due")).where(A.c.id == aid)
        base = dict(status=PENDING, created_at=clock.now, reminders=literal(0))
        self.insert_timed = A.insert().values(due_at=clock.plus(bindparam("due_in")), **base).returning(A.c.id)
        self.insert_untimed = A.insert().values(due_at=None, **base).returning(A.c.id)
        self.insert_approvers = AA.insert()
        self.mark_notified = update(A).where(A.c.id == aid).values(
            notified_at=case((A.c.notified_at.is_(None), clock.now), else_=A.c.notified_at))
        self.remind = update(A).where(A.c.id == aid, A.c.status == PENDING).values(
            due_at=clock.plus(A.c.timeout_s), reminders=A.c.reminders + literal(1))
        self.expire = update(A).where(A.c.id == aid, A.c.status == PENDING).values(
            status=word(ApprovalStatus.EXPIRED), decision=bindparam("decision"), decided_at=clock.now)
        self.cancel_pending = (
            update(A).where(A.c.step_instance_id.in_(bindparam("sids", expanding=True)), A.c.status == PENDING)
            .values(status=word(ApprovalStatus.CANCELLED), decided_at=clock.now)
            .returning(A.c.id, A.c.instance_id)
        )
        # Park the step until the approval's due_at (NULL: no timeout, only a decision wakes it), or
        # make it claimable now when the approval is no longer pending (decided while notices went out).
        approval_status = select(A.c.status).where(A.c.id == aid).scalar_subquery()
        approval_due = select(A.c.due_at).where(A.c.id == aid).scalar_subquery()
        self.park: Update = (
            update(S)
            .where(S.c.id == bindparam("sid"), S.c.lease_token == bindparam("token"),
                   S.c.status == word(StepStatus.RUNNING))
            .values(status=word(StepStatus.WAITING), input=bindparam("input"), woken=true(),
                    claimable_at=case((approval_status == PENDING, approval_due), else_=clock.now),
                    **LEASE_DROPPED)
        )
        # Park claimable at once: the notify turn follows the opening turn straight away.
        self.park_now: Update = (
            update(S)
            .where(S.c.id == bindparam("sid"), S.c.lease_token == bindparam("token"),
                   S.c.status == word(StepStatus.RUNNING))
            .values(status=word(StepStatus.WAITING), input=bindparam("input"), woken=true(), claimable_at=clock.now,
                    **LEASE_DROPPED)
        )
        # A decision wakes the waiting step: the claim query takes waiting rows whose time has come.
        self.wake_step = (
            update(S).where(S.c.id == bindparam("sid"), S.c.status == word(StepStatus.WAITING))
            .values(claimable_at=clock.now)
        )

    def get(self, conn: Connection, approval_id: int) -> ApprovalRow | None:
        row = conn.execute(self.load, {"aid": approval_id}).mappings().first()
        return None if row is None else row_of(row)

    def apply(self, conn: Connection, o: Outcome, event: Callable[[str, dict[str, Any]], None]) -> Parked | None:
        """Write the outcome's approval change. When that parked the step too, where it waits; None
        when the caller still records the outcome as it stands (an expiry that went through)."""
        change = o.side
        step = o.step
        if isinstance(change, OpenApproval):
            statement = self.insert_timed if change.timeout_s is not None else self.insert_untimed
            approval_id = conn.execute(statement, {
                "instance_id": step.instance_id, "step_instance_id": step.id, "step_id": step.step_id,
                "approvers": change.approvers, "quorum": change.quorum, "title": change.title,
                "instructions": change.instructions, "artifacts": change.artifacts,
                "on_timeout": change.on_timeout, "timeout_s": change.timeout_s,
                "due_in": change.timeout_s}).scalar_one()
            conn.execute(self.insert_approvers, [{"approval_id": approval_id, "approver": approver_key(a)}
                                                 for a in change.approvers])
            event("approval.requested", {"approval_id": approval_id, "approvers": change.approvers,
                                         "quorum": change.quorum, "timeout_s": change.timeout_s})
            self._park(conn, o, approval_id, "notify")
            return Parked(int(approval_id), claimable_now=True)
        if isinstance(change, ParkApproval):
            if change.notified:
                conn.execute(self.mark_notified, {"aid": change.approval_id})
            if change.remind and conn.execute(self.remind, {"aid": change.approval_id}).rowcount:
                event("approval.reminded", {"approval_id": change.approval_id})
            self._park(conn, o, change.approval_id, "wait")
            return Parked(change.approval_id, claimable_now=False)  # a decision meanwhile publishes its own wake
        if isinstance(change, ExpireApproval):
            if conn.execute(self.expire, {"aid": change.approval_id, "decision": change.decision}).rowcount:
                event("approval.expired", {"approval_id": change.approval_id, "decision": change.decision})
                return None
            # A human decided between this step's claim and now: wake again and take that decision.
            self._park(conn, o, change.approval_id, "wait")
            return Parked(change.approval_id, claimable_now=True)
        raise TypeError(f"unknown approval change {change!r}")

    def _park(self, conn: Connection, o: Outcome, approval_id: int, phase: str) -> None:
        # The turn is told by the approval row (notified_at); a step type may keep state of its own beside it.
        state = {**(getattr(o.side, "state", None) or {}), "approval_id": approval_id}
        conn.execute(self.park_now if phase == "notify" else self.park,
                     {"sid": o.step.id, "token": o.step.lease_token, "aid": approval_id, "input": state})

    def cancel_for_steps(self, conn: Connection, step_instance_ids: list[int]) -> list[tuple[int, int]]:
        """Pending approvals of stopped steps become `cancelled`: (approval id, instance id) of each."""
        if not step_instance_ids:
            return []
        return [(row.id, row.instance_id) for row in conn.execute(self.cancel_pending, {"sids": step_instance_ids})]


def approver_key(identity: str) -> str:
    """How an identity is stored and compared: trimmed, lower-cased (email addresses, mostly)."""
    return identity.strip().lower()


def row_of(row: Any) -> ApprovalRow:
    return ApprovalRow(
        id=row["id"], instance_id=row["instance_id"], step_instance_id=row["step_instance_id"],
        step_id=row["step_id"], approvers=list(row["approvers"]), quorum=row["quorum"], status=row["status"],
        decision=row["decision"], decided_by=row["decided_by"], comment=row["comment"], title=row["title"],
        instructions=row["instructions"], artifacts=list(row["artifacts"] or []), on_timeout=row["on_timeout"],
        timeout_s=row["timeout_s"], due_at=row["due_at"], reminders=row["reminders"], created_at=row["created_at"],
        notified_at=row["notified_at"], decided_at=row["decided_at"], is_due=bool(row.get("is_due", False)),
    )
