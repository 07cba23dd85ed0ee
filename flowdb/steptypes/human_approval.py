"""human_approval: open an approval, notify the approvers, wait for a decision or the timeout.

The step comes back to a worker through the claim query at each turn (see db/approvals.py); this
handler decides what the turn does from the approval row, read in the claim's transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection

from flowdb.db import clock
from flowdb.db.approvals import ApprovalRow, ApprovalStatements, ExpireApproval, OpenApproval, ParkApproval
from flowdb.db.claims import Claimed
from flowdb.definitions import CompiledStep
from flowdb.models import HumanApproval
from flowdb.notifications import Delivery, Notice, Notifier
from flowdb.notifications.notice import decide_command
from flowdb.outcomes import Outcome
from flowdb.steptypes.base import EventSink, Parked, StepContext, StepType, StoppedStep

TIMEOUT_DECISIONS = {"approve": "approved", "reject": "rejected"}


def _statements(dialect_name: str) -> ApprovalStatements:
    return _built(dialect_name, clock.offset())


@functools.lru_cache(maxsize=4)
def _built(dialect_name: str, clock_offset: float) -> ApprovalStatements:
    """Built once per dialect (and clock offset: db/clock.py)."""
    return ApprovalStatements(dialect_name)


def decision_output(approval: ApprovalRow, *, timed_out: bool = False) -> dict[str, Any]:
    """The step's output once decided: `{{steps.review.decision}}` reads it."""
    return {"decision": approval.decision, "decided_by": approval.decided_by, "comment": approval.comment,
            "decided_at": approval.decided_at.isoformat() if approval.decided_at else None,
            "approval_id": approval.id, "timed_out": timed_out}


