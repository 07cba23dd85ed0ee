"""Agents: names in definitions resolved through an agents file to backends (one class each)."""

from flowdb.agents.registry import AgentRegistry, find_agents_file
from flowdb.agents.types import AgentReply, AgentRequest

__all__ = ["AgentRegistry", "AgentReply", "AgentRequest", "find_agents_file"]
