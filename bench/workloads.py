"""The benchmark's workloads as flowdb definitions (peers and the raw limit run `chain` only)."""

from __future__ import annotations

from collections.abc import Callable


def _step(sid: str, parents: list[str], agent: str, message: str | None = None) -> str:
    deps = f", depends_on: [{', '.join(parents)}]" if parents else ""
    return f'    - {{id: {sid}, type: agent_task, agent: {agent}, message: "{message or sid}"{deps}}}\n'


def chain(agent: str = "noop") -> str:
    """3 sequential steps."""
    steps = _step("a", [], agent) + _step("b", ["a"], agent) + _step("c", ["b"], agent)
    return "process:\n  name: bench-chain\n  steps:\n" + steps


def templated_chain(agent: str = "noop") -> str:
    """The chain, each message a template reading the step before (so each step is rendered)."""
    steps = (_step("a", [], agent, "start {{ process.instance_id }}")
             + _step("b", ["a"], agent, "go on from {{ steps.a.output }}")
             + _step("c", ["b"], agent, "finish {{ steps.b.output }}"))
    return "process:\n  name: bench-templated-chain\n  steps:\n" + steps


def fanout(agent: str = "noop") -> str:
    """1 step, then 10 in parallel, then a join."""
    middle = [f"p{i}" for i in range(10)]
    steps = _step("root", [], agent) + "".join(_step(m, ["root"], agent) for m in middle)
    return "process:\n  name: bench-fanout\n  steps:\n" + steps + _step("join", middle, agent)


def wide(agent: str = "noop") -> str:
    """1 step per instance."""
    return "process:\n  name: bench-wide\n  steps:\n" + _step("only", [], agent)


WORKLOADS: dict[str, Callable[[str], str]] = {"chain": chain, "fanout": fanout, "wide": wide,
                                               "templated-chain": templated_chain}
STEPS_PER_INSTANCE = {"chain": 3, "fanout": 12, "wide": 1, "templated-chain": 3}
