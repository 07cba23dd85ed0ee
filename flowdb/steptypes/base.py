"""What a step type is: one class per type, registered in steptypes/registry.py.

A step type owns its configuration model (in flowdb/models.py: the definition language) and static
checks, what it reads inside the claim's transaction (`load`), what it renders from templates
(`render`, off the event loop and outside any transaction, under the template limits), `run`
(outside any transaction: the lease protects it), the side rows it writes in the completion's
transaction (`record`) and what becomes of them when its step is stopped (`stop`). The claim,
settle and stop code never names a step type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import Connection

from flowdb.outcomes import Outcome

if TYPE_CHECKING:
    from flowdb.agents.registry import AgentRegistry
    from flowdb.db.claims import Claimed
    from flowdb.definitions import CompiledDefinition, CompiledStep
    from flowdb.notifications import Notifier

# A static problem of a step's configuration: (path under the step, message, whether it points at the
# value rather than the key).
Problem = tuple[tuple[str | int, ...], str, bool]
# Records an event about the step in the caller's transaction: (type, payload).
EventSink = Callable[[str, dict[str, Any]], None]


@dataclass
class StepContext:
    claimed: Claimed
    definition: CompiledDefinition
    step: CompiledStep
    templates: dict[str, Any]  # inputs, process, steps (only what the step's templates read)
    agents: AgentRegistry
    now: datetime  # UTC, for step types that compute wall-clock times (timers)
    notifier: Notifier = field(default_factory=lambda: _log_only())
    loaded: Any = None  # what the type's load() read in the claim's transaction
    rendered: Any = None  # what the type's render() made of its templates
    items: list[dict[str, Any]] | None = None  # a for_each step's items, when they woke its own row
    budget: Any = None  # for a step that spends: the budgets' verdict (db/budgets.py), read at the claim

    def outcome(self, kind: Any, **fields: Any) -> Outcome:
        return Outcome(self.claimed, kind, **fields)


@dataclass(frozen=True)
class Parked:
    """A side-row change that also parked the step (it waits): whether its next turn is due at once."""

    claimable_now: bool


@dataclass(frozen=True)
class StoppedStep:
    """A step row that was open and is now cancelled (its instance stopped, or the step itself)."""

    id: int
    instance_id: int
    step_id: str
    type: str
    item: int | None = None  # a for_each item's index (None: a step's own row)
    round: int = 1


def _log_only() -> Notifier:
    from flowdb.notifications import Notifier

    return Notifier.log_only()


class StepType:
    """The defaults: a step type with no templates, no side rows and nothing to load."""

    name: ClassVar[str]
    renders: ClassVar[bool] = False  # it has a render() that evaluates templates
    loads: ClassVar[bool] = False  # it has a load() that reads rows in the claim's transaction
    spends: ClassVar[bool] = False  # it may cost money: the instance's budget is checked before it starts

    def check(self, model: Any) -> list[Problem]:
        """Static checks beyond its model's (run by `flowdb validate` and every deploy)."""
        return []

    def load(self, conn: Connection, claimed: Claimed, step: CompiledStep) -> Any:
        return None

    def render(self, ctx: StepContext) -> Any:
        return None

    def goes_on(self, claimed: Claimed) -> bool:
        """Whether a woken row's turn goes on from where it waited (renders nothing), rather than
        starting its work now (a step held back before it began: by a budget, say)."""
        return True

    async def run(self, ctx: StepContext) -> Outcome:
        raise NotImplementedError

    def record(self, conn: Connection, outcome: Outcome, event: EventSink) -> Parked | None:
        """Write the outcome's side rows (outcome.side) in the completion's transaction. A Parked
        answer means the step now waits (this wrote its row); None that the outcome is recorded as it stands."""
        return None

    def stop(self, conn: Connection, stopped: list[StoppedStep], reason: str, event: Callable[..., None]) -> None:
        """Close the side rows of steps of this type that were just cancelled; `event(instance_id,
        type, payload)` records what it did."""

    def describe_wait(self, outcome: Outcome) -> str | None:
        """A line for the live view about what a waiting step waits for (or None)."""
        return None

    def describe_done(self, outcome: Outcome) -> str | None:
        """A line for the live view about what a completed step did (or None)."""
        return None
