"""The process diagram's data (api/ui/diagram.py: graph_of) on compiled definitions, with step rows made
by hand (no database); and the vendored layout library is the file its README pins."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flowdb.definitions import parse_definition
from flowdb_api.ui.diagram import graph_of

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "api" / "ui" / "static"
VENDOR = STATIC / "vendor"

CHAIN = """
process:
  name: chain
  steps:
    - {id: fetch, name: Fetch the data, type: agent_task, agent: a, message: m}
    - {id: write, type: agent_task, agent: a, message: m, depends_on: [fetch]}
    - {id: tell, type: notification, channel: log, message: done, depends_on: [write]}
"""

GATEWAYS = """
process:
  name: gateways
  inputs: {size: {type: integer, default: 1}}
  steps:
    - {id: start, type: agent_task, agent: a, message: m}
    - id: pick
      type: gateway
      gateway_type: exclusive
      depends_on: [start]
      routes:
        - {condition: "{{ inputs.size }} > 10", next: big}
        - {default: true, next: small}
    - {id: big, type: agent_task, agent: a, message: m}
    - {id: small, type: agent_task, agent: a, message: m}
    - id: both
      type: gateway
      gateway_type: parallel
      depends_on: [big, small]
      join: any
      routes:
        - {next: left}
        - {next: right}
    - {id: left, type: agent_task, agent: a, message: m}
    - {id: right, type: agent_task, agent: a, message: m}
"""

LOOP = """
process:
  name: loop
  steps:
    - {id: draft, type: agent_task, agent: a, message: m}
    - id: again
      type: gateway
      gateway_type: exclusive
      depends_on: [draft]
      routes:
        - {condition: "{{ steps.draft.visit }} < 3", next: draft}
        - {default: true, next: done}
    - {id: done, type: agent_task, agent: a, message: m}
"""

FOR_EACH = """
process:
  name: fan-out
  steps:
    - {id: list, type: agent_task, agent: a, message: m}
    - id: each
      type: agent_task
      agent: a
      message: "{{ item }}"
      depends_on: [list]
      for_each: [a, b, c, d, e, f]
    - {id: after, type: agent_task, agent: a, message: m, depends_on: [each]}
"""


def row(step_id: str, status: str, round_: int = 1, item: int | None = None, items_total: int | None = None,
        attempt: int = 1, max_attempts: int = 3) -> SimpleNamespace:
    """A step_instances row as graph_of reads it (by attribute, as SQLAlchemy rows give them)."""
    return SimpleNamespace(step_id=step_id, type="agent_task", status=status, round=round_, item=item,
                           items_total=items_total, items_left=None, attempt=attempt, max_attempts=max_attempts)


def nodes(graph: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {node["id"]: node for node in graph["nodes"]}


def edges(graph: dict[str, Any]) -> set[tuple[str, str, str, str | None]]:
    return {(e["from"], e["to"], e["kind"], e["label"]) for e in graph["edges"]}


def test_a_chain_is_its_steps_in_order_joined_by_dependencies() -> None:
    graph = graph_of(parse_definition(CHAIN))
    assert [n["id"] for n in graph["nodes"]] == ["fetch", "write", "tell"]
    assert graph["nodes"][0] == {"id": "fetch", "label": "Fetch the data", "type": "agent_task",
                                 "status": "not_started", "round": 0, "for_each": False, "items": None,
                                 "attempt": 0, "max_attempts": None}
    assert nodes(graph)["write"]["label"] == "write"  # no name: the id
    assert nodes(graph)["tell"]["type"] == "notification"
    assert edges(graph) == {("fetch", "write", "dependency", None), ("write", "tell", "dependency", None)}
    assert json.loads(json.dumps(graph)) == graph  # JSON-ready as it is


def test_each_step_shows_its_own_row_and_a_step_without_one_has_not_started() -> None:
    graph = graph_of(parse_definition(CHAIN), [row("fetch", "completed"), row("write", "running", attempt=2)])
    shown = nodes(graph)
    assert (shown["fetch"]["status"], shown["fetch"]["round"], shown["fetch"]["attempt"]) == ("completed", 1, 1)
    assert (shown["write"]["status"], shown["write"]["attempt"], shown["write"]["max_attempts"]) == ("running", 2, 3)
    assert (shown["tell"]["status"], shown["tell"]["round"], shown["tell"]["attempt"]) == ("not_started", 0, 0)
    assert graph_of(parse_definition(CHAIN), [])["nodes"] == graph_of(parse_definition(CHAIN))["nodes"]


def test_gateway_routes_are_labelled_with_their_condition_or_default() -> None:
    graph = graph_of(parse_definition(GATEWAYS))
    assert edges(graph) == {
        ("start", "pick", "dependency", None),
        ("pick", "big", "route", "{{ inputs.size }} > 10"),
        ("pick", "small", "route", "default"),
        ("big", "both", "dependency", None),
        ("small", "both", "dependency", None),
        ("both", "left", "route", None),  # a parallel gateway takes every route: no condition to show
        ("both", "right", "route", None),
    }
    assert nodes(graph)["pick"]["type"] == "gateway"


def test_a_route_back_to_an_ancestor_is_a_loop_edge_with_its_condition() -> None:
    graph = graph_of(parse_definition(LOOP))
    assert edges(graph) == {
        ("draft", "again", "dependency", None),
        ("again", "draft", "loop", "{{ steps.draft.visit }} < 3"),
        ("again", "done", "route", "default"),
    }


def test_the_highest_round_wins_whatever_the_order_of_the_rows() -> None:
    rows = [row("draft", "running", round_=3, attempt=1), row("draft", "completed", round_=1),
            row("again", "completed", round_=2), row("draft", "completed", round_=2), row("again", "completed")]
    shown = nodes(graph_of(parse_definition(LOOP), rows))
    assert (shown["draft"]["status"], shown["draft"]["round"]) == ("running", 3)
    assert (shown["again"]["status"], shown["again"]["round"]) == ("completed", 2)
    assert shown["done"]["status"] == "not_started"


def test_a_for_each_step_counts_the_items_of_its_round() -> None:
    items = ["completed", "completed", "failed", "running", "waiting", "pending"]
    rows = [row("list", "completed"), row("each", "waiting", items_total=6),
            *(row("each", status, item=i) for i, status in enumerate(items))]
    shown = nodes(graph_of(parse_definition(FOR_EACH), rows))
    assert shown["each"]["status"] == "waiting"  # its own row's, not an item's
    assert shown["each"]["for_each"] is True
    assert shown["each"]["items"] == {"total": 6, "completed": 2, "failed": 1, "running": 1, "open": 3}
    assert shown["list"]["items"] is None and shown["list"]["for_each"] is False
    assert shown["after"]["items"] is None


def test_counts_given_per_status_stand_for_the_item_rows() -> None:
    """The instance page reads a big for_each's items as counts (one GROUP BY), not as 10,000 rows."""
    own = [row("list", "completed"), row("each", "waiting", items_total=10_000)]
    counts = {("each", 1): {"completed": 9_000, "failed": 10, "running": 40, "pending": 950}}
    shown = nodes(graph_of(parse_definition(FOR_EACH), [*own, row("each", "completed", item=0)], counts))
    # the item row beside the counts is one of them, not one more
    assert shown["each"]["items"] == {"total": 10_000, "completed": 9_000, "failed": 10, "running": 40, "open": 990}


