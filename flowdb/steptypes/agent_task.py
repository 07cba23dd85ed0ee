"""agent_task: render the message, call the named agent, record output, cost, tokens and which
backend, platform execution and session ran it.

An agent may answer that its queue is full (AgentBusy: the step goes back to ready for later, no
attempt spent) or that the work still runs as a platform execution (AgentStillRunning: the step
parks with the execution's id in its row and each later turn polls that execution, so a worker that
dies while polling hands over the poll, never a second send).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from flowdb.agents.types import AgentBusy, AgentRequest, AgentStillRunning
from flowdb.db.approvals import ApprovalStatements, OpenApproval, ParkApproval
from flowdb.db.budgets import BUDGET_EXCEEDED, Verdict, scope_name
from flowdb.db.claims import Claimed
from flowdb.db.contexts import ContextStatements
from flowdb.db.feedback import FeedbackStatements, feedback_text
from flowdb.definitions import CompiledStep
from flowdb.errors import AgentConfigError, AgentUnreachable, StepFailure
from flowdb.models import AgentTask
from flowdb.outcomes import Outcome
from flowdb.steptypes.base import EventSink, Parked, StepContext, StepType, StoppedStep
from flowdb.steptypes.human_approval import approval_notices


@dataclass(frozen=True)
class Loaded:
    """What an agent task reads in its claim's transaction: a context to restore, reviewers' feedback."""

    context: dict[str, Any] | None = None
    feedback: list[dict[str, Any]] | None = None  # None: nobody reviews this step


class AgentTaskType(StepType):
    name = "agent_task"
    renders = True
    spends = True
    loads = True

    def load(self, conn: Connection, claimed: Claimed, step: CompiledStep) -> Loaded | None:
        model = step.model
        assert isinstance(model, AgentTask)
        restore = model.context.restore if model.context is not None else None
        if restore is None and not step.reviewed:  # nothing to read: no query
            return None
        dialect = conn.dialect.name
        return Loaded(_contexts(dialect).saved(conn, claimed.instance_id, restore) if restore else None,
                      _feedback(dialect).for_step(conn, claimed.instance_id, claimed.step_id)
                      if step.reviewed else None)

    def render(self, ctx: StepContext) -> str:
        assert ctx.step.message is not None
        loaded = ctx.loaded if isinstance(ctx.loaded, Loaded) else Loaded()
        quoted = "feedback" in ctx.step.message.refs.unknown_roots
        if loaded.feedback is None and not quoted:
            return ctx.step.message.render(ctx.templates)
        message = ctx.step.message.render({**ctx.templates, "feedback": loaded.feedback or []})
        if loaded.feedback and not quoted:  # appended by default
            message += "\n\n" + feedback_text(loaded.feedback)
        return message

    def goes_on(self, claimed: Claimed) -> bool:
        """A woken agent task polls the execution it waited on; without one it was held back before
        it began (a budget) and starts now."""
        return _execution_of(claimed) is not None

    async def run(self, ctx: StepContext) -> Outcome:
        model = ctx.step.model
        assert isinstance(model, AgentTask)
        if isinstance(ctx.budget, Verdict):
            held = await _budget_turn(ctx, ctx.budget)
            if held is not None:
                return held
        polled = _execution_of(ctx.claimed) if ctx.claimed.woken else None
        message: str = ctx.claimed.input["message"] if polled else ctx.rendered
        loaded = ctx.loaded if isinstance(ctx.loaded, Loaded) else Loaded()
        restore = model.context.restore if model.context is not None else None
        if restore is not None and loaded.context is None and polled is None:
            return ctx.outcome("failed", retryable=False, error_type="ContextMissing", input={"agent": model.agent},
                               error=f"context {restore!r} was not saved in this instance (the step that saves it "
                                     "did not complete); nothing was sent to the agent")
        request = AgentRequest(
            agent=model.agent, message=message, instance_id=ctx.claimed.instance_id, step_id=ctx.claimed.step_id,
            attempt=ctx.claimed.attempt, idempotency_key=_idempotency_key(ctx), execution_id=polled,
            model=model.model, feedback=tuple(loaded.feedback or ()), context=loaded.context,
        )
        given: dict[str, Any] = {"agent": model.agent, "message": message}
        backend_kind = ctx.agents.backend_kind(model.agent)
        metered = model.agent if ctx.agents.limits(model.agent).tokens_per_minute is not None else None

        def failed(error: str, error_type: str, retryable: bool = True, execution_over: bool = False) -> Outcome:
            # A retry sends the message afresh, unless a poll itself failed (unreachable, timed out) while
            # the execution may still run: then the retry polls the same execution again.
            return ctx.outcome("failed", error=error, error_type=error_type, retryable=retryable, input=given,
                               backend=backend_kind, execution=polled,
                               restart=polled is None or execution_over)

        try:
            backend = ctx.agents.get(model.agent)
            if model.timeout is not None:
                reply = await asyncio.wait_for(backend.call(request), timeout=model.timeout)
            else:
                reply = await backend.call(request)
        except AgentBusy as exc:
            return ctx.outcome("deferred", error=str(exc), retry_delay=exc.retry_after, input=given,
                               backend=backend_kind)
        except AgentStillRunning as exc:
            return ctx.outcome("waiting", input={**given, "execution_id": exc.execution_id},
                               wake_in=exc.poll_after, backend=backend_kind, execution=exc.execution_id)
        except StepFailure as exc:
            return failed(str(exc), type(exc).__name__, exc.retryable, not isinstance(exc, AgentUnreachable))
        except AgentConfigError as exc:  # the agents file is wrong: another attempt would fail the same way
            return failed(f"{exc} (fix the agents file and retry the step)", "AgentConfigError", False)
        except TimeoutError:
            return failed(f"agent {model.agent!r} did not answer within {model.timeout:g}s", "StepTimeout")
        except Exception as exc:  # an agent's own bug or a network error: retried per the policy
            return failed(f"agent {model.agent!r} raised {type(exc).__name__}: {exc}", type(exc).__name__)
        return ctx.outcome("completed", output=reply.output, cost_usd=float(reply.cost_usd),
                           tokens_in=int(reply.tokens_in), tokens_out=int(reply.tokens_out), input=given,
                           backend=backend_kind, execution=reply.execution_id or polled, session=reply.session_id,
                           events=_raised(ctx), metered=metered, context=reply.context)

    def record(self, conn: Connection, outcome: Outcome, event: EventSink) -> Parked | None:
        """A budget `ask`: the approval opened (or waited on again), the step parked on it."""
        parked = _approvals(conn.dialect.name).apply(conn, outcome, event)
        if parked is None:
            return None
        event("step.waiting", {"approval_id": parked.approval_id, "budget": True})
        return Parked(parked.claimable_now)

    def stop(self, conn: Connection, stopped: list[StoppedStep], reason: str, event: Callable[..., None]) -> None:
        """Pending budget approvals of cancelled steps become `cancelled`."""
        for approval_id, instance_id in _approvals(conn.dialect.name).cancel_for_steps(conn, [s.id for s in stopped]):
            event(instance_id, "approval.cancelled", {"approval_id": approval_id, "reason": reason})

    def describe_wait(self, outcome: Outcome) -> str | None:
        if outcome.execution:
            return f"the agent still works on it (execution {outcome.execution}); polling it"
        return None


async def _budget_turn(ctx: StepContext, verdict: Verdict) -> Outcome | None:
    """What the budgets make of this turn: None to go on and call the agent."""
    approval = verdict.approval
    if approval is not None and not verdict.raised and approval.status != "approved":
        state = {k: v for k, v in ctx.claimed.input.items() if k != "approval_id"}
        if approval.status == "pending":  # the first turn after it opened sends the notices
            events: list[tuple[str, dict[str, Any]]] = []
            if approval.notified_at is None:
                for notice in approval_notices(ctx.notifier, approval, reminder=False):
                    delivery = await ctx.notifier.send(notice)
                    events.append(("approval.notified", {"approval_id": approval.id, "channel": delivery.channel,
                                                         "ok": delivery.ok, "error": delivery.error}))
            return ctx.outcome("waiting", side=ParkApproval(approval.id, notified=True, state=state), events=events)
        who = f" by {approval.decided_by}" if approval.decided_by else ""
        said = f": {approval.comment}" if approval.comment else ""
        return ctx.outcome("failed", retryable=False, error_type=BUDGET_EXCEEDED, input=ctx.claimed.input,
                           error=f"the budget was not raised: approval {approval.id} was {approval.status}{who}{said}")
    exceeded = verdict.exceeded
    if exceeded is None:
        return None
    limit, facts = exceeded.limit, exceeded.facts()
    told = [("budget.exceeded", facts)]
    if limit.on_exceed == "pause":
        return ctx.outcome("waiting", input={"budget_held": facts}, events=told)
    if limit.on_exceed == "ask" and limit.approver is not None:
        title = f"Raise {limit.scope} of instance {ctx.claimed.instance_id} ({ctx.definition.name})?"
        instructions = (f"Step {ctx.claimed.step_id!r} cannot start: {exceeded.describe()}. Approving raises the "
                        f"budget by {limit.raised_by()} and lets the step run; rejecting fails it.")
        opening = OpenApproval([limit.approver], 1, "fail", None, title, instructions, [],
                               state={"budget": limit.step_id, "raise": limit.raises + 1})
        return ctx.outcome("waiting", side=opening, events=told)
    return ctx.outcome("failed", retryable=False, error_type=BUDGET_EXCEEDED, events=told,
                       error=f"{exceeded.describe()}; step not started")


def _raised(ctx: StepContext) -> list[tuple[str, dict[str, Any]]]:
    verdict = ctx.budget
    if isinstance(verdict, Verdict) and verdict.raised and verdict.approval is not None:
        step_id = ctx.claimed.input.get("budget")
        return [("budget.raised", {"approval_id": verdict.approval.id, "scope": scope_name(step_id),
                                   "step_id": step_id, "by": verdict.approval.decided_by})]
    return []


@functools.lru_cache(maxsize=4)
def _approvals(dialect_name: str) -> ApprovalStatements:
    return ApprovalStatements(dialect_name)


@functools.lru_cache(maxsize=4)
def _contexts(dialect_name: str) -> ContextStatements:
    return ContextStatements(dialect_name)


@functools.lru_cache(maxsize=4)
def _feedback(dialect_name: str) -> FeedbackStatements:
    return FeedbackStatements(dialect_name)


def _execution_of(claimed: Claimed) -> str | None:
    """The platform execution an earlier turn of this run left running (its row waited for it)."""
    state = claimed.input
    execution = state.get("execution_id") if isinstance(state, dict) else None
    return execution if isinstance(execution, str) else None


def _idempotency_key(ctx: StepContext) -> str:
    """The same for every attempt of one run of the step; each loop round is a run of its own."""
    key = f"{ctx.claimed.instance_id}:{ctx.claimed.step_id}"
    return key if ctx.claimed.round == 1 else f"{key}:{ctx.claimed.round}"
