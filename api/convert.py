"""Rows to API bodies. Times are UTC (SQLite hands them back without a zone)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flowdb.approvals import Vote
from flowdb.db.approvals import ApprovalRow

from .schemas import ApprovalOut, InstanceOut, StepOut, VoteOut


def utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def instance_out(row: Any) -> InstanceOut:
    return InstanceOut(id=row.id, process=row.process_name, version=row.version, status=row.status,
                       trigger=row.trigger, idempotency_key=row.idempotency_key, inputs=row.inputs,
                       outputs=row.outputs, error=row.error, cost_usd=float(row.cost_usd or 0),
                       created_at=utc(row.created_at), started_at=utc(row.started_at), finished_at=utc(row.finished_at),
                       paused_at=utc(row.paused_at), paused_by=row.paused_by)


def step_out(row: Any) -> StepOut:
    return StepOut(id=row.id, step_id=row.step_id, round=row.round, item=row.item, type=row.type,
                   status=row.status, attempt=row.attempt,
                   max_attempts=row.max_attempts, agent=row.agent, ready_at=utc(row.ready_at),
                   started_at=utc(row.started_at), finished_at=utc(row.finished_at), input=row.input,
                   output=row.output, error=row.error, error_type=row.error_type, cost_usd=float(row.cost_usd or 0),
                   tokens_in=row.tokens_in,
                   tokens_out=row.tokens_out, backend=row.agent_backend, execution_id=row.agent_execution,
                   session_id=row.agent_session)


def approval_out(row: ApprovalRow, votes: list[Vote] | None = None) -> ApprovalOut:
    return ApprovalOut(
        id=row.id, instance_id=row.instance_id, step_id=row.step_id, status=row.status, decision=row.decision,
        decided_by=row.decided_by, comment=row.comment, title=row.title, instructions=row.instructions,
        artifacts=row.artifacts, approvers=row.approvers, quorum=row.quorum, on_timeout=row.on_timeout,
        timeout_s=row.timeout_s, reminders=row.reminders, requested_at=utc(row.created_at), due_at=utc(row.due_at),
        notified_at=utc(row.notified_at), decided_at=utc(row.decided_at),
        votes=None if votes is None else [VoteOut(approver=v.approver, decision=v.decision, comment=v.comment,
                                                  decided_at=utc(v.decided_at)) for v in votes])