def test_items_are_those_of_the_highest_round_and_none_before_the_list_is_expanded() -> None:
    rows = [row("each", "completed", items_total=2), row("each", "completed", item=0),
            row("each", "completed", item=1), row("each", "running", round_=2)]
    shown = nodes(graph_of(parse_definition(FOR_EACH), rows))
    assert (shown["each"]["status"], shown["each"]["round"], shown["each"]["items"]) == ("running", 2, None)
    rows += [row("each", "running", round_=2, item=0), row("each", "cancelled", round_=2, item=1),
             row("each", "pending", round_=2, item=2)]
    rows[3] = row("each", "waiting", round_=2, items_total=3)
    shown = nodes(graph_of(parse_definition(FOR_EACH), rows))
    # a cancelled item is neither completed, failed nor open: it counts in the total only
    assert shown["each"]["items"] == {"total": 3, "completed": 0, "failed": 0, "running": 1, "open": 2}


def test_the_vendored_dagre_is_the_file_its_readme_pins() -> None:
    readme = (VENDOR / "README.md").read_text()
    for name in ("dagre-3.1.4.min.js", "dagre-3.1.4.LICENSE.txt"):
        line = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        pinned = re.findall(r"`([0-9a-f]{64})`", line)
        assert pinned == [hashlib.sha256((VENDOR / name).read_bytes()).hexdigest()], name
    assert "Permission is hereby granted" in (VENDOR / "dagre-3.1.4.LICENSE.txt").read_text()
    assert (VENDOR / "dagre-3.1.4.min.js").read_text().startswith('"use strict";var dagre=')  # the global


def test_the_diagram_listens_to_every_event_type_flowdb_writes() -> None:
    """EventSource hands a named event only to a listener for that name: a type diagram.js does not list
    would not refresh the diagram. Types written from f-strings are listed by hand."""
    script = (STATIC / "diagram.js").read_text()
    listed = set(re.findall(r'"([a-z]+\.[a-z_]+)"', script.split("const EVENT_TYPES = [")[1].split("];")[0]))
    written = {"step.completed", "step.failed", "step.skipped", "step.waiting", "step.deferred",  # f"step.{kind}"
               "instance.completed", "instance.failed", "instance.cancelled"}  # f"instance.{status}"
    for path in (ROOT / "flowdb").rglob("*.py"):
        written |= set(re.findall(r"[\"']((?:step|instance|approval|gateway|budget|feedback)\.[a-z_]+)[\"']",
                                  path.read_text()))
    assert written - listed == set()
    assert len(written) > 30  # the scan found flowdb's event types


ON_ERROR = """
process:
  name: caught
  steps:
    - {id: fetch, type: agent_task, agent: a, message: go, on_error: [{error: Timeout, next: slow}, {next: other}]}
    - {id: use, type: agent_task, agent: a, message: go, depends_on: [fetch]}
    - {id: slow, type: agent_task, agent: a, message: go}
    - {id: other, type: agent_task, agent: a, message: go}
"""


def test_an_error_boundary_is_an_error_edge_labelled_with_the_types_it_takes() -> None:
    graph = graph_of(parse_definition(ON_ERROR))
    assert edges(graph) == {("fetch", "use", "dependency", None), ("fetch", "slow", "error", "on Timeout"),
                            ("fetch", "other", "error", "any error")}
