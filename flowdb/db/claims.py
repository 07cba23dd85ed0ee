"""The claim protocol's statements: claim, take over, heartbeat, release. Built once per dialect.

Claim is one `UPDATE ... WHERE id IN (SELECT ... LIMIT n [FOR UPDATE SKIP LOCKED]) RETURNING ...`.
It takes ready steps whose ready time has come and waiting steps whose wake-up time has come,
through one partial index on claimable_at.

Poison steps. A running step whose lease expired lost its worker: the worker was killed, crashed,
froze or was cut off. Any of the steps that worker held may have caused it, so none of them is
charged an attempt for it. The claim sweeps each into a ready *suspect* as its scan meets it (no
scan of its own: a backlog of ready steps would make one cost as much as the backlog). Suspects are
*taken over* one at a time (`take_over`, through a small index of suspects) and run alone on
their new worker: that worker claims nothing else, lets its other steps finish, then marks
the run `isolated` and starts it (`isolate`). Only the loss of an isolated run is charged: a step
that crashes every worker it runs on fails after `max_attempts` runs alone, and the steps claimed
beside it are never charged for it. A suspect whose new worker cannot get free in time is handed
back (`hand_back`: ready, still a suspect, for another worker to take over). A stopping worker gives
unfinished steps back (`release`) without charge, but only `free_releases` times per step, so a
step that makes its own worker stop cannot run forever.

Attempts: a claim or a take-over counts one (a woken waiting step none); the sweep gives back the
crashed run's unless that run was isolated; a hand-back or a free release gives back the run that
did not happen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BindParameter,
    Connection,
    Select,
    Update,
    and_,
    bindparam,
    case,
    false,
    func,
    literal,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.sql.elements import ColumnClause, ColumnElement

from flowdb.db.agent_usage import UsageStatements
from flowdb.db.clock import Clock
from flowdb.db.driver import DriverStatement, from_json
from flowdb.db.events import EventWriter, event_row
from flowdb.db.tables import CLAIMABLE, process_instances, step_instances
from flowdb.db.timings import CLEARED, timing
from flowdb.db.workers import Capabilities
from flowdb.engine.status import StepStatus, word
from flowdb.settings import FREE_RELEASES

S, I = step_instances, process_instances  # noqa: E741
RUNNING: ColumnClause[str] = word(StepStatus.RUNNING)
READY: ColumnClause[str] = word(StepStatus.READY)
STOPPED = (StepStatus.CANCELLED.value, StepStatus.SKIPPED.value)  # a step stopped while a worker ran it
CANCELLED_WHILE_RUNNING = "the step was cancelled while it ran"  # why its result is dropped (events, log)
# The condition of the suspects' partial index, written as in the index (SQLAlchemy would write a
# Boolean column as `suspect = 1` on SQLite, which SQLite does not match with the index's `suspect`).
SUSPECT: ColumnElement[bool] = literal_column("step_instances.suspect")
# What every statement that moves a step out of `running` writes: no lease, and the crash
# accounting of the run is over (a CHECK keeps `suspect` to running rows and handed-back ready ones).
LEASE_DROPPED: dict[str, Any] = {"lease_owner": None, "lease_token": None, "lease_expires_at": None,
                                 "suspect": false(), "isolated": false()}


@dataclass(frozen=True)
class Claimed:
    """A step this worker holds a lease on."""

    id: int
    instance_id: int
    definition_id: int
    step_id: str
    type: str
    attempt: int
    max_attempts: int
    lease_token: str
    input: Any
    woken: bool  # the row waited before (a timer, an approval, for_each items): this run goes on from there
    suspect: bool = False  # taken over from a worker whose lease expired: it must run alone
    reclaims: int = 0  # how many times it was taken over
    releases: int = 0  # how many times stopping workers gave it back unfinished
    round: int = 1  # the loop round this row runs (1: the first visit)
    item: int | None = None  # the for_each index of an item's row (None: a step's own row)
    item_value: Any = None  # that item's element of the list
    items_left: int | None = None  # a for_each step's own row: its items not finished yet

    @property
    def exhausted(self) -> bool:
        """No attempt is left to run: its crashes or releases used them up."""
        return self.attempt > self.max_attempts

    def exhausted_reason(self, free_releases: int = FREE_RELEASES) -> str:
        allowed = f"no attempts left ({self.max_attempts} allowed)"
        if self.suspect:
            return (f"its worker stopped while running it alone (the lease expired; {self.reclaims} take-over(s) "
                    f"in all): it crashes the workers that run it; {allowed}")
        return (f"stopping workers gave it back unfinished {self.releases} times (the first {free_releases} are "
                f"not charged); {allowed}")


def _names(names: Any) -> list[Any]:
    return [literal(name) for name in sorted(names)]


def servable(serves: Capabilities, *, limited_waiting_only: bool = False) -> ColumnElement[bool]:
    """The steps a worker can run: of its step types, and of agent tasks only its agents' (the names
    are written into the statement, compiled once per worker). `limited_waiting_only`: of the agents
    with limits, only the polls of executions under way (claim_limited takes their other rows: ready ones,
    and waiting ones that never started, such as steps a budget held back)."""
    types = S.c.type.in_(_names(serves.step_types))
    limited = {name for name, _, _ in serves.limited}
    free = serves.agents - limited if limited_waiting_only else serves.agents
    agents: list[ColumnElement[bool]] = [S.c.agent.is_(None)]
    if free:
        agents.append(S.c.agent.in_(_names(free)))
    if limited_waiting_only and limited:  # polls of executions under way: they hold their slot already
        agents.append(S.c.agent.in_(_names(limited)) & (S.c.status == word(StepStatus.WAITING))
                      & S.c.agent_execution.is_not(None))
    return types & or_(*agents)


def claimable_rows(table: str) -> list[ColumnElement[bool]]:
    """The claimable index's condition, written as the index has it (SQLite uses a partial index only for
    a query whose WHERE holds each of the index's terms); a paused instance's rows are not in it."""
    return [literal_column(f"{table}.status IN {CLAIMABLE}"), literal_column(f"NOT {table}.paused")]


def instance_paused() -> ColumnElement[bool]:
    """For a row given back outside a batch of outcomes (a release, a hand-back): whether its instance is
    paused, so it is held (flowdb/engine/pause.py)."""
    return select(I.c.id).where(I.c.id == S.c.instance_id, I.c.paused_at.is_not(None)).exists()


def holding_slot(clock: Clock) -> ColumnElement[bool]:
    """A row that holds one of its agent's concurrency slots: running under a live lease (a lease that
    expired is a dead worker's), or parked while the platform still runs its execution."""
    return or_(and_(S.c.status == RUNNING, S.c.claimable_at > clock.now),
               and_(S.c.status == word(StepStatus.WAITING), S.c.agent_execution.is_not(None)))


