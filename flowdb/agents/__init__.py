"""Agents: names in definitions resolved through an agents file to backends (one class each)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowdb.agents.types import AgentReply, AgentRequest

if TYPE_CHECKING:
    from flowdb.agents.registry import AgentRegistry, find_agents_file

__all__ = ["AgentRegistry", "AgentReply", "AgentRequest", "find_agents_file"]


def __getattr__(name: str) -> Any:
    # The registry (YAML, every backend) loads on first use: `import flowdb` (every command, every
    # flowdb.x import) reaches this package for flowdb.agents.types alone.
    if name in ("AgentRegistry", "find_agents_file"):
        from flowdb.agents import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
