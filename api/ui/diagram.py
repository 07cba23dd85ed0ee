"""The process diagram's data: a definition's steps and edges, with each step's state in one instance.

`graph_of` gives what static/diagram.js draws (laid out by the vendored dagre) and what the instance
page's graph.json returns on each refresh, so the page and its live updates read one shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flowdb.definitions import CompiledDefinition
from flowdb.engine.status import OPEN_STEP, StepStatus
from flowdb.models import Gateway

NOT_STARTED = "not_started"  # no row yet: the step has not been reached in this instance (or there is none)
_OPEN = frozenset(s.value for s in OPEN_STEP)


ItemCounts = dict[tuple[str, int], dict[str, int]]  # (step id, round) -> item rows per status


def graph_of(definition: CompiledDefinition, steps: Sequence[Any] | None = None,
             item_counts: ItemCounts | None = None) -> dict[str, Any]:
    """`{"nodes": [...], "edges": [...]}`, JSON-ready, nodes in the definition's order.

    `steps`: the instance's `step_instances` rows (anything with their columns as attributes), or
    None for a definition alone. A node shows its highest round: the status of the step's own row
    (item IS NULL) of that round, and for a for_each step the counts of that round's item rows
    (`open`: pending, ready, running or waiting, so `running` is part of it; skipped and cancelled
    items are in `total` only). A large for_each has thousands of item rows: `item_counts` gives
    their counts per status instead (the page reads them with one GROUP BY), and item rows in
    `steps` are then not counted again.
    """
    latest: dict[str, Any] = {}  # step id -> own row of its highest round
    counts: ItemCounts = {key: dict(value) for key, value in (item_counts or {}).items()}
    for row in steps or ():
        if row.item is not None:
            if item_counts is None:
                per_status = counts.setdefault((row.step_id, row.round), {})
                per_status[row.status] = per_status.get(row.status, 0) + 1
        elif row.step_id not in latest or row.round > latest[row.step_id].round:
            latest[row.step_id] = row
    nodes = []
    for model in definition.process.steps:
        own = latest.get(model.id)
        nodes.append({
            "id": model.id,
            "label": model.name or model.id,
            "type": model.type,
            "status": own.status if own is not None else NOT_STARTED,
            "round": own.round if own is not None else 0,
            "for_each": model.for_each is not None,
            "items": _items(own, counts.get((model.id, own.round), {})) if own is not None
            and model.for_each is not None else None,
            "attempt": own.attempt if own is not None else 0,
            "max_attempts": own.max_attempts if own is not None else None,
        })
    return {"nodes": nodes, "edges": [
        {"from": e.from_step, "to": e.to_step, "kind": e.kind,
         "label": None if e.kind == "dependency" else _error_label(definition, e.from_step, e.to_step)
         if e.kind == "error" else _route_label(definition, e.from_step, e.to_step)}
        for e in definition.edges]}


def _items(own: Any, per_status: dict[str, int]) -> dict[str, int] | None:
    """Item counts of a for_each step's round; None before its list was expanded into items."""
    if not per_status and own.items_total is None:
        return None
    return {
        "total": own.items_total if own.items_total is not None else sum(per_status.values()),
        "completed": per_status.get(StepStatus.COMPLETED.value, 0),
        "failed": per_status.get(StepStatus.FAILED.value, 0),
        "running": per_status.get(StepStatus.RUNNING.value, 0),
        "open": sum(count for status, count in per_status.items() if status in _OPEN),
    }


def _error_label(definition: CompiledDefinition, source: str, target: str) -> str:
    """An error boundary's edge: the error types it takes ("any error" for a catch-all)."""
    types = [wanted for wanted, handler in definition.steps[source].error_routes if handler == target]
    return "any error" if None in types else "on " + ", ".join(str(t) for t in types)


def _route_label(definition: CompiledDefinition, source: str, target: str) -> str | None:
    """A gateway route's condition as written, "default" for its default route; None for a parallel
    gateway's routes (it takes them all)."""
    compiled = definition.steps.get(source)
    if compiled is None or not isinstance(compiled.model, Gateway):
        return None
    for route in compiled.model.routes:
        if route.next == target:
            if route.condition is not None:
                return str(route.condition)
            return "default" if route.default else None
    return None
