"""The worker loop: claim a batch → render its templates → run handlers concurrently → heartbeat →
record outcomes.

Stateless: kill it at any instant and its steps are taken over once their leases expire, as
suspects that run alone (db/claims.py, "Poison steps"). A database that goes away stops nothing:
the loop waits with a capped back-off, keeps the outcomes it has not recorded yet, and carries on
when the database is back. Database calls run on the loop's thread over one held connection (they
take well under a millisecond each; handing each to a thread would cost more than the call). User
templates never run on the loop or inside a transaction: a claimed batch's conditions and messages
are rendered in one trip to a bounded thread (flowdb/bounded.py), under the template limits.
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
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from flowdb.actions import RenderedAction, render_actions
from flowdb.agents.registry import AgentRegistry
from flowdb.bounded import BoundedRunner, Result
from flowdb.db.claims import FREE_RELEASES, Claimed, ClaimStatements
from flowdb.db.connectivity import DatabaseUnavailable, Outage, first_line, is_conflict
from flowdb.db.driver import as_json
from flowdb.db.engine import database_unavailable
from flowdb.db.instances import DefinitionCache
from flowdb.db.progress import DueActions, Progress, ProgressStatements, ProgressWriter, template_context
from flowdb.db.tables import process_instances
from flowdb.definitions import CompiledDefinition
from flowdb.errors import TemplateError
from flowdb.handlers import HANDLERS, LOADERS, RENDERERS, StepContext
from flowdb.models import effective_retry
from flowdb.notifications import Notifier
from flowdb.notify import Waker
from flowdb.outcomes import Outcome

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
    redis_url: str | None = None
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")
    instance_id: int | None = None  # work only this instance (flowdb run)

    @property
    def heartbeat_seconds(self) -> float:
        return self.lease_seconds / 3


@dataclass
class Held:
    """A step whose lease this worker holds, and what runs it."""

    item: Claimed
    task: asyncio.Task[None] | None = None  # its handler; None when decided at claim, or not started yet
    waiting: StepContext | None = None  # a suspect's context, until the worker is free to run it alone

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


Listener = Callable[[str, Any], None]


class Worker:
    def __init__(self, engine: Engine, agents: AgentRegistry, options: WorkerOptions | None = None,
                 listener: Listener | None = None, notifier: Notifier | None = None) -> None:
        self.engine = engine
        self.agents = agents
        self.notifier = notifier or Notifier.log_only()
        self.options = options or WorkerOptions()
        self.listener = listener or (lambda kind, data: None)
        dialect = engine.dialect.name
        self.claims = ClaimStatements(dialect, one_instance=self.options.instance_id is not None)
        self.writer = ProgressWriter(ProgressStatements(dialect))
        self.definitions = DefinitionCache()
        self.renderer = BoundedRunner()
        self.inflight: dict[int, Held] = {}
        self.done: list[Outcome] = []
        self.pending_events: list[dict[str, Any]] = []  # events to write with the next transaction
        self.suspect: Claimed | None = None  # a step taken over from a dead worker: it runs alone
        self.stopping = False
        self.finished: list[tuple[int, str]] = []
        self.abandoned = 0  # handlers left running: their step was released at shutdown or its lease lost
        self.sending: set[asyncio.Task[None]] = set()  # output actions being carried out
        self.outage = Outage(log)
        self._conn: Connection | None = None
        self._nudge: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._waker: Waker | None = None
        self._next_take_over = 0.0

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
        self.renderer = BoundedRunner()  # its threads end with this run
        # Plain-function agents run in threads: give every handler slot one (asyncio's default
        # pool has min(32, cpus + 4) threads, which would cap a 2-core worker at 6 agent calls).
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="flowdb-agent"))
        if self.options.redis_url:
            self._waker = Waker(self.options.redis_url, self._nudge.set)
            self._waker.start()
        opts = self.options
        next_heartbeat = time.monotonic() + opts.heartbeat_seconds
        try:
            while not self.stopping:
                if until is not None and until():
                    break
                if time.monotonic() >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + opts.heartbeat_seconds
                free = self._free_slots()
                take_over = self._take_over_due()
                try:
                    claimed = await self._cycle(free, take_over) \
                        if self.done or self.pending_events or free > 0 or take_over else []
                    self._start_suspect_when_alone()
                except DatabaseUnavailable as exc:
                    await self._pause(self.outage.failed(exc))
                    continue
                self.outage.recovered()
                if until is not None and until():
                    break
                if claimed:
                    await asyncio.sleep(0)  # let the new handlers start
                    continue
                if not self.done:
                    self._nudge.clear()
                    wait = min(opts.poll_seconds, max(next_heartbeat - time.monotonic(), 0.01))
                    try:
                        await asyncio.wait_for(self._nudge.wait(), timeout=wait)
                    except TimeoutError:
                        pass
            await self._shutdown()
        finally:
            self.renderer.close()
            if self._waker is not None:
                await self._waker.close()
            self._drop_connection()

    # -- database -------------------------------------------------------------------------------
    def _transaction(self, work: Callable[[Connection], T]) -> T:
        """Run work in one transaction; run it again at once when it lost to a concurrent one. A
        database that does not answer (or is locked past its timeout) raises DatabaseUnavailable:
        the caller waits and tries again."""
        for attempt in range(8):
            try:
                if self._conn is None:
                    self._conn = self.engine.connect()
            except (DBAPIError, PoolTimeout) as exc:
                raise DatabaseUnavailable(first_line(exc)) from exc
            try:
                with self._conn.begin():
                    return work(self._conn)
            except DBAPIError as exc:
                stale = exc.connection_invalidated or self._conn.invalidated
                if stale:
                    self._drop_connection()
                if database_unavailable(exc):
                    if stale and attempt == 0:  # a held connection that died while idle: one fresh try at once
                        continue
                    raise DatabaseUnavailable(first_line(exc)) from exc
                if not is_conflict(exc) or attempt == 7:
                    raise
                log.info("transaction lost to a concurrent one (%s); running it again", first_line(exc))
                time.sleep(min(0.01 * 2 ** attempt, 0.5))
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
        """One transaction: record the finished outcomes, then take over one suspect or claim up to
        `claim` steps. On any failure the outcomes are kept for the next try."""
        outcomes, self.done = self.done, []
        written, self.pending_events = self.pending_events, []
        definitions = self._definitions_for(outcomes)
        token = uuid.uuid4().hex
        opts = self.options

        def work(conn: Connection) -> tuple[Progress | None, list[tuple[Claimed, StepContext | Outcome]]]:
            progress = self.writer.apply(conn, outcomes, definitions) if outcomes else None
            self.claims.insert_events.executemany(conn, written)
            suspect = self.claims.take_over_step(conn, opts.name, token, opts.lease_seconds, opts.instance_id) \
                if take_over else None
            if suspect is not None:
                claimed = [suspect]
            else:
                claimed = [] if claim <= 0 else self.claims.claim_steps(
                    conn, opts.name, token, claim, opts.lease_seconds, opts.instance_id)
            return progress, [(item, self._prepare(conn, item)) for item in claimed]

        try:
            progress, prepared = self._transaction(work)
        except BaseException as exc:
            self.done[:0] = outcomes
            self.pending_events[:0] = written
            if isinstance(exc, DBAPIError) and outcomes:
                # Not an outage and not busy: perhaps a result the database refuses to store.
                await self._record_one_by_one(exc)
                return []
            raise
        if take_over and not any(item.suspect for item, _ in prepared):
            self._next_take_over = time.monotonic() + opts.poll_seconds
        if progress is not None:
            await self._recorded(outcomes, progress)
        starting: list[tuple[Held, StepContext]] = []
        for item, ready in prepared:
            held = Held(item)
            self.inflight[item.id] = held
            if isinstance(ready, Outcome):
                self.done.append(ready)
            elif item.suspect:
                held.waiting = ready
                self.suspect = item
            else:
                starting.append((held, ready))
        self._start(starting)
        if prepared:
            self.listener("claimed", [item for item, _ in prepared])
        return [item for item, _ in prepared]

    async def _record_one_by_one(self, error: DBAPIError) -> None:
        """A batch the database refused for another reason than an outage or a lock: record each
        outcome alone, and fail (without retry) a step whose own outcome cannot be stored, so one bad
        result never stops the worker or its neighbours."""
        outcomes, self.done = self.done, []
        log.warning("the database refused a batch of %d outcome(s) (%s); recording them one at a time",
                    len(outcomes), first_line(error))
        for index, outcome in enumerate(outcomes):
            try:
                try:
                    await self._record_alone(outcome)
                except DatabaseUnavailable:
                    raise
                except DBAPIError as exc:
                    await self._record_alone(Outcome(outcome.step, "failed", retryable=False, error=(
                        f"flowdb could not store this step's result: {first_line(exc)}")))
            except DatabaseUnavailable:
                self.done[:0] = outcomes[index:]
                raise
            except DBAPIError as exc:
                log.error("could not record step %s (instance %s) at all (%s); it runs again once its lease "
                          "expires", outcome.step.step_id, outcome.step.instance_id, first_line(exc))
                self.inflight.pop(outcome.step.id, None)

    async def _record_alone(self, outcome: Outcome) -> None:
        definitions = self._definitions_for([outcome])
        progress = self._transaction(lambda conn: self.writer.apply(conn, [outcome], definitions))
        await self._recorded([outcome], progress)

    def _prepare(self, conn: Connection, item: Claimed) -> StepContext | Outcome:
        """Everything a handler needs, read in the claim's transaction; or the outcome already decided.
        Nothing here evaluates a user template (that happens after the commit, off the loop)."""
        definition = self.definitions.get(conn, item.definition_id)
        step = definition.steps[item.step_id]
        if item.exhausted:
            return Outcome(item, "failed", retryable=False, error=item.exhausted_reason(self.options.free_releases))
        refs = step.references
        context: dict[str, Any] = {}
        if refs.needs_context:
            context = template_context(conn, item.instance_id, definition,
                                       None if refs.dynamic_steps else refs.steps)
        budget = definition.process.budget
        if budget is not None and item.type == "agent_task":
            spent = _instance_cost(conn, item.instance_id)
            if spent >= budget.max_cost_usd:
                return Outcome(item, "failed", retryable=False,
                               error=f"budget of ${budget.max_cost_usd:g} is spent (${spent:g}); step not started")
        load = LOADERS.get(item.type)
        loaded = load(conn, item) if load is not None else None
        return StepContext(item, definition, step, context, self.agents, datetime.now(UTC), self.notifier, loaded)

    # -- running steps --------------------------------------------------------------------------
    def _start(self, starting: list[tuple[Held, StepContext]]) -> None:
        """Start the handlers of claimed steps; their templates are rendered first, in one trip."""
        if not starting:
            return
        contexts = [ctx for _, ctx in starting]
        renders: asyncio.Future[list[Result[Any]]] | None = None
        if any(_renders(ctx) for ctx in contexts):
            jobs: list[Callable[[], Any]] = [functools.partial(_render, ctx) for ctx in contexts]
            renders = asyncio.ensure_future(self.renderer.run_each(jobs))
        for index, (held, ctx) in enumerate(starting):
            held.task = asyncio.create_task(self._execute(ctx, renders, index))

    def _start_suspect_when_alone(self) -> None:
        """Start the suspect once every other step this worker held is recorded: from then on, a
        crash of this worker is the suspect's own (db/claims.py)."""
        if self.suspect is None:
            return
        held = self.inflight.get(self.suspect.id)
        if held is None or held.waiting is None or len(self.inflight) > 1:
            return
        if not self._transaction(lambda conn: self.claims.isolate_step(conn, held.item)):
            log.warning("lost the lease on suspect step %s (instance %s) before it started",
                        held.item.step_id, held.item.instance_id)
            self.inflight.pop(held.item.id, None)
            self.suspect = None
            return
        log.info("running step %s (instance %s) alone: its last worker stopped while running it",
                 held.item.step_id, held.item.instance_id)
        ctx, held.waiting = held.waiting, None
        self._start([(held, ctx)])

    async def _execute(self, ctx: StepContext, renders: asyncio.Future[list[Result[Any]]] | None,
                       index: int) -> None:
        handler = HANDLERS.get(ctx.claimed.type)
        try:
            # Shielded: cancelling this step (its lease lost) must not cancel its batch-mates' renders.
            rendered = (await asyncio.shield(renders))[index].get() if renders is not None else _render(ctx)
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
            outcome = Outcome(ctx.claimed, "failed", retryable=False, error=f"step {ctx.claimed.step_id!r}: {exc}")
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
                outcome.retry_delay = policy.delay_after(outcome.step.attempt) if policy else 0.0
        return definitions

    async def _recorded(self, outcomes: list[Outcome], progress: Progress) -> None:
        for outcome in outcomes:
            self.inflight.pop(outcome.step.id, None)
            if self.suspect is not None and outcome.step.id == self.suspect.id:
                self.suspect = None
                self._next_take_over = 0.0  # where one worker died, others' steps may wait too
        for late in progress.late:
            log.warning("dropped the late result of step %s (instance %s): its lease was lost",
                        late.step.step_id, late.step.instance_id)
        if progress.actions:
            task = asyncio.create_task(self._carry_out(progress.actions))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)
        self.finished.extend(progress.finished_instances)
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
        done: list[RenderedAction] = []
        for actions, result in zip(due, await self.renderer.run_each(jobs), strict=True):
            if result.error is not None:  # the limits apply to an instance's actions together
                done.append(RenderedAction(actions.instance_id, "error",
                                           f"output actions failed to render: {result.error}"))
            else:
                done.extend(result.get())
        self.listener("actions", done)
        for action in done:
            kind, payload = action.event()
            self._event(action.instance_id, kind, payload)
            if action.notice is None:
                log.log(logging.getLevelNamesMapping()[action.level.upper()], "[instance %s] %s",
                        action.instance_id, action.message)
                continue
            delivery = await self.notifier.send(action.notice)
            self._event(action.instance_id, "action.notified", {
                "channel": delivery.channel, "ok": delivery.ok, "attempts": delivery.attempts, "error": delivery.error})
        if self._nudge is not None:
            self._nudge.set()

    def _event(self, instance_id: int, kind: str, payload: dict[str, Any]) -> None:
        self.pending_events.append({"instance_id": instance_id, "step_instance_id": None, "type": kind,
                                    "payload": as_json(payload)})

    def _heartbeat(self) -> None:
        """Extend the leases of every step held; abandon (and record) those this worker lost."""
        held = [h.item for h in self.inflight.values()]
        if not held:
            return
        try:
            lost = self._transaction(lambda conn: self.claims.heartbeat_steps(conn, held, self.options.lease_seconds))
        except DatabaseUnavailable as exc:
            self.outage.failed(exc)
            return
        except DBAPIError as exc:
            log.warning("heartbeat failed (%s); will try again", first_line(exc))
            return
        for step_instance_id in lost:
            gone = self.inflight.pop(step_instance_id)
            log.warning("lost the lease on step %s (instance %s); abandoning it", gone.item.step_id,
                        gone.item.instance_id)
            if gone.task is not None and not gone.task.done():
                gone.task.cancel()  # a plain-function agent's thread runs on: the process must not wait for it
                self.abandoned += 1
            self.done = [o for o in self.done if o.step.id != step_instance_id]
            if self.suspect is not None and self.suspect.id == step_instance_id:
                self.suspect = None

    # -- shutdown -------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        """Let running handlers finish within the grace period, renewing their leases and recording
        what finishes as it does; then give back what is still running."""
        opts = self.options
        deadline = time.monotonic() + opts.grace_seconds
        while True:
            tasks = [h.task for h in self.inflight.values() if h.task is not None and h.running] + list(self.sending)
            left = deadline - time.monotonic()
            if not tasks or left <= 0:
                break
            await asyncio.wait(tasks, timeout=min(left, opts.heartbeat_seconds))
            await self._record_before(deadline)
            self._heartbeat()
        self.abandoned += sum(h.running for h in self.inflight.values())
        await self._record_before(deadline)
        for held in self.inflight.values():
            if held.task is not None:
                held.task.cancel()
        leftover = [h.item for h in self.inflight.values()]
        if leftover:
            try:
                released = self._transaction(lambda conn: self.claims.release_steps(conn, leftover,
                                                                                    opts.free_releases))
                log.info("released %d step(s) still running at shutdown", released)
            except DatabaseUnavailable as exc:
                log.error("could not release %d step(s) at shutdown (%s); they run again once their leases expire",
                          len(leftover), first_line(exc))
        self.inflight.clear()

    async def _record_before(self, deadline: float) -> None:
        """Record the finished outcomes (claiming nothing), trying until the deadline if the database is away."""
        while self.done or self.pending_events:
            try:
                await self._cycle(0)
                self.outage.recovered()
                return
            except DatabaseUnavailable as exc:
                wait = self.outage.failed(exc)
                if time.monotonic() + wait > deadline:
                    log.error("could not record %d outcome(s) at shutdown: the database is unavailable; their steps "
                              "run again once their leases expire", len(self.done))
                    return
                await asyncio.sleep(wait)


def _renders(ctx: StepContext) -> bool:
    """Whether a claimed step has user expressions to evaluate (then its batch goes to the render
    thread; otherwise its static texts are taken on the loop, which costs nothing)."""
    return not ctx.claimed.woken and ctx.step.evaluates


def _render(ctx: StepContext) -> Any:
    """Runs in the render thread: the step's condition, then its type's templates. A false condition
    gives the `skipped` outcome; a failing template raises TemplateError."""
    claimed, step = ctx.claimed, ctx.step
    if step.condition is not None and not claimed.woken and not step.condition.evaluate(ctx.templates):
        return Outcome(claimed, "skipped", output=None, error=None,
                       input={"condition": step.condition.source, "value": False})
    render = RENDERERS.get(claimed.type)
    return render(ctx) if render is not None and not claimed.woken else None


def _instance_cost(conn: Connection, instance_id: int) -> float:
    return float(conn.execute(select(process_instances.c.cost_usd)
                              .where(process_instances.c.id == instance_id)).scalar_one())
