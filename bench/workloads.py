"""The benchmark's workloads as flowdb definitions (peers and the raw limit run `chain` only)."""

from __future__ import annotations

from collections.abc import Callable


def _step(sid: str, parents: list[str], agent: str) -> str:
    deps = f", depends_on: [{', '.join(parents)}]" if parents else ""
    return f'    - {{id: {sid}, type: agent_task, agent: {agent}, message: "{sid}"{deps}}}\n'


def chain(agent: str = "noop") -> str:
    """3 sequential steps."""
    steps = _step("a", [], agent) + _step("b", ["a"], agent) + _step("c", ["b"], agent)
    return "process:\n  name: bench-chain\n  steps:\n" + steps


def fanout(agent: str = "noop") -> str:
    """1 step, then 10 in parallel, then a join."""
    middle = [f"p{i}" for i in range(10)]
    steps = _step("root", [], agent) + "".join(_step(m, ["root"], agent) for m in middle)
    return "process:\n  name: bench-fanout\n  steps:\n" + steps + _step("join", middle, agent)


def wide(agent: str = "noop") -> str:
    """1 step per instance."""
    return "process:\n  name: bench-wide\n  steps:\n" + _step("only", [], agent)


WORKLOADS: dict[str, Callable[[str], str]] = {"chain": chain, "fanout": fanout, "wide": wide}
STEPS_PER_INSTANCE = {"chain": 3, "fanout": 12, "wide": 1}
