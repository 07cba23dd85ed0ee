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


@dataclass(frozen=True)
class AgentReply:
    output: Any
    cost_usd: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0


class AgentBackend(Protocol):
    """One way of reaching agents (Python callable, HTTP, MCP...)."""

    def check(self) -> None:
        """Raise AgentConfigError if the agent cannot be reached as configured (a worker checks every
        agent when it starts, so a broken agents file stops it instead of failing steps)."""

    async def call(self, request: AgentRequest) -> AgentReply: ...


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
