"""The agents file: `agents: {NAME: {python: "module:function"}}` or `{NAME: {http: {url: ...}}}` → a
backend per agent name (flowdb/agents/python.py, flowdb/agents/http.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flowdb.agents.http import HttpBackend
from flowdb.agents.python import PythonBackend
from flowdb.agents.types import AgentBackend
from flowdb.errors import AgentConfigError, DefinitionError, Located, StepFailure
from flowdb.yamlsafe import load_yaml

# Backend kinds by the key that selects them in the agents file. HTTP and MCP add one class each.
BACKENDS: dict[str, type[Any]] = {"python": PythonBackend, "http": HttpBackend}
MAX_AGENT_NAME = 100  # as step_instances.agent and worker_serves.name hold it


class AgentRegistry:
    def __init__(self, backends: dict[str, AgentBackend], source: str | None = None) -> None:
        self._backends = backends
        self.source = source

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
        problems = []
        for name, spec in data["agents"].items():
            where = ("agents", name)
            if not isinstance(name, str) or not name or len(name) > MAX_AGENT_NAME:
                problems.append(at(where, f"agent name {name!r} must be text of 1 to {MAX_AGENT_NAME} characters"))
                continue
            kinds = [k for k in spec if k in BACKENDS] if isinstance(spec, dict) else []
            if not isinstance(spec, dict) or len(kinds) != 1 or len(spec) != 1:
                problems.append(at(where, f"agent {name!r} needs exactly one backend key, one of: "
                                   f"{', '.join(BACKENDS)} (e.g. python: \"package.module:function\")"))
                continue
            kind = kinds[0]
            try:
                backends[name] = BACKENDS[kind](name, spec[kind])
            except AgentConfigError as exc:
                problems.append(at((*where, kind), str(exc)))
        if problems:
            raise DefinitionError(problems)
        # Agents files name modules that sit beside them (the examples do): make them importable.
        folder = str(file.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        return cls(backends, str(path))

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
