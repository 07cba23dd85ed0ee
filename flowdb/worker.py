"""The worker loop: claim a batch → run handlers concurrently → heartbeat → record outcomes.

Stateless: kill it at any instant and its steps are claimed again once their leases expire.
Database calls run on the loop's thread over one held connection (they take well under a
millisecond each; handing each to a thread would cost more than the call).
"""

from __future__ import annotations

import asyncio
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

from sqlalchemy import Connection, Engine, insert
from sqlalchemy.exc import DBAPIError, OperationalError

from flowdb.agents.registry import AgentRegistry
from flowdb.db.claims import Claimed, ClaimStatements
from flowdb.db.instances import DefinitionCache
from flowdb.db.progress import Progress, ProgressStatements, ProgressWriter, template_context
from flowdb.db.tables import events
from flowdb.definitions import CompiledDefinition
from flowdb.errors import TemplateError
from flowdb.handlers import HANDLERS, LOADERS, StepContext
from flowdb.models import effective_retry
from flowdb.notifications import Notice, Notifier
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
    redis_url: str | None = None
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")
    instance_id: int | None = None  # work only this instance (flowdb run)


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
        self.inflight: dict[int, tuple[Claimed, asyncio.Task[None] | None]] = {}
        self.done: list[Outcome] = []
        self.stopping = False
        self.finished: list[tuple[int, str]] = []
        self.abandoned = 0  # handlers still running when shutdown released their steps
        self.sending: set[asyncio.Task[None]] = set()  # output-action notices on their way
        self._conn: Connection | None = None
        self._nudge: asyncio.Event | None = None
        self._waker: Waker | None = None

    # -- public ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop claiming; finish or release what is held, then return from run()."""
        self.stopping = True
        if self._nudge is not None:
            self._nudge.set()

    async def run(self, until: Callable[[], bool] | None = None) -> None:
        self._nudge = asyncio.Event()
        # Plain-function agents run in threads: give every handler slot one (asyncio's default
        # pool has min(32, cpus + 4) threads, which would cap a 2-core worker at 6 agent calls).
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="flowdb-agent"))
        if self.options.redis_url:
            self._waker = Waker(self.options.redis_url, self._nudge.set)
            self._waker.start()
        opts = self.options
        next_heartbeat = time.monotonic() + opts.lease_seconds / 3
        try:
            while not self.stopping:
                if until is not None and until():
                    break
                if time.monotonic() >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + opts.lease_seconds / 3
                # Slots free once the finished outcomes are recorded: record them and claim the
                # next batch in one transaction.
                free = min(opts.concurrency - len(self.inflight) + len(self.done), opts.batch)
                claimed = await self._cycle(free) if self.done or free > 0 else []
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
            if self._waker is not None:
                await self._waker.close()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- database -------------------------------------------------------------------------------
    def _transaction(self, work: Callable[[Connection], T]) -> T:
        """Run work in a transaction; retry what the database says is transient."""
        for attempt in range(8):
            if self._conn is None:
                self._conn = self.engine.connect()
            try:
                with self._conn.begin():
                    return work(self._conn)
            except (OperationalError, DBAPIError) as exc:
                if not _transient(exc) or attempt == 7:
                    raise
                log.warning("database busy (%s); retrying", str(exc.orig).strip().splitlines()[0])
                if exc.connection_invalidated:
                    self._conn.close()
                    self._conn = None
                time.sleep(min(0.05 * 2 ** attempt, 2.0))
        raise AssertionError("unreachable")

    async def _cycle(self, claim: int) -> list[Claimed]:
        """One transaction: record the finished outcomes, then claim up to `claim` steps."""
        outcomes, self.done = self.done, []
        definitions = self._definitions_for(outcomes)
        token = uuid.uuid4().hex
        opts = self.options

        def work(conn: Connection) -> tuple[Progress | None, list[tuple[Claimed, StepContext | Outcome]]]:
            progress = self.writer.apply(conn, outcomes, definitions) if outcomes else None
            claimed = [] if claim <= 0 else self.claims.claim_steps(
                conn, opts.name, token, claim, opts.lease_seconds, opts.instance_id)
            return progress, [(item, self._prepare(conn, item)) for item in claimed]

        progress, prepared = self._transaction(work)
        if progress is not None:
            await self._recorded(outcomes, progress)
        for item, ready in prepared:
            if isinstance(ready, Outcome):
                self.inflight[item.id] = (item, None)
                self.done.append(ready)
            else:
                self.inflight[item.id] = (item, asyncio.create_task(self._execute(ready)))
        if prepared:
            self.listener("claimed", [item for item, _ in prepared])
        return [item for item, _ in prepared]

    def _prepare(self, conn: Connection, item: Claimed) -> StepContext | Outcome:
        """Everything a handler needs, read in the claim's transaction; or the outcome already decided."""
        definition = self.definitions.get(conn, item.definition_id)
        step = definition.steps[item.step_id]
        if item.expired_lease and item.attempt > item.max_attempts:
            return Outcome(item, "failed", error=f"{item.expired_lease}; no attempts left "
                           f"({item.max_attempts} allowed)", retryable=False)
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
        if step.condition is not None and not item.woken:
            try:
                if not step.condition.evaluate(context):
                    return Outcome(item, "skipped", output=None, error=None,
                                   input={"condition": step.condition.source, "value": False})
            except TemplateError as exc:
                return Outcome(item, "failed", error=str(exc), retryable=False)
        load = LOADERS.get(item.type)
        loaded = load(conn, item) if load is not None else None
        return StepContext(item, definition, step, context, self.agents, datetime.now(UTC), self.notifier, loaded)

    async def _execute(self, ctx: StepContext) -> None:
        handler = HANDLERS.get(ctx.claimed.type)
        try:
            if handler is None:
                outcome = Outcome(ctx.claimed, "failed", retryable=False,
                                  error=f"no handler for step type {ctx.claimed.type!r} in this flowdb")
            else:
                outcome = await handler.run(ctx)
        except asyncio.CancelledError:
            raise
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

    async def _flush(self) -> None:
        """Record the finished outcomes without claiming (shutdown)."""
        outcomes, self.done = self.done, []
        definitions = self._definitions_for(outcomes)
        progress = self._transaction(lambda conn: self.writer.apply(conn, outcomes, definitions))
        await self._recorded(outcomes, progress)

    async def _recorded(self, outcomes: list[Outcome], progress: Progress) -> None:
        for outcome in outcomes:
            self.inflight.pop(outcome.step.id, None)
        for late in progress.late:
            log.warning("dropped the late result of step %s (instance %s): its lease was lost",
                        late.step.step_id, late.step.instance_id)
        for instance_id, level, message in progress.action_logs:
            log.log(logging.getLevelNamesMapping()[level.upper()], "[instance %s] %s", instance_id, message)
        for instance_id, notice in progress.action_notices:
            task = asyncio.create_task(self._send_action_notice(instance_id, notice))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)
        self.finished.extend(progress.finished_instances)
        self.listener("progress", (outcomes, progress))
        if self._waker is not None:
            if progress.made_ready:
                await self._waker.publish()
            if outcomes:  # the batch wrote events: one message for the API's event streams
                await self._waker.publish_events()

    async def _send_action_notice(self, instance_id: int, notice: Notice) -> None:
        """An output action's notice, sent after its instance's end was committed (best effort: a
        worker killed in between does not send it; the `action.notify` event shows it was due)."""
        delivery = await self.notifier.send(notice)
        payload = {"channel": delivery.channel, "ok": delivery.ok, "attempts": delivery.attempts,
                   "error": delivery.error}
        try:
            self._transaction(lambda conn: conn.execute(
                insert(events).values(instance_id=instance_id, type="action.notified", payload=payload,
                                      created_at=self.claims.clock.now)))
        except (OperationalError, DBAPIError) as exc:
            log.warning("could not record the delivery of a notice for instance %s: %s", instance_id, exc.orig)

    def _heartbeat(self) -> None:
        held = [item for item, task in self.inflight.values() if task is not None and not task.done()]
        if not held:
            return
        try:
            lost = self._transaction(lambda conn: self.claims.heartbeat_steps(conn, held, self.options.lease_seconds))
        except (OperationalError, DBAPIError) as exc:
            log.warning("heartbeat failed (%s); will try again", exc.orig)
            return
        for step_instance_id in lost:
            item, task = self.inflight.pop(step_instance_id)
            log.warning("lost the lease on step %s (instance %s); abandoning it", item.step_id, item.instance_id)
            if task is not None:
                task.cancel()

    async def _shutdown(self) -> None:
        tasks = [task for _, task in self.inflight.values() if task is not None and not task.done()]
        tasks += list(self.sending)
        if tasks:
            await asyncio.wait(tasks, timeout=self.options.grace_seconds)
            self.abandoned = sum(not task.done() for task in tasks)
        if self.done:
            await self._flush()
        leftover = [item for item, task in self.inflight.values()]
        for _, task in self.inflight.values():
            if task is not None:
                task.cancel()
        if leftover:
            released = self._transaction(lambda conn: self.claims.release_steps(conn, leftover))
            log.info("released %d step(s) still running at shutdown", released)
        self.inflight.clear()


def _instance_cost(conn: Connection, instance_id: int) -> float:
    from sqlalchemy import select

    from flowdb.db.tables import process_instances

    return float(conn.execute(select(process_instances.c.cost_usd)
                              .where(process_instances.c.id == instance_id)).scalar_one())


def _transient(exc: DBAPIError) -> bool:
    text = str(exc.orig).lower()
    return (exc.connection_invalidated or "database is locked" in text or "deadlock detected" in text
            or "could not serialize" in text or "busy" in text)
