"""Loop rounds, step by step: outcomes recorded by hand in a chosen order (no worker, no timing), so
that what arrives late or in one batch with a loop-back is the case under test, on both databases."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Engine

from flowdb.db.claims import Claimed, ClaimStatements
from flowdb.db.instances import DefinitionCache
from flowdb.db.progress import ProgressStatements, ProgressWriter
from flowdb.outcomes import Outcome

from conftest import Database
from helpers import instance, runs, start, work

AGENTS_FILE = __import__("pathlib").Path(__file__).resolve().parent / "agents_control_flow.yaml"


class ByHand:
    """Claims every due step, and records the outcomes it is given, in one transaction each."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.claims = ClaimStatements(engine.dialect.name)
        self.writer = ProgressWriter(ProgressStatements(engine.dialect.name))
        self.definitions = DefinitionCache()

    def claim(self) -> dict[str, Claimed]:
        with self.engine.begin() as conn:
            claimed = self.claims.claim_steps(conn, "by-hand", uuid.uuid4().hex, 100, 300)
        return {c.step_id + (f"@{c.round}" if c.round > 1 else ""): c for c in claimed}

    def record(self, *outcomes: Outcome) -> None:
        with self.engine.begin() as conn:
            definitions = {o.step.definition_id: self.definitions.get(conn, o.step.definition_id) for o in outcomes}
            self.writer.apply(conn, list(outcomes), definitions)


def done(claimed: Claimed, routes: list[str] | None = None) -> Outcome:
    if routes is None:
        return Outcome(claimed, "completed", output={"ok": True})
    return Outcome(claimed, "completed", output={"routes": routes}, taken=frozenset(routes))


def statuses(engine: Engine, iid: int, step_id: str) -> list[tuple[int, str]]:
    return [(r.round, r.status) for r in runs(engine, iid, step_id)]


SAME_BATCH = """
process:
  name: same-batch
  steps:
    - {id: t, type: agent_task, agent: noop, message: t}
    - {id: a1, type: agent_task, agent: noop, message: a1, depends_on: [t]}
    - {id: a2, type: agent_task, agent: noop, message: a2, depends_on: [t]}
    - id: g
      type: gateway
      gateway_type: exclusive
      depends_on: [a1, a2]
      join: any
      routes:
        - {condition: "{{ steps.t.visit }} < 2", next: t}
        - {default: true, next: done}
    - {id: done, type: agent_task, agent: noop, message: d}
"""


def test_a_parent_recorded_with_the_loop_back_counts_for_its_own_round(db: Database) -> None:
    """The gateway loops back while a2 of the same round completes in the same batch: a2 belongs to
    round 1, so round 2's gateway still waits for round 2's parents."""
    [iid] = start(db.engine, SAME_BATCH)
    hand = ByHand(db.engine)
    hand.record(done(hand.claim()["t"]))
    claimed = hand.claim()
    hand.record(done(claimed["a1"]))
    gateway = hand.claim()["g"]
    hand.record(done(gateway, ["t"]), done(claimed["a2"]))
    assert statuses(db.engine, iid, "g") == [(1, "completed"), (2, "pending")]
    assert statuses(db.engine, iid, "t") == [(1, "completed"), (2, "ready")]
    work(db.engine, AGENTS_FILE)
    assert instance(db.engine, iid).status == "completed"
    assert statuses(db.engine, iid, "g") == [(1, "completed"), (2, "completed")]
    assert [r.status for r in runs(db.engine, iid, "done")] == ["completed"]
    round_two = {sid: runs(db.engine, iid, sid)[-1] for sid in ("a1", "a2", "g")}
    assert round_two["g"].started_at >= min(round_two["a1"].finished_at, round_two["a2"].finished_at)


OUTSIDE_PARENT = """
process:
  name: outside-parent
  steps:
    - {id: s, type: agent_task, agent: noop, message: s}
    - {id: t, type: agent_task, agent: noop, message: t, depends_on: [s]}
    - {id: x, type: agent_task, agent: noop, message: x}
    - {id: b, type: agent_task, agent: noop, message: b, depends_on: [t]}
    - {id: c, type: agent_task, agent: noop, message: c, depends_on: [b, x], join: any}
    - id: g
      type: gateway
      gateway_type: exclusive
      depends_on: [c]
      routes:
        - {condition: "{{ steps.t.visit }} < 2", next: t}
        - {default: true, next: done}
    - {id: done, type: agent_task, agent: noop, message: d}
"""


def test_a_late_parent_from_outside_the_loop_counts_for_the_first_round(db: Database) -> None:
    """x (outside the loop) finishes after the loop went back: it counted for round 1 of its child c
    (a join: any that had started already), and round 2 of c still waits for round 2 of b."""
    [iid] = start(db.engine, OUTSIDE_PARENT)
    hand = ByHand(db.engine)
    first = hand.claim()
    x = first["x"]
    hand.record(done(first["s"]))
    for step_id in ("t", "b", "c"):
        hand.record(done(hand.claim()[step_id]))
    hand.record(done(hand.claim()["g"], ["t"]))
    hand.record(done(x))
    assert statuses(db.engine, iid, "c") == [(1, "completed"), (2, "pending")]
    rows: dict[str, Any] = {sid: runs(db.engine, iid, sid)[-1] for sid in ("b", "c")}
    assert rows["c"].pending_parents == 1 and rows["c"].completed_parents == 0
    work(db.engine, AGENTS_FILE)
    assert instance(db.engine, iid).status == "completed"
    assert statuses(db.engine, iid, "c") == [(1, "completed"), (2, "completed")]
    b2, c2 = runs(db.engine, iid, "b")[-1], runs(db.engine, iid, "c")[-1]
    assert c2.started_at >= b2.finished_at and c2.pending_parents == 0
