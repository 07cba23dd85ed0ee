"""Step handlers by step type. A new step type is one handler class added here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection

from flowdb.db.claims import Claimed
from flowdb.definitions import CompiledDefinition
from flowdb.errors import DefinitionError, Located
from flowdb.handlers.agent_task import AgentTaskHandler
from flowdb.handlers.base import LoadingHandler, RenderingHandler, StepContext, StepHandler
from flowdb.handlers.gateway import GatewayHandler
from flowdb.handlers.human_approval import HumanApprovalHandler
from flowdb.handlers.notification import NotificationHandler
from flowdb.handlers.timer import TimerHandler

HANDLERS: dict[str, StepHandler] = {
    handler.type: handler for handler in (AgentTaskHandler(), GatewayHandler(), TimerHandler(), HumanApprovalHandler(),
                                      NotificationHandler())
}
# Step types whose handler reads rows of its own in the claim's transaction (an approval...).
LOADERS: dict[str, Callable[[Connection, Claimed], Any]] = {
    kind: handler.load for kind, handler in HANDLERS.items() if isinstance(handler, LoadingHandler)
}

# Step types whose handler renders templates (run by the worker off the event loop, under limits).
RENDERERS: dict[str, Callable[[StepContext], Any]] = {
    kind: handler.render for kind, handler in HANDLERS.items() if isinstance(handler, RenderingHandler)
}


def check_runnable(definition: CompiledDefinition) -> None:
    """Refuse a definition with a step type this flowdb cannot run yet (before anything is written)."""
    problems = [
        Located(definition.filename, *step.position,
                f"step {sid!r} has type {step.type!r}, which this version of flowdb cannot run yet "
                f"(it runs: {', '.join(sorted(HANDLERS))})")
        for sid, step in definition.steps.items() if step.type not in HANDLERS
    ]
    if problems:
        raise DefinitionError(problems)


__all__ = ["HANDLERS", "LOADERS", "RENDERERS", "StepContext", "StepHandler", "check_runnable"]
