"""The one registry of step types. A new step type is one module and a line here."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from flowdb.errors import Located
from flowdb.steptypes.agent_task import AgentTaskType
from flowdb.steptypes.base import StepType
from flowdb.steptypes.end import EndType
from flowdb.steptypes.gateway import GatewayType
from flowdb.steptypes.human_approval import HumanApprovalType
from flowdb.steptypes.notification import NotificationType
from flowdb.steptypes.timer import TimerType

if TYPE_CHECKING:
    from flowdb.definitions import CompiledStep


class Registry:
    def __init__(self, *types: StepType) -> None:
        self._by_name = {t.name: t for t in types}

    def __getitem__(self, name: str) -> StepType:
        return self._by_name[name]

    def get(self, name: str) -> StepType | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[StepType]:
        return iter(self._by_name.values())

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def unrunnable(self, filename: str, steps: Iterable[CompiledStep]) -> list[Located]:
        """A problem for each compiled step of a type this flowdb cannot run yet."""
        return [Located(filename, *step.position, f"step {step.id!r} has type {step.type!r}, which this version "
                        f"of flowdb cannot run yet (it runs: {', '.join(self.names())})")
                for step in steps if step.type not in self]


STEP_TYPES = Registry(AgentTaskType(), GatewayType(), TimerType(), HumanApprovalType(), NotificationType(),
                      EndType())
