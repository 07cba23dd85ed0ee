"""Settling: what a step's end means for the steps after it. Run in the completion's transaction.

The rules (DESIGN.md, "Control flow"):
- A settled step marks each out-edge `taken` (it completed, and a gateway routed there, or the edge
  is a depends_on) or `skipped` (it was skipped, cancelled (R5), or the gateway routed elsewhere).
- Each child counts down: `pending_parents` by one per settled parent, `completed_parents` by one
  per taken edge (on the child's row, so a join never scans its siblings). While the child is
  `pending`, its join rule (`JoinRule`, R6) decides: ready once `needed` parents completed (and, for
  `join: all`, no parent is pending any more); skipped once `needed` completions can no longer come
  (dead-path elimination, which carries on from the skipped child). A child that started already
  (`join: any`) only counts: later parents are ignored. With `cancel_others`, the parents still
  open when the child starts are cancelled (a race), and settle as cancelled.
- A step that failed for good and has an error boundary (on_error) settles like a skipped step, but
  the edge to the handler its error goes to is taken; an edge to a handler is taken by nothing else.
- A gateway that takes a loop-back (R1) settles nothing forward (R2): its forward edges stay
  pending, so a join after the loop waits for the loop's exit. Instead every step of the loop's body
  gets a new round (R4): a new row, pending on its parents inside the body (their edges set pending
  again), the loop's target ready at once. Whether the target may run another round (R3,
  `max_visits`) was decided by the gateway when it chose its routes (steptypes/gateway.py).
- In a definition with loops an edge counts once per round: a step of a loop body whose child is
  outside the body counts that child down in its first round only (the edge is no longer pending).

Every child row is read before it is counted down (one statement per pass); on PostgreSQL the
caller holds the instance rows' locks, so two completions of one instance never interleave here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from sqlalchemy import BindParameter, Connection, bindparam, case, func, insert, literal, select, update

from flowdb.db.clock import Clock
from flowdb.db.driver import DriverStatement
from flowdb.db.tables import step_edges, step_instances
from flowdb.definitions import CompiledDefinition, JoinRule
from flowdb.engine.status import OPEN_STEP, EdgeState, StepStatus, word
from flowdb.engine.stop import Stopper
from flowdb.models import effective_retry

S, E = step_instances, step_edges


@dataclass(frozen=True)
class Settled:
    """A step row that reached a final state: completed, or not (skipped, cancelled)."""

    instance_id: int
    step_id: str
    completed: bool
    taken: frozenset[str] | None = None  # a gateway's chosen targets; None: every child
    definition_id: int = 0  # needed when a loop-back is taken (the new rows carry it)
    round: int = 1  # the settled row's round
    error_to: str | None = None  # it failed and its error boundary sends the error to this step


class Sink(Protocol):
    """Where settling reports: events, steps closed or opened per instance, steps made ready."""

    made_ready: int

    def event(self, instance_id: int, kind: str, payload: dict[str, Any] | None = None,
              step_instance_id: int | None = None) -> None: ...

    def close(self, instance_id: int, steps: int = 1) -> None: ...


def join_state(rule: JoinRule, pending: int, completed: int) -> StepStatus | None:
    """What a pending child becomes with `pending` parents not settled and `completed` completed."""
    if completed >= rule.needed and (pending == 0 or not rule.waits_for_all):
        return StepStatus.READY
    if completed + pending < rule.needed:
        return StepStatus.SKIPPED
    return None


class _Edge(NamedTuple):  # a tuple: one is made per settled edge, on the hot path
    instance_id: int
    parent: str
    child: str
    taken: bool
    round: int  # the parent row's round
    # It counts into its child's first round: no loop runs both ends again (in a definition without
    # loops every step has one round, so that is the same row as the latest).
    first: bool


_TAKEN, _SKIPPED, _PENDING = EdgeState.TAKEN.value, EdgeState.SKIPPED.value, StepStatus.PENDING.value


@dataclass
class _Count:
    row: Any  # the child's current row (latest round) as read before counting
    settled: int = 0
    taken: int = 0


class Settler:
    def __init__(self, dialect_name: str, stopper: Stopper) -> None:
        clock = Clock(dialect_name)
        self.stopper = stopper
        iids: BindParameter[list[int]] = bindparam("iids", expanding=True)
        # The children's own rows (not for_each items), every round: the latest is kept.
        self.children = select(S.c.id, S.c.instance_id, S.c.step_id, S.c.round, S.c.status, S.c.pending_parents,
                               S.c.completed_parents).where(
            S.c.instance_id.in_(iids), S.c.step_id.in_(bindparam("sids", expanding=True)), S.c.item.is_(None))
        becomes: BindParameter[str] = bindparam("becomes")
        ready = becomes == literal("ready")
        self.count_down = DriverStatement(
            update(S).where(S.c.id == bindparam("cid")).values(
                pending_parents=S.c.pending_parents - bindparam("settled"),
                completed_parents=S.c.completed_parents + bindparam("taken"),
                status=case((becomes == literal(""), S.c.status), else_=becomes),
                ready_at=case((ready, clock.now), else_=S.c.ready_at),
                claimable_at=case((ready, clock.now), else_=S.c.claimable_at),
                finished_at=case((becomes == literal("skipped"), clock.now), else_=S.c.finished_at),
            ))
        self.mark_edge = DriverStatement(
            update(E).where(E.c.instance_id == bindparam("iid"), E.c.from_step == bindparam("parent"),
                            E.c.to_step == bindparam("child")).values(state=bindparam("edge_state")))
        self.latest_of = select(S.c.instance_id, S.c.step_id, func.max(S.c.round).label("round")).where(
            S.c.instance_id.in_(iids), S.c.step_id.in_(bindparam("froms", expanding=True)), S.c.item.is_(None)
        ).group_by(S.c.instance_id, S.c.step_id)
        self.edge_states = select(E.c.instance_id, E.c.from_step, E.c.to_step, E.c.state).where(
            E.c.instance_id.in_(iids), E.c.from_step.in_(bindparam("froms", expanding=True)))
        # Loops: the body's edges pending again, the taken edges into it from outside, the new rows.
        iid: BindParameter[int] = bindparam("iid")
        body: BindParameter[list[str]] = bindparam("body", expanding=True)
        self.reopen_edges = update(E).where(E.c.instance_id == iid, E.c.from_step.in_(body),
                                            E.c.to_step.in_(body)).values(state=word(EdgeState.PENDING))
        self.taken_from_outside = select(E.c.to_step, func.count()).where(
            E.c.instance_id == iid, E.c.to_step.in_(body), E.c.from_step.not_in(body),
            E.c.state == word(EdgeState.TAKEN)).group_by(E.c.to_step)
        self.pending_from_outside = select(E.c.to_step, func.count()).where(
            E.c.instance_id == iid, E.c.to_step.in_(body), E.c.from_step.not_in(body),
            E.c.state == word(EdgeState.PENDING)).group_by(E.c.to_step)
        self.latest_rounds = select(S.c.step_id, func.max(S.c.round)).where(
            S.c.instance_id == iid, S.c.step_id.in_(body), S.c.item.is_(None)).group_by(S.c.step_id)
        new_row = insert(S).values(created_at=clock.now)
        self.insert_pending = new_row.returning(S.c.id)
        self.insert_ready = new_row.values(ready_at=clock.now, claimable_at=clock.now).returning(S.c.id)
        self.open_in_body = select(S.c.id).where(S.c.instance_id == iid, S.c.step_id.in_(body),
                                                 S.c.status.in_([s.value for s in OPEN_STEP]))
        self.open_parents = select(S.c.id, S.c.step_id, S.c.round).where(
            S.c.instance_id == iid, S.c.step_id.in_(bindparam("sids", expanding=True)), S.c.item.is_(None),
            S.c.status.in_([s.value for s in OPEN_STEP]))

    def settle(self, conn: Connection, settled: list[Settled], definitions: dict[int, CompiledDefinition],
               sink: Sink) -> None:
        """Apply the rules to the settled steps and, pass by pass, to what they settle in turn."""
        work = settled
        while work:
            work = self._pass(conn, work, definitions, sink)

    def _pass(self, conn: Connection, work: list[Settled], definitions: dict[int, CompiledDefinition],
              sink: Sink) -> list[Settled]:
        edges: list[_Edge] = []
        loop_backs: list[tuple[Settled, list[str]]] = []
        for s in work:
            definition = definitions[s.instance_id]
            step = definition.steps[s.step_id]
            looping = [t for t in (s.taken or ()) if t in step.loops] if s.completed and step.loops else []
            if looping:
                loop_backs.append((s, looping))  # after this pass's edges: they belong to the round ending
                continue
            peers = definition.loop_bodies.get(s.step_id, ()) if definition.has_loops else None
            for child in step.children:
                if s.error_to is not None:  # failed, caught: only the edge to its handler is taken
                    taken = child == s.error_to
                else:  # an edge to an error handler is taken only by an error
                    taken = s.completed and (s.taken is None or child in s.taken) and child not in step.error_targets
                edges.append(_Edge(s.instance_id, s.step_id, child, taken, s.round,
                                   peers is not None and child not in peers))
        edges = self._counting_edges(conn, edges, definitions)
        after: list[Settled] = []
        if edges:
            after = self._count(conn, edges, definitions, sink)
        for s, looping in loop_backs:
            self._new_round(conn, s, definitions, looping, sink)
        return after

    def _count(self, conn: Connection, edges: list[_Edge], definitions: dict[int, CompiledDefinition],
               sink: Sink) -> list[Settled]:
        """Mark the edges, count their children down, and apply the join rules to those still pending."""
        self.mark_edge.executemany(conn, [{"iid": e.instance_id, "parent": e.parent, "child": e.child,
                                           "edge_state": _TAKEN if e.taken else _SKIPPED}
                                          for e in edges])
        counts = self._read_children(conn, edges)
        for e in edges:
            count = counts.get((e.instance_id, e.child, e.first))
            if count is not None:
                count.settled += 1
                count.taken += int(e.taken)
        updates = []
        after: list[Settled] = []
        starting: list[tuple[int, str]] = []
        for (instance_id, child, _), count in counts.items():
            row = count.row
            rule = definitions[instance_id].steps[child].join
            becomes = join_state(rule, row.pending_parents - count.settled, row.completed_parents + count.taken) \
                if row.status == _PENDING else None
            updates.append({"cid": row.id, "settled": count.settled, "taken": count.taken,
                            "becomes": becomes.value if becomes is not None else ""})
            if becomes is StepStatus.READY:
                sink.made_ready += 1
                sink.event(instance_id, "step.ready", None, row.id)
                if rule.cancel_others:
                    starting.append((instance_id, child))
            elif becomes is StepStatus.SKIPPED:
                sink.event(instance_id, "step.skipped", {"reason": "no parent completed" if rule.waits_for_all
                                                         else f"fewer than {rule.needed} parent(s) can complete"},
                           row.id)
                sink.close(instance_id)
                after.append(Settled(instance_id, child, False, None, 0, row.round))
        self.count_down.executemany(conn, updates)
        for instance_id, child in starting:
            after += self._cancel_others(conn, instance_id, child, definitions[instance_id], sink)
        return after

    def _counting_edges(self, conn: Connection, edges: list[_Edge],
                        definitions: dict[int, CompiledDefinition]) -> list[_Edge]:
        """In definitions with loops, the edges that count: each edge counts once per round of its
        parent, so only an edge still pending counts (an edge out of a loop body, or into it from
        outside, counts once), and only from a parent row of the step's latest round (a row of an
        earlier round settling late no longer counts into the body's new round)."""
        looped = sorted({e.instance_id for e in edges if definitions[e.instance_id].has_loops})
        if not looped:
            return edges
        froms = sorted({e.parent for e in edges if e.instance_id in looped})
        params = {"iids": looped, "froms": froms}
        pending = {(r.instance_id, r.from_step, r.to_step) for r in conn.execute(self.edge_states, params)
                   if r.state == EdgeState.PENDING}
        latest = {(r.instance_id, r.step_id): r.round for r in conn.execute(self.latest_of, params)}
        return [e for e in edges if e.instance_id not in looped or (
            (e.instance_id, e.parent, e.child) in pending
            and (e.round >= latest.get((e.instance_id, e.parent), 1) or e.first))]

    def _read_children(self, conn: Connection, edges: list[_Edge]) -> dict[tuple[int, str, bool], _Count]:
        """Each counted child's row: its latest round, or its first for an edge that no loop runs again
        (a parent outside every loop the child is in counts for the round it was part of)."""
        wanted = {(e.instance_id, e.child, e.first) for e in edges}
        counts: dict[tuple[int, str, bool], _Count] = {}
        rows = conn.execute(self.children, {"iids": sorted({i for i, _, _ in wanted}),
                                            "sids": sorted({c for _, c, _ in wanted})})
        for row in rows:
            for first in (False, True):
                key = (row.instance_id, row.step_id, first)
                if key not in wanted:
                    continue
                known = counts.get(key)
                if known is None or (known.row.round > row.round if first else known.row.round < row.round):
                    counts[key] = _Count(row)
        return counts

    def _cancel_others(self, conn: Connection, instance_id: int, child: str, definition: CompiledDefinition,
                       sink: Sink) -> list[Settled]:
        """`cancel_others`: the child's join fired; its parents still open are cancelled (and settle)."""
        parents = definition.steps[child].parents
        rows = conn.execute(self.open_parents, {"iid": instance_id, "sids": parents}).all()
        if not rows:
            return []
        stopped = self.stopper.cancel_steps(conn, f"{child!r} started without it (cancel_others)", sink.event,
                                            rows=[r.id for r in rows])
        for _ in stopped:
            sink.close(instance_id)
        return [Settled(instance_id, s.step_id, False, None, 0, s.round) for s in stopped if s.item is None]

    def _new_round(self, conn: Connection, s: Settled, definitions: dict[int, CompiledDefinition],
                   targets: list[str], sink: Sink) -> None:
        """A loop-back was taken: a new round of every step of its body (R4). What is still open of
        the body's earlier rounds (a step a `join: any` did not wait for) is cancelled first, and
        settles as cancelled before the body's edges are set pending again."""
        definition = definitions[s.instance_id]
        gateway = definition.steps[s.step_id]
        body = sorted({sid for t in targets for sid in gateway.loops[t].body})
        stale = list(conn.execute(self.open_in_body, {"iid": s.instance_id, "body": body}).scalars())
        if stale:
            stopped = self.stopper.cancel_steps(conn, f"the loop went back to {', '.join(map(repr, targets))}",
                                                sink.event, rows=stale)
            sink.close(s.instance_id, len(stopped))
            # Steps settle through their own rows (a for_each item has no edges of its own).
            self.settle(conn, [Settled(s.instance_id, st.step_id, False, None, s.definition_id, st.round)
                               for st in stopped if st.item is None], definitions, sink)
        rounds, ready_ids = self.open_round(conn, s.instance_id, s.definition_id, definition, body, targets, sink)
        for target in targets:
            sink.event(s.instance_id, "step.loop_back", {"gateway": s.step_id, "target": target,
                                                         "round": rounds[target]})
        for ready_id in ready_ids:
            sink.made_ready += 1
            sink.event(s.instance_id, "step.ready", None, ready_id)

    def open_round(self, conn: Connection, instance_id: int, definition_id: int, definition: CompiledDefinition,
                   body: list[str], targets: list[str], sink: Sink, *, waits_outside: bool = False
                   ) -> tuple[dict[str, int], list[int]]:
        """A new round of every step of `body` (a loop's, or a rerun's: flowdb/rerun.py): `targets` ready at
        once, the others pending on their parents inside the body (whose edges are set pending again),
        with the taken edges from outside counted as completed parents. `waits_outside` (a rerun): a
        parent outside the body whose edge is still pending (a step a failure stopped, given back) is
        waited for too. Returns each step's new round and the ids of the rows made ready."""
        params = {"iid": instance_id, "body": body}
        rounds = dict(conn.execute(self.latest_rounds, params).all())
        from_outside: dict[str, int] = dict(conn.execute(self.taken_from_outside, params).all())
        pending_outside: dict[str, int] = dict(conn.execute(self.pending_from_outside, params).all()) \
            if waits_outside else {}
        conn.execute(self.reopen_edges, params)
        inside = set(body)
        rows = []
        for sid in body:
            step = definition.steps[sid]
            ready = sid in targets
            retry = effective_retry(step.model)
            rows.append({"instance_id": instance_id, "definition_id": definition_id, "step_id": sid,
                         "type": step.type, "status": (StepStatus.READY if ready else StepStatus.PENDING).value,
                         "round": rounds.get(sid, 0) + 1, "max_attempts": retry.max_attempts if retry else 1,
                         "pending_parents": 0 if ready else sum(p in inside for p in step.parents)
                         + pending_outside.get(sid, 0),
                         "completed_parents": 0 if ready else from_outside.get(sid, 0),
                         "agent": getattr(step.model, "agent", None)})
        ready_rows = [r for r in rows if r["status"] == StepStatus.READY]
        other_rows = [r for r in rows if r["status"] != StepStatus.READY]
        if other_rows:
            conn.execute(self.insert_pending, other_rows)
        ready_ids = list(conn.execute(self.insert_ready, ready_rows).scalars().all())
        sink.close(instance_id, -len(rows))
        return {sid: rounds.get(sid, 0) + 1 for sid in body}, ready_ids
