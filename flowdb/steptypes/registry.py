"""The one registry of step types. A new step type is one module and a line here."""

from __future__ import annotations

from collections.abc import Iterator

from flowdb.errors import DefinitionError, Located
from flowdb.steptypes.agent_task import AgentTaskType
from flowdb.steptypes.base import StepType
from flowdb.steptypes.end import EndType
from flowdb.steptypes.gateway import GatewayType
from flowdb.steptypes.human_approval import HumanApprovalType
from flowdb.steptypes.notification import NotificationType
from flowdb.steptypes.timer import TimerType


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

    def check_runnable(self, definition: object) -> None:
        """Refuse a definition with a step type this flowdb cannot run yet (before anything is written)."""
        from flowdb.definitions import CompiledDefinition

        assert isinstance(definition, CompiledDefinition)
        problems = [
            Located(definition.filename, *step.position,
                    f"step {sid!r} has type {step.type!r}, which this version of flowdb cannot run yet "
                    f"(it runs: {', '.join(self.names())})")
            for sid, step in definition.steps.items() if step.type not in self
        ]
        if problems:
            raise DefinitionError(problems)


STEP_TYPES = Registry(AgentTaskType(), GatewayType(), TimerType(), HumanApprovalType(), NotificationType(),
                      EndType())
