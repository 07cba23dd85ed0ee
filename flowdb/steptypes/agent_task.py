"""agent_task: render the message, call the named agent, record output, cost, tokens and which
backend, platform execution and session ran it.

An agent may answer that its queue is full (AgentBusy: the step goes back to ready for later, no
attempt spent) or that the work still runs as a platform execution (AgentStillRunning: the step
parks with the execution's id in its row and each later turn polls that execution, so a worker that
dies while polling hands over the poll, never a second send).
"""

from __future__ import annotations

import asyncio
from typing import Any

from flowdb.agents.types import AgentBusy, AgentRequest, AgentStillRunning
from flowdb.db.claims import Claimed
from flowdb.errors import AgentConfigError, StepFailure
from flowdb.models import AgentTask
from flowdb.outcomes import Outcome
from flowdb.steptypes.base import StepContext, StepType


class AgentTaskType(StepType):
    name = "agent_task"
    renders = True
    spends = True

    def render(self, ctx: StepContext) -> str:
        assert ctx.step.message is not None
        return ctx.step.message.render(ctx.templates)

    def goes_on(self, claimed: Claimed) -> bool:
        """A woken agent task polls the execution it waited on; without one it was held back before
        it began (a budget) and starts now."""
        return _execution_of(claimed) is not None

    async def run(self, ctx: StepContext) -> Outcome:
        model = ctx.step.model
        assert isinstance(model, AgentTask)
        polled = _execution_of(ctx.claimed) if ctx.claimed.woken else None
        message: str = ctx.claimed.input["message"] if polled else ctx.rendered
        request = AgentRequest(
            agent=model.agent, message=message, instance_id=ctx.claimed.instance_id, step_id=ctx.claimed.step_id,
            attempt=ctx.claimed.attempt, idempotency_key=_idempotency_key(ctx), execution_id=polled,
            model=model.model,
        )
        given: dict[str, Any] = {"agent": model.agent, "message": message}
        backend_kind = ctx.agents.backend_kind(model.agent)

        def failed(error: str, error_type: str, retryable: bool = True) -> Outcome:
            # A failed poll's retry sends the message afresh: that execution is over.
            return ctx.outcome("failed", error=error, error_type=error_type, retryable=retryable, input=given,
                               backend=backend_kind, execution=polled, restart=polled is not None)

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
            return failed(str(exc), type(exc).__name__, exc.retryable)
        except AgentConfigError as exc:  # the agents file is wrong: another attempt would fail the same way
            return failed(f"{exc} (fix the agents file and retry the step)", "AgentConfigError", False)
        except TimeoutError:
            return failed(f"agent {model.agent!r} did not answer within {model.timeout:g}s", "StepTimeout")
        except Exception as exc:  # an agent's own bug or a network error: retried per the policy
            return failed(f"agent {model.agent!r} raised {type(exc).__name__}: {exc}", type(exc).__name__)
        return ctx.outcome("completed", output=reply.output, cost_usd=float(reply.cost_usd),
                           tokens_in=int(reply.tokens_in), tokens_out=int(reply.tokens_out), input=given,
                           backend=backend_kind, execution=reply.execution_id or polled, session=reply.session_id)

    def describe_wait(self, outcome: Outcome) -> str | None:
        if outcome.execution:
            return f"the agent still works on it (execution {outcome.execution}); polling it"
        return None


def _execution_of(claimed: Claimed) -> str | None:
    """The platform execution an earlier turn of this run left running (its row waited for it)."""
    state = claimed.input
    execution = state.get("execution_id") if isinstance(state, dict) else None
    return execution if isinstance(execution, str) else None


def _idempotency_key(ctx: StepContext) -> str:
    """The same for every attempt of one run of the step; each loop round is a run of its own."""
    key = f"{ctx.claimed.instance_id}:{ctx.claimed.step_id}"
    return key if ctx.claimed.round == 1 else f"{key}:{ctx.claimed.round}"
