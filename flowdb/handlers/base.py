"""What a step handler gets and the registry that maps step types to handlers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from flowdb.agents.registry import AgentRegistry
from flowdb.db.claims import Claimed
from flowdb.definitions import CompiledDefinition, CompiledStep
from flowdb.outcomes import Outcome


@dataclass
class StepContext:
    claimed: Claimed
    definition: CompiledDefinition
    step: CompiledStep
    templates: dict[str, Any]  # inputs, process, steps (only what the step's templates read)
    agents: AgentRegistry
    now: datetime  # UTC, for handlers that compute wall-clock times (timers)

    def outcome(self, kind: Any, **fields: Any) -> Outcome:
        return Outcome(self.claimed, kind, **fields)


class StepHandler(Protocol):
    """One class per step type. Never runs inside a database transaction: the lease protects it."""

    type: str

    async def run(self, ctx: StepContext) -> Outcome: ...
