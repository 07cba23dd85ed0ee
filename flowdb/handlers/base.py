"""What a step handler gets and the registry that maps step types to handlers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import Connection

from flowdb.agents.registry import AgentRegistry
from flowdb.db.claims import Claimed
from flowdb.definitions import CompiledDefinition, CompiledStep
from flowdb.notifications import Notifier
from flowdb.outcomes import Outcome


@dataclass
class StepContext:
    claimed: Claimed
    definition: CompiledDefinition
    step: CompiledStep
    templates: dict[str, Any]  # inputs, process, steps (only what the step's templates read)
    agents: AgentRegistry
    now: datetime  # UTC, for handlers that compute wall-clock times (timers)
    notifier: Notifier = field(default_factory=Notifier.log_only)
    loaded: Any = None  # what the handler's load() read in the claim's transaction, if it has one
    rendered: Any = None  # what the handler's render() made of its templates, if it has one

    def outcome(self, kind: Any, **fields: Any) -> Outcome:
        return Outcome(self.claimed, kind, **fields)


class StepHandler(Protocol):
    """One class per step type. Never runs inside a database transaction: the lease protects it."""

    type: str

    async def run(self, ctx: StepContext) -> Outcome: ...


@runtime_checkable
class RenderingHandler(StepHandler, Protocol):
    """A handler whose step has templates (a message, conditions...). The worker calls render() off
    the event loop, outside any transaction, under the template time and size limits, and gives its
    value to run() as ctx.rendered. It may raise TemplateError (the step fails without retry)."""

    def render(self, ctx: StepContext) -> Any: ...


@runtime_checkable
class LoadingHandler(StepHandler, Protocol):
    """A handler that reads rows of its own (an approval...) in the claim's transaction."""

    def load(self, conn: Connection, claimed: Claimed) -> Any: ...