class ClaimStatements:
    def __init__(self, dialect_name: str, *, one_instance: bool = False, serves: Capabilities | None = None) -> None:
        """`serves`: claim only the steps of these agents and step types (None: every step)."""
        clock = Clock(dialect_name)
        self.clock = clock
        self.postgres = dialect_name == "postgresql"
        self.one_instance = one_instance
        # Steps this worker cannot serve stay ready for a worker that can (db/workers.py); an
        # expired lease is swept whoever's step it is. The ready steps of agents with a concurrency
        # limit are claimed by claim_limited, which counts the agent's busy slots first.
        can_serve: tuple[ColumnElement[bool], ...] = (servable(serves, limited_waiting_only=True),) \
            if serves is not None else ()
        # Agents whose ready steps claim_limited takes: (concurrency, tokens per minute), None for no limit.
        self.gated: dict[str, tuple[int | None, int | None]] = {
            name: (slots, rate) for name, slots, rate in serves.limited} if serves is not None else {}
        self.limits: dict[str, int] = {name: slots for name, (slots, _) in self.gated.items() if slots is not None}
        self.usage = UsageStatements(dialect_name)
        lease: BindParameter[float] = bindparam("lease_seconds")
        held = {"status": RUNNING, "lease_owner": bindparam("owner"), "lease_token": bindparam("token"),
                "lease_expires_at": clock.plus(lease), "claimable_at": clock.plus(lease), "heartbeat_at": clock.now}
        can_type = (S.c.type.in_(_names(serves.step_types)),) if serves is not None else ()
        returning = (S.c.id, S.c.instance_id, S.c.definition_id, S.c.step_id, S.c.type, S.c.attempt,
                     S.c.max_attempts, S.c.input, S.c.suspect, S.c.reclaims, S.c.releases, S.c.woken, S.c.round,
                     S.c.item, S.c.item_value, S.c.items_left)

        # Ready and waiting steps whose time has come. The same scan sweeps the running steps whose
        # lease expired (they sort among them by claimable_at, the lease expiry) instead of claiming
        # them: each becomes a ready suspect, the crashed run given back unless it ran alone, for
        # take_over below. Suspects waiting ready are left to take_over.
        waiting = S.c.status == word(StepStatus.WAITING)
        expired = S.c.status == RUNNING
        queued = timing("queued", clock.milliseconds_between(S.c.ready_at))
        self.claim: Update = (
            update(S)
            .where(S.c.id.in_(self._due(expired | and_(~S.c.suspect, *can_serve)).scalar_subquery()))
            .values(
                status=case((expired, READY), else_=RUNNING),
                lease_owner=case((expired, None), else_=bindparam("owner")),
                lease_token=case((expired, None), else_=bindparam("token")),
                lease_expires_at=case((expired, None), else_=clock.plus(lease)),
                claimable_at=case((expired, clock.now), else_=clock.plus(lease)),
                heartbeat_at=case((expired, S.c.heartbeat_at), else_=clock.now),
                # A woken step (timer, approval) keeps the start of its attempt: the wait is part of it.
                started_at=case((waiting | expired, S.c.started_at), else_=clock.now),
                # A swept step queues from its lease expiry (db/timings.py).
                ready_at=case((expired, S.c.claimable_at), else_=S.c.ready_at),
                **{column: case((waiting, S.c[column]), (expired, None), else_=value)
                   for column, value in queued.items()},
                attempt=S.c.attempt + case((waiting, literal(0)), (expired & S.c.isolated, literal(0)),
                                           (expired, literal(-1)), else_=literal(1)),
                suspect=expired,
                isolated=false(),
                reclaims=S.c.reclaims + case((expired, literal(1)), else_=literal(0)),
                error=case((waiting, S.c.error), (expired, literal("lease of worker ") + S.c.lease_owner
                                                  + literal(" expired (it stopped heartbeating)")), else_=None),
            )
            .returning(*returning)
        )
        self.claim_raw = DriverStatement(self.claim)
        # The steps of one agent with limits that would start its work, up to its free slots
        # (claim_limited): ready ones, and waiting ones that never started (a budget held them back; a
        # woken turn keeps its attempt and the start of its wait, like the claim's).
        held_back = (S.c.status == word(StepStatus.WAITING)) & S.c.agent_execution.is_(None)
        self.claim_agent: DriverStatement | None = DriverStatement(
            update(S)
            .where(S.c.id.in_(self._due((S.c.status == READY) | held_back, ~S.c.suspect,
                                        S.c.agent == bindparam("agent"), *can_type).scalar_subquery()))
            .values(**held, started_at=case((waiting, S.c.started_at), else_=clock.now),
                    **{column: case((waiting, S.c[column]), else_=value) for column, value in queued.items()},
                    attempt=S.c.attempt + case((waiting, literal(0)), else_=literal(1)),
                    error=case((waiting, S.c.error), else_=None))
            .returning(*returning)
        ) if self.gated else None
        # The agents' busy slots, through the claimable index from now on: rows whose lease or next
        # poll lies ahead (not the ready backlog, whose claimable time has passed). A poll that is due
        # is claimed by the general claim at once.
        self.busy_slots = (
            select(S.c.agent, func.count())
            .where(*claimable_rows("step_instances"), S.c.claimable_at > clock.now,
                   S.c.agent.in_(_names(self.limits)), holding_slot(clock))
            .group_by(S.c.agent)
        )
        # A suspect, taken over by one worker (found through the small index of suspects); a suspect
        # of an agent with a limit only while that agent has a free slot.
        slot_free: tuple[ColumnElement[bool], ...] = ()
        if self.limits:
            R = S.alias("busy")
            busy = (select(func.count()).where(
                *claimable_rows("busy"), R.c.claimable_at > clock.now, R.c.agent == S.c.agent,
                or_(R.c.status == RUNNING,
                    and_(R.c.status == word(StepStatus.WAITING), R.c.agent_execution.is_not(None)))).scalar_subquery())
            limit = case(*((S.c.agent == literal(name), literal(n)) for name, n in sorted(self.limits.items())),
                         else_=None)
            slot_free = (or_(S.c.agent.is_(None), S.c.agent.not_in(_names(self.limits)), busy < limit),)
        take_over_serves = (servable(serves),) if serves is not None else ()
        self.take_over: Update = (
            update(S)
            .where(S.c.id.in_(self._due(SUSPECT, S.c.status == READY, *take_over_serves, *slot_free, n=1,
                                        index=False).scalar_subquery()))
            .values(**held, started_at=clock.now, **queued, attempt=S.c.attempt + literal(1), isolated=false())
            .returning(*returning)
        )
        self.take_over_raw = DriverStatement(self.take_over)
        mine = (S.c.id == bindparam("sid"), S.c.lease_token == bindparam("token"), S.c.status == RUNNING)
        # A suspect's run starts alone: from now on the loss of this worker is its own.
        self.isolate = update(S).where(*mine, S.c.suspect).values(isolated=true(), started_at=clock.now)
        # A suspect that never started, for another worker to take over: its attempt given back.
        self.hand_back = (
            update(S).where(*mine, S.c.suspect, ~S.c.isolated)
            .values(status=READY, lease_owner=None, lease_token=None, lease_expires_at=None,
                    claimable_at=clock.now, attempt=S.c.attempt - literal(1), paused=instance_paused())
        )
        self.heartbeat = (
            update(S)
            .where(S.c.id == bindparam("sid"), S.c.lease_token == bindparam("token"), S.c.status == RUNNING)
            .values(lease_expires_at=clock.plus(lease), claimable_at=clock.plus(lease), heartbeat_at=clock.now)
        )
        free = S.c.releases < bindparam("free_releases")
        self.release = (
            update(S)
            .where(S.c.id == bindparam("sid"), S.c.lease_token == bindparam("token"), S.c.status == RUNNING)
            .values(status=READY, **LEASE_DROPPED, claimable_at=clock.now, ready_at=clock.now,
                    attempt=S.c.attempt - case((free, literal(1)), else_=literal(0)),
                    releases=S.c.releases + literal(1), paused=instance_paused(), **CLEARED)
            .returning(S.c.attempt, S.c.releases)
        )
        self.events = EventWriter(dialect_name)

    def _due(self, *conditions: ColumnElement[bool], n: Any = None, index: bool = True) -> Select[Any]:
        """Ids of claimable rows whose time has come, oldest first, through the claimable index (its
        condition written as in the index, so SQLite uses it too)."""
        claimable: list[ColumnElement[bool]] = claimable_rows("step_instances") if index else [~S.c.paused]
        due = (
            select(S.c.id)
            .where(*claimable, S.c.claimable_at <= self.clock.now, *conditions)
            .order_by(S.c.claimable_at, S.c.id)
            .limit(bindparam("n") if n is None else n)
        )
        if self.one_instance:  # `flowdb run` works its own instance only
            due = due.where(S.c.instance_id == bindparam("iid"))
        if self.postgres:
            due = due.with_for_update(skip_locked=True)
        return due

    def claim_steps(self, conn: Connection, owner: str, token: str, n: int, lease_seconds: float,
                    instance_id: int | None = None) -> list[Claimed]:
        """Claim up to n ready or waiting steps in the current transaction, sweeping the expired leases
        met on the way into suspects; write a step.started event (step.woken for a waiting one) for
        each step claimed and a step.lease_expired event for each swept."""
        params = self._params(owner, token, n, lease_seconds, instance_id)
        claimed = self._claimed(conn, self.claim_raw, params, sweeps=True)
        if self.claim_agent is not None and len(claimed) < n:
            claimed += self.claim_limited(conn, params, n - len(claimed))
        return claimed

    def claim_limited(self, conn: Connection, params: dict[str, Any], n: int) -> list[Claimed]:
        """Claim ready steps of the agents with limits: each up to its free concurrency slots, none of an
        agent whose last minute's tokens reached its tokens_per_minute. The counts and the claims are
        serialized per agent across every worker and host: by a transaction lock per agent on
        PostgreSQL (taken in name order), by the one writer at a time on SQLite."""
        assert self.claim_agent is not None
        self.lock_agents(conn)
        busy: dict[str, int] = {agent: count for agent, count in conn.execute(self.busy_slots)} \
            if self.limits else {}
        used = self.usage.last_minute(conn, [name for name, (_, rate) in self.gated.items() if rate is not None])
        claimed: list[Claimed] = []
        for name, (slots, rate) in sorted(self.gated.items()):
            free = n - len(claimed)
            if slots is not None:
                free = min(free, slots - busy.get(name, 0))
            if rate is not None and used.get(name, 0) >= rate:
                free = 0  # its last minute's tokens reached the limit: its steps wait for the window to move
            if free > 0:
                claimed += self._claimed(conn, self.claim_agent, {**params, "agent": name, "n": free})
        return claimed

    def lock_agents(self, conn: Connection) -> None:
        """Serialize the claims of the agents with limits across workers (PostgreSQL; SQLite has one writer
        at a time): a transaction lock per agent, in name order. A worker's cycle takes them before it
        records outcomes, so they come before any instance row it locks (no lock-order deadlock with a
        budget check, which locks an instance row); taken again later in the transaction, they are its own."""
        if self.postgres and self.gated:
            for name in sorted(self.gated):
                conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(
                    literal("flowdb.agent:") + literal(name), 0))))

    def take_over_step(self, conn: Connection, owner: str, token: str, lease_seconds: float,
                       instance_id: int | None = None) -> Claimed | None:
        """Take over one suspect, to run alone (see the module's docstring)."""
        self.lock_agents(conn)  # its agent's free slot is checked in the statement
        claimed = self._claimed(conn, self.take_over_raw, self._params(owner, token, 1, lease_seconds, instance_id))
        return claimed[0] if claimed else None

    @staticmethod
    def _params(owner: str, token: str, n: int, lease_seconds: float, instance_id: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {"owner": owner, "token": token, "n": n, "lease_seconds": lease_seconds}
        if instance_id is not None:
            params["iid"] = instance_id
        return params

    def _claimed(self, conn: Connection, statement: DriverStatement, params: dict[str, Any], *,
                 sweeps: bool = False) -> list[Claimed]:
        claimed = []
        started = []
        owner, token = params["owner"], params["token"]
        for sid, iid, definition_id, step_id, step_type, attempt, max_attempts, raw_input, suspect, reclaims, \
                releases, woken, visit, item, item_value, items_left in statement.execute(conn, params):
            if sweeps and suspect:  # an expired lease the claim swept: not claimed
                started.append(event_row(iid, "step.lease_expired", {"reclaims": reclaims}, sid))
                continue
            state = from_json(raw_input, as_text=not self.postgres)
            item = Claimed(sid, iid, definition_id, step_id, step_type, attempt, max_attempts, token, state,
                           bool(woken), bool(suspect), reclaims, releases, visit, item,
                           from_json(item_value, as_text=not self.postgres),
                           items_left)
            claimed.append(item)
            payload: dict[str, Any] = {"attempt": attempt, "worker": owner}
            if item.suspect:
                payload.update(reclaimed=True, suspect=True, reclaims=reclaims)
            started.append(event_row(iid, "step.woken" if woken else "step.started", payload, sid))
        self.events.write(conn, started)
        return claimed

    def isolate_step(self, conn: Connection, item: Claimed) -> bool:
        """Mark a suspect's run as running alone, starting now; False if the lease is gone."""
        return bool(conn.execute(self.isolate, {"sid": item.id, "token": item.lease_token}).rowcount)

    def hand_back_step(self, conn: Connection, item: Claimed, reason: str) -> bool:
        """Give a suspect that never started back, still a suspect, for another worker to take over."""
        if not conn.execute(self.hand_back, {"sid": item.id, "token": item.lease_token}).rowcount:
            return False
        self.events.write(conn, [event_row(item.instance_id, "step.handed_back", {"attempt": item.attempt,
                                                                                  "reason": reason}, item.id)])
        return True

    def heartbeat_steps(self, conn: Connection, held: list[Claimed], lease_seconds: float) -> dict[int, bool]:
        """Extend the leases still held. Return the steps whose lease this worker lost, each with whether
        it was cancelled (or skipped) while it ran, and record each as a dropped late result (the worker
        abandons its run)."""
        lost = set()
        for item in held:
            result = conn.execute(self.heartbeat, {"sid": item.id, "token": item.lease_token,
                                                   "lease_seconds": lease_seconds})
            if result.rowcount == 0:
                lost.add(item.id)
        if not lost:
            return {}
        stopped = set(conn.scalars(select(S.c.id).where(S.c.id.in_(sorted(lost)), S.c.status.in_(STOPPED))))
        self.events.write(conn, [event_row(item.instance_id, "step.late_result_dropped", {
            "attempt": item.attempt, "outcome": "abandoned",
            "reason": CANCELLED_WHILE_RUNNING if item.id in stopped
            else "a heartbeat found the lease lost; the run was cancelled"}, item.id)
            for item in held if item.id in lost])
        return {sid: sid in stopped for sid in lost}

    def release_steps(self, conn: Connection, held: list[Claimed], free_releases: int = FREE_RELEASES) -> int:
        """Give steps back (worker shutting down): ready again, the attempt not counted for a step's
        first `free_releases` releases, counted after that."""
        rows = []
        for item in held:
            row = conn.execute(self.release, {"sid": item.id, "token": item.lease_token,
                                              "free_releases": free_releases}).first()
            if row is not None:
                rows.append(event_row(item.instance_id, "step.released", {
                    "attempt": item.attempt, "releases": row.releases, "charged": row.releases > free_releases},
                    item.id))
        self.events.write(conn, rows)
        return len(rows)
