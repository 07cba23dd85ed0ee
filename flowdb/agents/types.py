"""The request an agent receives and the reply it may return."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class AgentRequest:
    agent: str
    message: str
    instance_id: int
    step_id: str
    attempt: int
    # The same for every attempt of one step: pass it to anything with side effects.
    idempotency_key: str
    # A platform execution started by an earlier turn of this step, still running: poll it, never re-send.
    execution_id: str | None = None
    model: str | None = None  # the step's `model:` override, for backends that take one
    # What the message carries besides the rendered text: reviewers' feedback on an earlier run
    # of the step, and a context saved by an earlier step (`context: {restore: NAME}`).
    feedback: tuple[dict[str, Any], ...] = ()
    context: dict[str, Any] | None = None


@dataclass(frozen=True)
class AgentReply:
    output: Any
    cost_usd: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    # Which platform execution and session ran it (recorded on the step row: agent state binding).
    execution_id: str | None = None
    session_id: str | None = None
    # What the agent's context holds after the call, for `context: {save: NAME}` (its session id, a blob).
    context: dict[str, Any] | None = None


class AgentBusy(Exception):
    """The agent's queue is full and nothing ran: try again after `retry_after` seconds, without an
    attempt spent (the step goes back to ready, holding no worker slot)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AgentStillRunning(Exception):
    """The agent still works on the call as platform execution `execution_id`: the step waits and polls
    that execution (a durable wait: whichever worker takes the step next polls it, never re-sends)."""

    def __init__(self, message: str, execution_id: str, poll_after: float) -> None:
        super().__init__(message)
        self.execution_id = execution_id
        self.poll_after = poll_after


class AgentBackend(Protocol):
    """One way of reaching agents (Python callable, HTTP, MCP...)."""

    def check(self) -> None:
        """Raise AgentConfigError if the agent cannot be reached as configured (a worker checks every
        agent when it starts, so a broken agents file stops it instead of failing steps)."""

    async def call(self, request: AgentRequest) -> AgentReply:
        """Run the request (or, with request.execution_id, poll that execution). Raise StepFailure
        (retryable or not), AgentBusy or AgentStillRunning for the answers that are not a reply."""
        ...


def as_reply(value: Any, agent: str) -> AgentReply:
    """What an agent returned, as a reply: an AgentReply, or a string / JSON-able value as output."""
    import orjson

    if isinstance(value, AgentReply):
        reply = value
    else:
        reply = AgentReply(output=value)
    try:
        orjson.dumps(reply.output, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, ValueError) as exc:
        from flowdb.errors import StepFailure

        raise StepFailure(f"agent {agent!r} returned output that is not JSON-able: {exc}", retryable=False) from None
    return reply