class HumanApprovalType(StepType):
    name = "human_approval"
    renders = True
    loads = True

    def load(self, conn: Connection, claimed: Claimed, step: CompiledStep) -> ApprovalRow | None:
        """The approval a woken step waits on (read in the claim's transaction)."""
        if not claimed.woken:
            return None
        return _statements(conn.dialect.name).get(conn, int(claimed.input["approval_id"]))

    def render(self, ctx: StepContext) -> tuple[str, str | None, list[str]]:
        """The title, instructions and artifacts of the approval the first turn opens (later turns,
        woken, render nothing)."""
        templates = ctx.step.templates
        title = (templates["title"].render(ctx.templates) if "title" in templates
                 else f"Approval needed: {ctx.definition.name} / {ctx.step.id}")
        instructions = templates["instructions"].render(ctx.templates) if "instructions" in templates else None
        artifacts = [templates[f"artifacts.{i}"].render(ctx.templates)
                     for i in range(len(getattr(ctx.step.model, "artifacts", ())))]
        return title, instructions, artifacts

    async def run(self, ctx: StepContext) -> Outcome:
        model = ctx.step.model
        assert isinstance(model, HumanApproval)
        if not ctx.claimed.woken:
            return self._open(ctx, model)
        approval: ApprovalRow | None = ctx.loaded
        if approval is None:
            return ctx.outcome("failed", retryable=False,
                               error=f"approval {ctx.claimed.input.get('approval_id')} no longer exists")
        if approval.decided:
            return ctx.outcome("completed", output=decision_output(approval), input={"approval_id": approval.id})
        if approval.status != "pending":
            return ctx.outcome("failed", retryable=False, input={"approval_id": approval.id},
                               error=f"approval {approval.id} is {approval.status}")
        if approval.notified_at is None:  # the turn after the opening one sends the notices
            events = await self._notify(ctx, approval, reminder=False)
            return ctx.outcome("waiting", side=ParkApproval(approval.id, notified=True), events=events)
        if not approval.is_due:  # woken early (a decision that another turn already took): wait on
            return ctx.outcome("waiting", side=ParkApproval(approval.id))
        return await self._timed_out(ctx, approval)

    def _open(self, ctx: StepContext, model: HumanApproval) -> Outcome:
        title, instructions, artifacts = ctx.rendered
        change = OpenApproval(approvers=list(model.approvers), quorum=model.quorum, on_timeout=model.on_timeout,
                              timeout_s=model.timeout, title=title, instructions=instructions, artifacts=artifacts)
        return ctx.outcome("waiting", side=change)

    def record(self, conn: Connection, outcome: Outcome, event: EventSink) -> Parked | None:
        """The approval rows the outcome changes (opened, notified, reminded, expired); when that parked
        the step, a `step.waiting` event naming the approval."""
        parked = _statements(conn.dialect.name).apply(conn, outcome, event)
        if parked is None:
            return None
        event("step.waiting", {"approval_id": parked.approval_id})
        return Parked(parked.claimable_now)

    def stop(self, conn: Connection, stopped: list[StoppedStep], reason: str, event: Callable[..., None]) -> None:
        """Pending approvals of cancelled steps become `cancelled` (nobody can decide them any more)."""
        for approval_id, instance_id in _statements(conn.dialect.name).cancel_for_steps(conn, [s.id for s in stopped]):
            event(instance_id, "approval.cancelled", {"approval_id": approval_id, "reason": reason})

    def describe_wait(self, outcome: Outcome) -> str | None:
        if isinstance(outcome.side, ParkApproval) and outcome.side.notified:
            return f"waiting for a decision: {decide_command(outcome.side.approval_id)}"
        return None

    async def _timed_out(self, ctx: StepContext, approval: ApprovalRow) -> Outcome:
        waited = f"{approval.timeout_s:g}s" if approval.timeout_s is not None else "its timeout"
        if approval.on_timeout == "notify":
            events = await self._notify(ctx, approval, reminder=True)
            return ctx.outcome("waiting", side=ParkApproval(approval.id, remind=True), events=events)
        given = {"approval_id": approval.id}
        if approval.on_timeout in TIMEOUT_DECISIONS:
            decision = TIMEOUT_DECISIONS[approval.on_timeout]
            output = {"decision": decision, "decided_by": None, "approval_id": approval.id, "timed_out": True,
                      "comment": f"nobody decided within {waited}; on_timeout: {approval.on_timeout}",
                      "decided_at": ctx.now.isoformat()}
            return ctx.outcome("completed", output=output, input=given,
                               side=ExpireApproval(approval.id, decision))
        return ctx.outcome("failed", retryable=False, input=given, side=ExpireApproval(approval.id, None),
                           error=f"approval {approval.id} expired: nobody decided within {waited} (on_timeout: fail)")

    async def _notify(self, ctx: StepContext, approval: ApprovalRow, *,
                      reminder: bool) -> list[tuple[str, dict[str, Any]]]:
        """Send the approval's notices on every configured channel; each delivery becomes an event.
        A channel that fails after its retries is recorded and does not hold the approval up."""
        events = []
        for notice in approval_notices(ctx.notifier, approval, reminder=reminder):
            delivery: Delivery = await ctx.notifier.send(notice)
            events.append(("approval.notified", {
                "approval_id": approval.id, "channel": delivery.channel, "ok": delivery.ok,
                "attempts": delivery.attempts, "error": delivery.error, "reminder": reminder}))
        return events


def approval_notices(notifier: Notifier, approval: ApprovalRow, *, reminder: bool) -> list[Notice]:
    """One notice per configured channel: the log always, email to approvers that are addresses, Slack."""
    title = f"Reminder: {approval.title}" if reminder else approval.title
    text = approval.instructions or (f"Instance {approval.instance_id} waits for your decision on step "
                                     f"{approval.step_id!r}.")
    if approval.quorum > 1:
        text += f" {approval.quorum} approvals are needed."

    def notice(channel: str, to: tuple[str, ...] = ()) -> Notice:
        return Notice(channel, title, text, to=to, artifacts=tuple(approval.artifacts), approval_id=approval.id,
                      instance_id=approval.instance_id)

    notices = [notice("log")]
    emails = tuple(a for a in approval.approvers if "@" in a)
    if emails and notifier.configured("email"):
        notices.append(notice("email", emails))
    if notifier.configured("slack"):
        notices.append(notice("slack"))
    return notices
