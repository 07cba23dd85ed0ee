"""Whether a definition's agents exist and load: what validate, deploy and run say before a step runs.

A worker runs only the steps of agents its agents file defines (the others wait for a worker that has
them), so an agent no file defines is not fatal to deploy; but a user should hear of it at once. With
no agents file at all, the agents cannot be checked: a warning, or an error under --strict (and for
`flowdb run`, which works the instance itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowdb.agents.registry import AgentRegistry, find_agents_file
from flowdb.definitions import CompiledDefinition
from flowdb.errors import AgentConfigError, DefinitionError, Located
from flowdb.models import AgentTask


@dataclass
class AgentFindings:
    agents: AgentRegistry
    problems: list[Located] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def raise_problems(self) -> None:
        if self.problems:
            raise DefinitionError(self.problems)


def check_agents(definition: CompiledDefinition, agents_file: str | None, *, strict: bool = False) -> AgentFindings:
    """Check the agents the definition's agent tasks name against the agents file (found as the
    workers find it: --agents, FLOWDB_AGENTS, agents.yaml beside the definition): each must be
    defined there and load. A missing agents file is a warning unless `strict`."""
    first_use: dict[str, tuple[int, int]] = {}
    for step in definition.steps.values():
        if isinstance(step.model, AgentTask):
            first_use.setdefault(step.model.agent, step.position)
    path = find_agents_file(agents_file, definition.filename)
    if path is None:
        findings = AgentFindings(AgentRegistry.empty())
        if first_use:
            names = ", ".join(repr(name) for name in sorted(first_use))
            message = (f"no agents file found (give --agents FILE, set FLOWDB_AGENTS, or put agents.yaml beside "
                       f"{definition.filename}), so agents {names} are not checked; only workers whose agents "
                       "file defines them will run their steps")
            if strict:
                line, col = min(first_use.values())
                findings.problems.append(Located(definition.filename, line, col, message))
            else:
                findings.warnings.append(f"{definition.filename}: warning: {message}")
        return findings
    agents = AgentRegistry.from_file(path)
    findings = AgentFindings(agents)
    for step in definition.steps.values():
        if isinstance(step.model, AgentTask) and step.model.agent not in agents:
            line, col = step.position
            findings.problems.append(Located(
                definition.filename, line, col,
                f"step {step.id!r} uses agent {step.model.agent!r}, which {agents.source} does not define "
                f"(it defines: {', '.join(agents.names()) or 'none'})"))
    for name, (line, col) in sorted(first_use.items(), key=lambda used: used[1]):
        try:
            agents.check([name])
        except AgentConfigError as exc:
            findings.problems.append(Located(definition.filename, line, col, f"agent {name!r} cannot be loaded: {exc}"))
    return findings
