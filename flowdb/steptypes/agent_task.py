"""agent_task: render the message, call the named agent, record output, cost and tokens."""

from __future__ import annotations

import asyncio

from flowdb.agents.types import AgentRequest
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

    async def run(self, ctx: StepContext) -> Outcome:
        model = ctx.step.model
        assert isinstance(model, AgentTask)
        message: str = ctx.rendered
        request = AgentRequest(
            agent=model.agent, message=message, instance_id=ctx.claimed.instance_id, step_id=ctx.claimed.step_id,
            attempt=ctx.claimed.attempt, idempotency_key=_idempotency_key(ctx),
        )
        given = {"agent": model.agent, "message": message}
        try:
            backend = ctx.agents.get(model.agent)
            if model.timeout is not None:
                reply = await asyncio.wait_for(backend.call(request), timeout=model.timeout)
            else:
                reply = await backend.call(request)
        except StepFailure as exc:
            return ctx.outcome("failed", error=str(exc), error_type=type(exc).__name__, retryable=exc.retryable,
                               input=given)
        except AgentConfigError as exc:  # the agents file is wrong: another attempt would fail the same way
            return ctx.outcome("failed", error=f"{exc} (fix the agents file and retry the step)",
                               error_type="AgentConfigError", retryable=False, input=given)
        except TimeoutError:
            return ctx.outcome("failed", error=f"agent {model.agent!r} did not answer within {model.timeout:g}s",
                               error_type="StepTimeout", input=given)
        except Exception as exc:  # an agent's own bug or a network error: retried per the policy
            return ctx.outcome("failed", error=f"agent {model.agent!r} raised {type(exc).__name__}: {exc}",
                               error_type=type(exc).__name__, input=given)
        return ctx.outcome("completed", output=reply.output, cost_usd=float(reply.cost_usd),
                           tokens_in=int(reply.tokens_in), tokens_out=int(reply.tokens_out), input=given)


def _idempotency_key(ctx: StepContext) -> str:
    """The same for every attempt of one run of the step; each loop round is a run of its own."""
    key = f"{ctx.claimed.instance_id}:{ctx.claimed.step_id}"
    return key if ctx.claimed.round == 1 else f"{key}:{ctx.claimed.round}"
