"""The agents file: `agents: {NAME: {python: "module:function"}}`, `{NAME: {http: {url: ...}}}` or
`{NAME: {mcp: {url: ..., agent_name: ...}}}` → a backend per agent name (flowdb/agents/python.py,
http.py, mcp.py), with the agent's limits beside it: `concurrency: N` (steps of the agent running at
once, across every worker; an MCP agent in sequential mode runs one) and `tokens_per_minute: N`."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowdb.agents.http import HttpBackend
from flowdb.agents.mcp import McpBackend
from flowdb.agents.python import PythonBackend
from flowdb.agents.types import AgentBackend
from flowdb.errors import AgentConfigError, DefinitionError, Located, StepFailure
from flowdb.yamlsafe import load_yaml

# Backend kinds by the key that selects them in the agents file.
BACKENDS: dict[str, type[Any]] = {"python": PythonBackend, "http": HttpBackend, "mcp": McpBackend}
LIMITS = ("concurrency", "tokens_per_minute")  # keys that stand beside the backend's
MAX_AGENT_NAME = 100  # as step_instances.agent and worker_serves.name hold it


@dataclass(frozen=True)
class AgentLimits:
    """How much of an agent the workers may use together (enforced by the claim: db/claims.py)."""

    concurrency: int | None = None  # steps of this agent running at once (None: no limit)
    tokens_per_minute: int | None = None  # tokens (in + out) its steps may report per minute


def _limits(name: str, spec: dict[str, Any], backend: Any) -> AgentLimits:
    values: dict[str, int | None] = {}
    for key in LIMITS:
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise AgentConfigError(f"agent {name!r}: {key} must be a whole number of 1 or more, not {value!r}")
        values[key] = value
    if getattr(backend, "sequential", False):  # the agent's own chat session runs one call at a time
        if values["concurrency"] not in (None, 1):
            raise AgentConfigError(f"agent {name!r}: mode sequential runs one call at a time, so concurrency "
                                   f"{values['concurrency']} cannot hold; use mode: parallel or concurrency: 1")
        values["concurrency"] = 1
    return AgentLimits(**values)


class AgentRegistry:
    def __init__(self, backends: dict[str, AgentBackend], source: str | None = None,
                 limits: dict[str, AgentLimits] | None = None) -> None:
        self._backends = backends
        self.source = source
        self._limits = limits or {}

    @classmethod
    def empty(cls) -> AgentRegistry:
        return cls({}, None)

    @classmethod
    def from_file(cls, path: str | Path) -> AgentRegistry:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise AgentConfigError(f"cannot read agents file {path}: {exc.strerror or exc}") from None
        data, positions = load_yaml(text, str(path))

        def at(where: tuple[Any, ...], message: str) -> Located:
            line, col = positions.get(where, (1, 1))
            return Located(str(path), line, col, message)

        if not isinstance(data, dict) or set(data) != {"agents"} or not isinstance(data["agents"], dict):
            raise DefinitionError([at((), "expected one top-level key 'agents:' mapping agent names to backends")])
        backends: dict[str, AgentBackend] = {}
        limits: dict[str, AgentLimits] = {}
        problems = []
        for name, spec in data["agents"].items():
            where = ("agents", name)
            if not isinstance(name, str) or not name or len(name) > MAX_AGENT_NAME:
                problems.append(at(where, f"agent name {name!r} must be text of 1 to {MAX_AGENT_NAME} characters"))
                continue
            kinds = [k for k in spec if k in BACKENDS] if isinstance(spec, dict) else []
            others = sorted(set(spec) - set(BACKENDS) - set(LIMITS)) if isinstance(spec, dict) else []
            if not isinstance(spec, dict) or len(kinds) != 1 or others:
                problems.append(at(where, f"agent {name!r} needs exactly one backend key, one of: "
                                   f"{', '.join(BACKENDS)} (e.g. python: \"package.module:function\"), and may "
                                   f"have {' and '.join(LIMITS)}" + (f"; unknown: {', '.join(map(str, others))}"
                                                                     if others else "")))
                continue
            kind = kinds[0]
            try:
                backends[name] = BACKENDS[kind](name, spec[kind])
            except AgentConfigError as exc:
                problems.append(at((*where, kind), str(exc)))
                continue
            try:
                limits[name] = _limits(name, spec, backends[name])
            except AgentConfigError as exc:
                problems.append(at(where, str(exc)))
        if problems:
            raise DefinitionError(problems)
        # Agents files name modules that sit beside them (the examples do): make them importable.
        folder = str(file.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        return cls(backends, str(path), limits)

    def check(self, names: Iterable[str] | None = None) -> None:
        """Load every agent's backend (or those named); raise AgentConfigError naming each one that
        cannot be loaded."""
        problems = []
        for name in sorted(self._backends if names is None else set(names) & set(self._backends)):
            try:
                self._backends[name].check()
            except AgentConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise AgentConfigError(f"{self.source}: " + "; ".join(problems))

    def limits(self, name: str) -> AgentLimits:
        return self._limits.get(name, AgentLimits())

    def backend_kind(self, name: str) -> str | None:
        """python, http or mcp (recorded on the step rows an agent ran)."""
        backend = self._backends.get(name)
        return getattr(backend, "key", None) if backend is not None else None

    def names(self) -> list[str]:
        return sorted(self._backends)

    def __contains__(self, name: str) -> bool:
        return name in self._backends

    def get(self, name: str) -> AgentBackend:
        backend = self._backends.get(name)
        if backend is None:
            where = (f"in {self.source}" if self.source
                     else "(no agents file was given: use --agents FILE or FLOWDB_AGENTS)")
            known = f"; known agents: {', '.join(self.names())}" if self._backends else ""
            raise StepFailure(f"unknown agent {name!r} {where}{known}", retryable=False)
        return backend


def find_agents_file(explicit: str | None, process_file: str | None = None) -> Path | None:
    """--agents FILE, else FLOWDB_AGENTS, else agents.yaml beside the process file (or here)."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get("FLOWDB_AGENTS")
    if from_env:
        return Path(from_env)
    folder = Path(process_file).parent if process_file else Path.cwd()
    candidate = folder / "agents.yaml"
    return candidate if candidate.exists() else None
