"""The worker loop: claim a batch → render its templates → run handlers concurrently → heartbeat →
record outcomes.

Stateless: kill it at any instant and its steps are taken over once their leases expire, as
suspects that run alone (db/claims.py, "Poison steps"). A database that goes away stops nothing:
the loop waits with a capped back-off, keeps the outcomes it has not recorded yet, and carries on
when the database is back; a transaction whose COMMIT lost its answer is looked up before anything
else. Database calls run on the loop's thread over one held connection (they take well under a
millisecond each; handing each to a thread would cost more than the call). User templates never
run on the loop or inside a transaction: a claimed batch's conditions and messages are rendered in
one trip to a bounded thread (flowdb/bounded.py), under the template limits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from flowdb.actions import RenderedAction, render_actions
from flowdb.agents.registry import AgentLimits, AgentRegistry
from flowdb.agents.types import AgentBusy, AgentRequest, AgentStillRunning
from flowdb.bounded import BoundedRunner
from flowdb.db.budgets import Batch, BudgetChecks
from flowdb.db.claims import Claimed, ClaimStatements
from flowdb.db.clock import utcnow
from flowdb.db.connectivity import CommitUnknown, DatabaseUnavailable, Outage, first_line, is_conflict, refused_data
from flowdb.db.events import EventRow, EventWriter, event_row
from flowdb.db.instances import DefinitionCache, DefinitionUnloadable
from flowdb.db.progress import DueActions, Progress, ProgressStatements, ProgressWriter, template_context
from flowdb.db.subscriptions import SEND_TIMEOUT_SECONDS, NoticeStatements, Pending
from flowdb.db.tables import step_instances
from flowdb.db.workers import Capabilities, WorkerRegistry, quoted, unservable_agents
from flowdb.definitions import CompiledDefinition
from flowdb.engine import for_each
from flowdb.engine.for_each import ForEachStatements
from flowdb.errors import TemplateError, TemplateMemoryError
from flowdb.models import effective_retry
from flowdb.notifications import Notifier
from flowdb.notify import Waker
from flowdb.outcomes import Outcome
from flowdb.settings import FREE_RELEASES
from flowdb.steptypes.base import StepContext
from flowdb.steptypes.registry import STEP_TYPES

log = logging.getLogger("flowdb.worker")
T = TypeVar("T")


@dataclass
class WorkerOptions:
    concurrency: int = 64
    batch: int = 32
    lease_seconds: float = 30.0
    poll_seconds: float = 1.0
    grace_seconds: float = 10.0
    free_releases: int = FREE_RELEASES  # releases at shutdown not charged, per step
    # How long a worker that took a suspect over waits for its other steps to finish before it hands
    # the suspect back for another worker.
    suspect_wait_seconds: float = 60.0
    redis_url: str | None = None
    # host:pid:random, at most 200 characters (lease_owner and workers.name hold it)
    name: str = field(default_factory=lambda: f"{socket.gethostname()[:180]}:{os.getpid()}:{uuid.uuid4().hex[:6]}")
    instance_id: int | None = None  # work only this instance (flowdb run)
    # How often an idle worker looks for ready steps whose agent no running worker has (the first
    # look comes sooner, once a fleet started together has registered).
    unservable_check_seconds: float = 60.0
    # How often it looks for notices to subscribed agents to deliver (db/subscriptions.py).
    notice_poll_seconds: float = 1.0

    @property
    def heartbeat_seconds(self) -> float:
        return self.lease_seconds / 3


@dataclass
class Held:
    """A step whose lease this worker holds, and what runs it."""

    item: Claimed
    task: asyncio.Task[None] | None = None  # its handler; None when decided at claim, or not started yet
    deferred: bool = False  # a suspect taken over, not started: it waits until the worker holds nothing else

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


@dataclass
class InDoubt:
    """A cycle whose COMMIT lost its answer: what it recorded and claimed, until it is known whether it landed."""

    outcomes: list[Outcome]
    events: list[EventRow]
    token: str
    progress: Progress | None
    prepared: list[tuple[Claimed, StepContext | Outcome]]


Listener = Callable[[str, Any], None]
Prepared = list[tuple[Claimed, StepContext | Outcome]]


class Worker:
    def __init__(self, engine: Engine, agents: AgentRegistry, options: WorkerOptions | None = None,
                 listener: Listener | None = None, notifier: Notifier | None = None) -> None:
        self.engine = engine
        self.agents = agents
        self.notifier = notifier or Notifier.log_only()
        self.options = options or WorkerOptions()
        self.listener = listener or (lambda kind, data: None)
        dialect = engine.dialect.name
        # It claims only steps it can serve; the others wait for a worker that has their agent.
        limited = tuple((name, limits.concurrency, limits.tokens_per_minute) for name in agents.names()
                        if (limits := agents.limits(name)) != AgentLimits())
        self.capabilities = Capabilities(frozenset(agents.names()), frozenset(STEP_TYPES.names()), limited)
        self.claims = ClaimStatements(dialect, one_instance=self.options.instance_id is not None,
                                      serves=self.capabilities)
        self.registry = WorkerRegistry(dialect)
        self._registered = False
        self._next_unservable_check = 0.0
        self._unservable_logged: set[str] = set()  # the agents last named in the log
        self.writer = ProgressWriter(ProgressStatements(dialect))
        self.events = EventWriter(dialect)
        self.definitions = DefinitionCache()
        self.for_each = ForEachStatements(dialect)
        self.budgets = BudgetChecks(dialect)
        self.notices = NoticeStatements(dialect)
        self.renderer: BoundedRunner  # made by run(): its threads end with it
        self.inflight: dict[int, Held] = {}
        self.done: list[Outcome] = []
        self.unwritten: list[EventRow] = []  # events to write with the next transaction
        self.in_doubt: InDoubt | None = None
        self.suspect: Claimed | None = None  # a step taken over from a dead worker: it runs alone
        self.stopping = False
        self.abandoned = 0  # handlers left running: their step was released at shutdown or its lease lost
        self.sending: set[asyncio.Task[None]] = set()  # output actions being carried out
        self.outage = Outage(log)
        self._conn: Connection | None = None
        self._nudge: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._waker: Waker | None = None
        self._next_take_over = 0.0
        self._suspect_since = 0.0

    # -- public ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop claiming; finish or release what is held, then return from run()."""
        self.stopping = True
        for event in (self._nudge, self._stop):
            if event is not None:
                event.set()

    async def run(self, until: Callable[[], bool] | None = None) -> None:
        self._nudge = asyncio.Event()
        self._stop = asyncio.Event()
        self.renderer = BoundedRunner()
        # Plain-function agents run in threads: give every handler slot one (asyncio's default
        # pool has min(32, cpus + 4) threads, which would cap a 2-core worker at 6 agent calls).
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="flowdb-agent"))
        if self.options.redis_url:
            self._waker = Waker(self.options.redis_url, self._nudge.set)
            self._waker.start()
        opts = self.options
        notices = asyncio.create_task(self._notice_loop()) if self.capabilities.agents else None
        next_heartbeat = time.monotonic() + opts.heartbeat_seconds
        self._next_unservable_check = time.monotonic() + min(5.0, opts.unservable_check_seconds)
        try:
            while not self.stopping:
                if until is not None and until():
                    break
                try:
                    if not self._registered:
                        self._register()
                    if time.monotonic() >= next_heartbeat:
                        self._heartbeat()
                        self._keep_registered()
                        next_heartbeat = time.monotonic() + opts.heartbeat_seconds
                    free = self._free_slots()
                    take_over = self._take_over_due()
                    claimed = await self._cycle(free, take_over) \
                        if self.done or self.unwritten or self.in_doubt or free > 0 or take_over else []
                    self._start_or_hand_back_suspect()
                except DatabaseUnavailable as exc:
                    await self._pause(self.outage.failed(exc))
                    continue
                if until is not None and until():
                    break
                if claimed:
                    await asyncio.sleep(0)  # let the new handlers start
                    continue
                if not self.inflight and time.monotonic() >= self._next_unservable_check:
                    # Idle, so perhaps for want of an agent: look for steps nobody can serve (not
                    # while busy: the look reads every ready step, and a busy worker has work).
                    try:
                        self._warn_of_unservable()
                    except DatabaseUnavailable as exc:
                        await self._pause(self.outage.failed(exc))
                        continue
                if not self.done:
                    self._nudge.clear()
                    wait = min(opts.poll_seconds, max(next_heartbeat - time.monotonic(), 0.01))
                    try:
                        await asyncio.wait_for(self._nudge.wait(), timeout=wait)
                    except TimeoutError:
                        pass
            await self._shutdown()
            if notices is not None:
                notices.cancel()
                await self._deliver_notices(until=time.monotonic() + opts.grace_seconds)  # this run's last ones
        finally:
            if notices is not None:
                notices.cancel()
            self._unregister()
            self.renderer.close()
            if self._waker is not None:
                await self._waker.close()
            self._drop_connection()

    # -- database -------------------------------------------------------------------------------
    def _transaction(self, work: Callable[[Connection], T]) -> T:
        """Run work in one transaction.

        A transaction that lost to a concurrent one runs again at once. Data the database refuses
        (a value it cannot store) raises the DBAPIError for the caller to deal with. Anything else
        raises DatabaseUnavailable, for the caller to wait and try again: a database that does not
        answer, a full disk, a lock held past its timeout. When the connection was lost during the
        COMMIT, it raises CommitUnknown: the transaction may have landed."""
        for attempt in range(8):
            try:
                if self._conn is None:
                    self._conn = self.engine.connect()
            except (DBAPIError, PoolTimeout) as exc:
                raise DatabaseUnavailable(first_line(exc)) from exc
            worked = False
            try:
                with self._conn.begin():
                    value = work(self._conn)
                    worked = True
            except DBAPIError as exc:
                lost = exc.connection_invalidated or self._conn.invalidated
                if lost:
                    self._drop_connection()
                if refused_data(exc):
                    raise
                if is_conflict(exc) and attempt < 7:
                    log.info("transaction lost to a concurrent one (%s); running it again", first_line(exc))
                    time.sleep(min(0.01 * 2 ** attempt, 0.5))
                    continue
                if lost and worked:
                    raise CommitUnknown(first_line(exc)) from exc
                if lost and attempt == 0:  # a held connection that died while idle: one fresh try at once
                    continue
                raise DatabaseUnavailable(first_line(exc)) from exc
            self.outage.recovered()
            return value
        raise AssertionError("unreachable")

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # closing a connection to a server that is gone
                pass
            self._conn = None

    async def _pause(self, seconds: float) -> None:
        """Wait before trying the database again; a stop request cuts the wait short."""
        assert self._stop is not None
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # -- the cycle ------------------------------------------------------------------------------
    def _free_slots(self) -> int:
        if self.stopping or self.suspect is not None:  # a suspect runs alone: claim nothing meanwhile
            return 0
        opts = self.options
        return min(opts.concurrency - len(self.inflight) + len(self.done), opts.batch)

    def _take_over_due(self) -> bool:
        """Look for steps whose worker died at most once per poll interval, when holding no suspect."""
        return not self.stopping and self.suspect is None and time.monotonic() >= self._next_take_over

    async def _cycle(self, claim: int, take_over: bool = False) -> list[Claimed]:
        """One transaction: record the finished outcomes and write the waiting events, then take over
        one suspect or claim up to `claim` steps. On failure the outcomes and events are kept."""
        if self.in_doubt is not None:
            await self._resolve_doubt()
        outcomes, self.done = self.done, []
        unwritten, self.unwritten = self.unwritten, []
        definitions = self._definitions_for(outcomes)
        token = uuid.uuid4().hex
        opts = self.options
        box: list[tuple[Progress | None, Prepared]] = []

        def work(conn: Connection) -> None:
            if claim > 0 or take_over:
                self.claims.lock_agents(conn)  # before the outcomes' instance rows: one lock order
            progress = self.writer.apply(conn, outcomes, definitions) if outcomes else None
            self.events.write(conn, unwritten)
            suspect = self.claims.take_over_step(conn, opts.name, token, opts.lease_seconds, opts.instance_id) \
                if take_over else None
            if suspect is not None:
                claimed = [suspect]
            else:
                claimed = [] if claim <= 0 else self.claims.claim_steps(
                    conn, opts.name, token, claim, opts.lease_seconds, opts.instance_id)
            batch = Batch.of([item.id for item in claimed])
            box[:] = [(progress, [(item, self._prepare(conn, item, batch)) for item in claimed])]  # the last try's

        try:
            self._transaction(work)
        except CommitUnknown:
            self.in_doubt = InDoubt(outcomes, unwritten, token, *box[0])
            raise
        except BaseException as exc:
            self.done[:0] = outcomes
            self.unwritten[:0] = unwritten
            if isinstance(exc, DBAPIError):  # data the database refuses: find it, one row at a time
                await self._record_one_by_one(exc)
                return []
            raise
        progress, prepared = box[0]
        if take_over and not any(item.suspect for item, _ in prepared):
            self._next_take_over = time.monotonic() + opts.poll_seconds
        return await self._committed(outcomes, progress, prepared)

    async def _committed(self, outcomes: list[Outcome], progress: Progress | None, prepared: Prepared
                         ) -> list[Claimed]:
        """After a cycle's commit: what it recorded, then the steps it claimed."""
        if progress is not None:
            await self._recorded(outcomes, progress)
        starting: list[tuple[Held, StepContext]] = []
        for item, ready in prepared:
            held = Held(item)
            self.inflight[item.id] = held
            if isinstance(ready, Outcome):
                self.done.append(ready)
            elif item.suspect:
                held.deferred = True
                self.suspect = item
                self._suspect_since = time.monotonic()
            else:
                starting.append((held, ready))
        self._start(starting)
        if prepared:
            self.listener("claimed", [item for item, _ in prepared])
        return [item for item, _ in prepared]

    async def _resolve_doubt(self) -> None:
        """Find out whether the cycle whose COMMIT lost its answer landed (a transaction lands whole,
        so one witness tells): carry on from it if it did, else try its outcomes and events again."""
        doubt = self.in_doubt
        assert doubt is not None
        S = step_instances

        def landed(conn: Connection) -> bool:
            late = {id(o) for o in doubt.progress.late} if doubt.progress is not None else set()
            live = [o.step for o in doubt.outcomes if id(o) not in late]
            if live:  # recorded: the step no longer runs under the lease its outcome came with
                row = conn.execute(select(S.c.status, S.c.lease_token).where(S.c.id == live[0].id)).first()
                return row is None or (row.status, row.lease_token) != ("running", live[0].lease_token)
            if doubt.prepared:  # claimed: the step runs under the cycle's lease token
                first_claimed = doubt.prepared[0][0]
                return conn.execute(select(S.c.id).where(S.c.id == first_claimed.id,
                                                         S.c.lease_token == doubt.token)).first() is not None
            return False  # events alone: written again (at worst twice)

        answer = self._transaction(landed)
        self.in_doubt = None
        log.warning("a commit lost its answer when the database went away; it %s",
                    "had landed" if answer else "had not landed: trying again")
        if answer:
            await self._committed(doubt.outcomes, doubt.progress, doubt.prepared)
        else:
            self.done[:0] = doubt.outcomes
            self.unwritten[:0] = doubt.events

    async def _record_one_by_one(self, error: DBAPIError) -> None:
        """The database refused data in a batch: write each waiting event and record each outcome in
        a transaction of its own. An event it refuses is dropped (and logged); a step whose outcome it
        refuses fails without retry, so one bad value never stops the worker or its neighbours."""
        outcomes, self.done = self.done, []
        unwritten, self.unwritten = self.unwritten, []
        log.warning("the database refused a batch (%s); recording its %d outcome(s) and %d event(s) one at a time",
                    first_line(error), len(outcomes), len(unwritten))
        for index, row in enumerate(unwritten):
            try:
                self._transaction(lambda conn, row=row: self.events.write(conn, [row]))  # type: ignore[misc]
            except DatabaseUnavailable:
                self.unwritten[:0] = unwritten[index:]
                self.done[:0] = outcomes
                raise
            except DBAPIError as exc:
                log.error("dropped a %s event of instance %s the database refuses: %s", row["type"],
                          row["instance_id"], first_line(exc))
        for index, outcome in enumerate(outcomes):
            try:
                try:
                    await self._record_alone(outcome)
                except DBAPIError as exc:
                    await self._record_alone(Outcome(outcome.step, "failed", retryable=False, error=(
                        f"flowdb could not store this step's result: {first_line(exc)}")))
            except DatabaseUnavailable:
                self.done[:0] = outcomes[index:]
                raise
            except DBAPIError as exc:
                log.error("could not record step %s (instance %s) at all (%s); it runs again once its lease "
                          "expires", outcome.step.step_id, outcome.step.instance_id, first_line(exc))
                self._forget(outcome.step.id)

    async def _record_alone(self, outcome: Outcome) -> None:
        definitions = self._definitions_for([outcome])
        progress = self._transaction(lambda conn: self.writer.apply(conn, [outcome], definitions))
        await self._recorded([outcome], progress)

    def _prepare(self, conn: Connection, item: Claimed, batch: Batch | None = None) -> StepContext | Outcome:
        """Everything a handler needs, read in the claim's transaction; or the outcome already decided.
        Nothing here evaluates a user template (that happens after the commit, off the loop)."""
        try:
            definition = self.definitions.get(conn, item.definition_id)
        except DefinitionUnloadable as exc:
            return Outcome(item, "failed", retryable=False, error=str(exc))
        step = definition.steps[item.step_id]
        if item.exhausted:
            return Outcome(item, "failed", retryable=False, error=item.exhausted_reason(self.options.free_releases))
        refs = step.references
        context: dict[str, Any] = {}
        if refs.needs_context:
            context = template_context(conn, item.instance_id, definition,
                                       None if refs.dynamic_steps else refs.steps)
        if item.item is not None:  # one item of a for_each step
            context.update(item=item.item_value, index=item.item)
        gathered = self.for_each.load_items(conn, item.instance_id, item.step_id, item.round) \
            if item.woken and item.item is None and step.model.for_each is not None else None
        step_type = STEP_TYPES.get(item.type)
        # Budgets are checked in the claim's transaction, before the step starts (db/budgets.py).
        # (Not for a turn that goes on from a wait, such as a poll of a call already started.)
        verdict = self.budgets.check(conn, item, definition, step, batch) \
            if definition.has_budgets and step_type is not None and step_type.spends \
            and not (item.woken and step_type.goes_on(item)) else None
        loaded = step_type.load(conn, item, step) if step_type is not None and step_type.loads else None
        return StepContext(item, definition, step, context, self.agents, utcnow(), self.notifier, loaded,
                           items=gathered, budget=verdict)

    # -- running steps --------------------------------------------------------------------------
    def _start(self, starting: list[tuple[Held, StepContext]]) -> None:
        """Start the handlers of claimed steps. The steps with user expressions to evaluate go to the
        render thread in one trip; each handler waits only for its own step's render."""
        evaluating = [ctx for _, ctx in starting if _evaluates(ctx)]
        futures = iter(self.renderer.start_each([functools.partial(_render, ctx) for ctx in evaluating]))
        for held, ctx in starting:
            render = next(futures) if _evaluates(ctx) else None
            held.task = asyncio.create_task(self._execute(ctx, render))

    def _start_or_hand_back_suspect(self) -> None:
        """Start the suspect once every other step this worker held is recorded (from then on, the loss
        of this worker is the suspect's own: db/claims.py), with its context read afresh. If that takes
        longer than suspect_wait_seconds, give it back for another worker."""
        suspect = self.suspect
        if suspect is None:
            return
        held = self.inflight.get(suspect.id)
        if held is None or not held.deferred:
            return
        if len(self.inflight) == 1:
            def isolate(conn: Connection) -> StepContext | Outcome | None:
                return self._prepare(conn, suspect) if self.claims.isolate_step(conn, suspect) else None

            ready = self._transaction(isolate)
            held.deferred = False
            if ready is None:
                log.warning("lost the lease on suspect step %s (instance %s) before it started", suspect.step_id,
                            suspect.instance_id)
                self._forget(suspect.id)
            elif isinstance(ready, Outcome):
                self.done.append(ready)
            else:
                log.info("running step %s (instance %s) alone: its last worker stopped while running it",
                         suspect.step_id, suspect.instance_id)
                self._start([(held, ready)])
        elif time.monotonic() - self._suspect_since > self.options.suspect_wait_seconds:
            wait = self.options.suspect_wait_seconds
            self._transaction(lambda conn: self.claims.hand_back_step(
                conn, suspect, f"its worker's other steps did not finish within {wait:g} s"))
            log.info("handed step %s (instance %s) back: this worker's other steps did not finish within %g s, and "
                     "it must run alone", suspect.step_id, suspect.instance_id, wait)
            self._forget(suspect.id)
            self._next_take_over = time.monotonic() + wait  # let a freer worker take it

    async def _execute(self, ctx: StepContext, render: asyncio.Future[Any] | None) -> None:
        handler = STEP_TYPES.get(ctx.claimed.type)
        try:
            rendered = await render if render is not None else _render(ctx)
            if isinstance(rendered, Outcome):  # its condition is false
                outcome = rendered
            elif handler is None:
                outcome = Outcome(ctx.claimed, "failed", retryable=False,
                                  error=f"no handler for step type {ctx.claimed.type!r} in this flowdb")
            else:
                ctx.rendered = rendered
                outcome = await handler.run(ctx)
        except asyncio.CancelledError:
            raise
        except TemplateError as exc:  # a template failed or passed a limit: the next attempt would too
            outcome = Outcome(ctx.claimed, "failed", retryable=isinstance(exc, TemplateMemoryError),
                              error=f"step {ctx.claimed.step_id!r}: {exc}")
        except Exception as exc:  # a handler bug must not take the worker down
            log.exception("handler for %s crashed", ctx.claimed.step_id)
            outcome = Outcome(ctx.claimed, "failed", error=f"handler crashed: {type(exc).__name__}: {exc}")
        self.done.append(outcome)
        if self._nudge is not None:
            self._nudge.set()

    def _definitions_for(self, outcomes: list[Outcome]) -> dict[int, CompiledDefinition]:
        """The outcomes' definitions (loaded when their steps were claimed); sets retry delays."""
        definitions: dict[int, CompiledDefinition] = {}
        for outcome in outcomes:
            definition = self.definitions.cached(outcome.step.definition_id)
            definitions[outcome.step.definition_id] = definition
            if outcome.kind == "failed" and outcome.retryable:
                model = definition.steps[outcome.step.step_id].model
                policy = effective_retry(model)
                if policy is not None and (outcome.error_type or "StepFailed") in policy.non_retryable:
                    outcome.retryable = False  # retry.non_retryable: this kind of error fails at once
                outcome.retry_delay = policy.delay_after(outcome.step.attempt) if policy else 0.0
        return definitions

    def _forget(self, step_instance_id: int) -> None:
        """The step is no longer this worker's (recorded, lost, handed back)."""
        self.inflight.pop(step_instance_id, None)
        if self.suspect is not None and self.suspect.id == step_instance_id:
            self.suspect = None

    async def _recorded(self, outcomes: list[Outcome], progress: Progress) -> None:
        for outcome in outcomes:
            if self.suspect is not None and outcome.step.id == self.suspect.id:
                self._next_take_over = 0.0  # where one worker died, others' steps may wait too
            self._forget(outcome.step.id)
        for late in progress.late:
            if late.step.id in progress.cancelled:
                log.info("dropped the result of step %s (instance %s): the step was cancelled while it ran",
                         late.step.step_id, late.step.instance_id)
            else:
                log.warning("dropped the late result of step %s (instance %s): its lease was lost",
                            late.step.step_id, late.step.instance_id)
        if progress.actions:
            task = asyncio.create_task(self._carry_out(progress.actions))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)
        self.listener("progress", (outcomes, progress))
        if self._waker is not None:
            if progress.made_ready:
                await self._waker.publish()
            if outcomes:  # the batch wrote events: one message for the API's event streams
                await self._waker.publish_events()

    async def _carry_out(self, due: list[DueActions]) -> None:
        """Render finished instances' output actions (off the loop, under the limits), log or send
        them, and record each as an event with the next transaction."""
        jobs: list[Callable[[], list[RenderedAction]]] = [functools.partial(render_actions, d) for d in due]
        carried: list[RenderedAction] = []
        for actions, result in zip(due, await self.renderer.run_each(jobs), strict=True):
            if result.error is not None:  # the limits apply to an instance's actions together
                carried.append(RenderedAction(actions.instance_id, "error",
                                              f"output actions failed to render: {result.error}"))
            else:
                carried.extend(result.get())
        self.listener("actions", carried)
        for action in carried:
            self.unwritten.append(event_row(action.instance_id, *action.event()))
            if action.notice is None:
                log.log(logging.getLevelNamesMapping()[action.level.upper()], "[instance %s] %s",
                        action.instance_id, action.message)
                continue
            delivery = await self.notifier.send(action.notice)
            self.unwritten.append(event_row(action.instance_id, "action.notified", {
                "channel": delivery.channel, "ok": delivery.ok, "attempts": delivery.attempts,
                "error": delivery.error}))
        if self._nudge is not None:
            self._nudge.set()

    def _heartbeat(self) -> None:
        """Extend the leases of every step held; abandon (and record) those this worker lost."""
        held = [h.item for h in self.inflight.values()]
        if not held:
            return
        try:
            lost = self._transaction(lambda conn: self.claims.heartbeat_steps(conn, held, self.options.lease_seconds))
        except DBAPIError as exc:
            log.warning("heartbeat refused (%s); will try again", first_line(exc))
            return
        for step_instance_id, cancelled in lost.items():
            gone = self.inflight[step_instance_id]
            if cancelled:
                log.info("step %s (instance %s) was cancelled while it ran; its call is left to finish and its "
                         "result will be dropped", gone.item.step_id, gone.item.instance_id)
            else:
                log.warning("lost the lease on step %s (instance %s); abandoning it", gone.item.step_id,
                            gone.item.instance_id)
            if gone.task is not None and not gone.task.done():
                gone.task.cancel()  # a plain-function agent's thread runs on: the process must not wait for it
                self.abandoned += 1
            self.done = [o for o in self.done if o.step.id != step_instance_id]
            self._forget(step_instance_id)

    # -- notices to subscribed agents -----------------------------------------------------------
    async def _notice_loop(self) -> None:
        """Deliver the notices due to the agents this worker has, in the background (never in the way of
        a step: a failed or slow delivery is retried later, db/subscriptions.py)."""
        while not self.stopping:
            try:
                delivered = await self._deliver_notices()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a notice must never take the worker down
                log.warning("could not deliver notices to subscribed agents (%s); will try again", first_line(exc))
                delivered = 0
            if not delivered:
                await asyncio.sleep(self.options.notice_poll_seconds)

    async def _deliver_notices(self, until: float | None = None) -> int:
        """Take due notices and send each through its agent's backend; record how each went. Returns
        how many were taken. With `until`: keep going until none is due or the time has come."""
        agents = sorted(self.capabilities.agents)
        taken_in_all = 0
        while True:
            try:
                # One at a time: a notice is marked as being sent only while this worker sends it.
                taken = self._transaction(lambda conn: self.notices.take_due(conn, agents, 1,
                                                                             self.options.instance_id))
            except (DatabaseUnavailable, DBAPIError):
                return taken_in_all
            taken_in_all += len(taken)
            for notice in taken:
                error = await self._send_notice(notice)
                try:
                    self._transaction(lambda conn, n=notice, e=error: self.notices.record(conn, n, e))  # type: ignore[misc]
                except (DatabaseUnavailable, DBAPIError):
                    pass  # it is sent again once its sending time is up: at least once
            if not taken or until is None or time.monotonic() >= until:
                return taken_in_all

    async def _send_notice(self, notice: Pending) -> str | None:
        """Send one notice; None when the agent took it, else why not."""
        request = AgentRequest(agent=notice.agent, message=notice.message, instance_id=notice.instance_id,
                               step_id=notice.step_id, attempt=notice.tries, idempotency_key=f"notice:{notice.id}")
        try:
            await asyncio.wait_for(self.agents.get(notice.agent).call(request), timeout=SEND_TIMEOUT_SECONDS)
        except AgentStillRunning:
            return None  # the platform took it and works on it
        except AgentBusy as exc:
            return f"busy: {exc}"
        except TimeoutError:
            return f"no answer within {SEND_TIMEOUT_SECONDS:g}s"
        except Exception as exc:  # the agent's failure is the notice's, never the process's
            return f"{type(exc).__name__}: {exc}"
        return None

    # -- registration ---------------------------------------------------------------------------
    def _register(self) -> None:
        """Record this worker and what it serves (db/workers.py)."""
        opts = self.options
        self._transaction(lambda conn: self.registry.register(conn, opts.name, self.capabilities, opts.lease_seconds,
                                                              opts.instance_id))
        self._registered = True

    def _keep_registered(self) -> None:
        if not self._transaction(lambda conn: self.registry.refresh(conn, self.options.name,
                                                                    self.options.lease_seconds)):
            self._register()

    def _warn_of_unservable(self) -> None:
        """Name, in the log, the agents of ready steps that no running worker has (once per change)."""
        self._next_unservable_check = time.monotonic() + self.options.unservable_check_seconds
        waiting = self._transaction(lambda conn: unservable_agents(conn, self.options.instance_id))
        lacking = {agent: n for agent, n in waiting.items() if agent not in self.capabilities.agents}
        if lacking and set(lacking) != self._unservable_logged:
            log.warning("%d ready step(s) wait for agents no running worker has: %s; this worker has %s. "
                        "Start a worker whose agents file defines them (see the view v_unservable_steps)",
                        sum(lacking.values()), ", ".join(f"{agent!r} ({n})" for agent, n in lacking.items()),
                        quoted(self.capabilities.agents) or "no agents")
        self._unservable_logged = set(lacking)

    def _unregister(self) -> None:
        if not self._registered:
            return
        try:
            self._transaction(lambda conn: self.registry.stop(conn, self.options.name))
        except Exception as exc:  # best effort, in a finally: never hide why the worker stopped
            log.info("could not mark worker %s stopped (%s); its registration expires by itself",
                     self.options.name, first_line(exc))

    # -- shutdown -------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        """Let running handlers finish within the grace period, renewing their leases and recording
        what finishes as it does; then give back what is still running (a suspect that never
        started is handed back, not released)."""
        opts = self.options
        deadline = time.monotonic() + opts.grace_seconds
        try:
            self._heartbeat()  # steps cancelled while they ran are not waited for: their results would be dropped
        except DatabaseUnavailable as exc:
            self.outage.failed(exc)
        while True:
            tasks = [h.task for h in self.inflight.values() if h.task is not None and h.running] + list(self.sending)
            left = deadline - time.monotonic()
            if not tasks or left <= 0:
                break
            await asyncio.wait(tasks, timeout=min(left, opts.heartbeat_seconds))
            await self._record_before(deadline)
            try:
                self._heartbeat()
            except DatabaseUnavailable as exc:
                self.outage.failed(exc)
        self.abandoned += sum(h.running for h in self.inflight.values())
        await self._record_before(deadline)
        for held in self.inflight.values():
            if held.task is not None:
                held.task.cancel()
        deferred = [h.item for h in self.inflight.values() if h.deferred]
        leftover = [h.item for h in self.inflight.values() if not h.deferred]
        try:
            if deferred:
                self._transaction(lambda conn: [self.claims.hand_back_step(conn, item, "its worker stopped")
                                                for item in deferred])
            if leftover:
                released = self._transaction(lambda conn: self.claims.release_steps(conn, leftover,
                                                                                    opts.free_releases))
                log.info("released %d step(s) still running at shutdown", released)
        except DatabaseUnavailable as exc:
            log.error("could not give back %d step(s) at shutdown (%s); they run again once their leases expire",
                      len(deferred) + len(leftover), first_line(exc))
        self.inflight.clear()

    async def _record_before(self, deadline: float) -> None:
        """Record the finished outcomes (claiming nothing), trying until the deadline if the database is away."""
        while self.done or self.unwritten or self.in_doubt:
            try:
                await self._cycle(0)
                return
            except DatabaseUnavailable as exc:
                wait = self.outage.failed(exc)
                if time.monotonic() + wait > deadline:
                    log.error("could not record %d outcome(s) at shutdown: the database is unavailable; their steps "
                              "run again once their leases expire", len(self.done))
                    return
                await asyncio.sleep(wait)


def _evaluates(ctx: StepContext) -> bool:
    """Whether a claimed step has user expressions to evaluate (then its render goes to the render
    thread; otherwise its static texts are taken on the loop, which costs nothing)."""
    if for_each.is_own_row(ctx):
        return for_each.needs_render(ctx)
    return not _goes_on(ctx) and ctx.step.evaluates


def _goes_on(ctx: StepContext) -> bool:
    """A woken row whose turn goes on from where it waited: nothing to render (steptypes/base.py)."""
    step_type = STEP_TYPES.get(ctx.claimed.type)
    return ctx.claimed.woken and (step_type is None or step_type.goes_on(ctx.claimed))


def _render(ctx: StepContext) -> Any:
    """A step's condition, then its type's templates (in the render thread when they evaluate user
    expressions). A false condition gives the `skipped` outcome; a failing template raises TemplateError.
    A woken step (an approval's or a timer's later turn) renders nothing."""
    claimed, step = ctx.claimed, ctx.step
    own_row = for_each.is_own_row(ctx)
    if _goes_on(ctx) and not own_row:
        return None
    if step.condition is not None and claimed.item is None and not claimed.woken \
            and not step.condition.evaluate(ctx.templates):
        return Outcome(claimed, "skipped", output=None, error=None,
                       input={"condition": step.condition.source, "value": False})
    if own_row:  # a for_each step's own row expands its list, or gathers its items
        return for_each.decide(ctx)
    step_type = STEP_TYPES.get(claimed.type)
    return step_type.render(ctx) if step_type is not None and step_type.renders else None

