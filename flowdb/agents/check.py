"""Whether a definition's agents exist and load: what validate, deploy and run say before a step runs.

A worker runs only the steps of agents its agents file defines (the others wait for a worker that has
them), so the agents file found beside a definition need not define every agent of a fleet: an agent
it does not define, or no agents file at all, is a warning, and an error with --strict (and for
`flowdb run`, which works the instance itself). An agent the file defines but that cannot be loaded is
always an error.
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
    workers find it: --agents, FLOWDB_AGENTS, agents.yaml beside the definition): each should be
    defined there (a warning, or a problem if `strict`) and must load."""
    first_use: dict[str, tuple[int, int]] = {}
    for step in definition.steps.values():
        if isinstance(step.model, AgentTask):
            first_use.setdefault(step.model.agent, step.position)
        for subscriber in step.model.subscribers:
            first_use.setdefault(subscriber, step.position)
    path = find_agents_file(agents_file, definition.filename)
    findings = AgentFindings(AgentRegistry.from_file(path) if path is not None else AgentRegistry.empty())

    def report(position: tuple[int, int], message: str, consequence: str) -> None:
        if strict:
            findings.problems.append(Located(definition.filename, *position, message))
        else:
            findings.warnings.append(f"{definition.filename}:{position[0]}:{position[1]}: warning: {message}; "
                                     f"{consequence}")

    later = "only workers whose agents file defines it will run its steps"
    if path is None:
        if first_use:
            names = ", ".join(repr(name) for name in sorted(first_use))
            report(min(first_use.values()),
                   f"no agents file found (give --agents FILE, set FLOWDB_AGENTS, or put agents.yaml beside "
                   f"{definition.filename}), so {'agent' if len(first_use) == 1 else 'agents'} {names} "
                   f"{'is' if len(first_use) == 1 else 'are'} not checked",
                   later.replace("defines it", "defines them").replace("its steps", "their steps")
                   if len(first_use) > 1 else later)
        return findings
    agents = findings.agents
    for step in definition.steps.values():
        if isinstance(step.model, AgentTask) and step.model.agent not in agents:
            report(step.position, f"step {step.id!r} uses agent {step.model.agent!r}, which {agents.source} does "
                   f"not define (it defines: {', '.join(agents.names()) or 'none'})", later)
        for subscriber in step.model.subscribers:
            if subscriber not in agents:
                report(step.position, f"step {step.id!r} has subscriber {subscriber!r}, which {agents.source} does "
                       f"not define (it defines: {', '.join(agents.names()) or 'none'})",
                       "only workers whose agents file defines it will deliver its notices")
    for name, (line, col) in sorted(first_use.items(), key=lambda used: used[1]):
        try:
            agents.check([name])
        except AgentConfigError as exc:
            findings.problems.append(Located(definition.filename, line, col, f"agent {name!r} cannot be loaded: {exc}"))
    return findings
