"""Run template renders off the event loop, each within a time limit (and a memory limit).

    runner = BoundedRunner()                                  # one per worker; threads start on first use
    text = await runner.run(lambda: template.render(ctx))   # TemplateTimeout past limits().timeout_seconds
    results = await runner.run_each([f1, f2, f3])             # one trip for a batch; each its own deadline
    for r in results: r.get()                                # the value, or raises what that call raised

Calls run one after another on a dedicated thread, never on the event loop, which keeps running meanwhile
(the render thread gives up the GIL every few milliseconds like any Python thread). A watchdog thread
interrupts a call that passes its deadline by raising an exception inside it
(`PyThreadState_SetAsyncExc`); the caller gets a TemplateTimeout for that call and the thread goes on with the
next one. Python delivers such an exception between bytecodes, so a call stuck in C code cannot see it: if it
has not given up after `grace_seconds`, its thread is abandoned (a daemon, left to finish its C call and exit)
and a fresh thread takes the following calls. The sandbox in flowdb.expressions refuses the C-level operations
that could take long (huge repetitions, paddings, numbers), so abandoning is the last resort.

While one call runs longer than `poll_seconds`, the watchdog also reads the process's resident memory; a call
that grows it by more than `limits().max_memory_bytes` is interrupted the same way (Linux; elsewhere only time
is bounded).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from flowdb.errors import TemplateMemoryError, TemplateTimeout
from flowdb.expressions import limits

T = TypeVar("T")

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _Interrupt(BaseException):
    """Raised inside a call by the watchdog. A BaseException, so `except Exception` in the call cannot keep it."""


def _async_raise(thread_id: int, exc: type[BaseException]) -> None:
    """Make `exc` pending in the thread (raised at its next bytecode)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc))


def _absorb_pending() -> None:
    """Let an interrupt still pending for the calling thread land here, harmlessly.

    Never drop it with PyThreadState_SetAsyncExc(id, NULL): that leaves the interpreter's "an async
    exception is pending" signal set for good (only delivering the exception clears it), so every
    thread then takes the eval loop's slow path at every check, and an event loop running under a
    profiler never finishes. A pending exception is delivered at the next backward jump.
    """
    try:
        for _ in range(3):
            pass
    except _Interrupt:
        pass


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


@dataclass(slots=True)  # not frozen: one is built per call, and a frozen one is slower to build
class Result(Generic[T]):
    """What one call of a batch gave: its value, or the exception it raised (a TemplateTimeout past its limit)."""

    value: T | None = None
    error: BaseException | None = None

    def get(self) -> T:
        if self.error is not None:
            raise self.error
        return cast(T, self.value)


class _Job:
    __slots__ = ("cancelled", "deliver", "each", "fns", "next", "results", "skipped", "timeout")

    def __init__(self, fns: list[Callable[[], Any]], timeout: float,
                 deliver: Callable[[list[Result[Any]]], None],
                 each: Callable[[int, Result[Any]], None] | None = None) -> None:
        self.fns = fns
        self.timeout = timeout
        self.deliver = deliver
        self.each = each  # called with each call's result as soon as it has one
        self.results: list[Result[Any]] = [Result(error=RuntimeError("not run"))] * len(fns)
        self.next = 0
        self.cancelled = False
        self.skipped: set[int] = set()  # calls nobody waits for any more: not started, or interrupted

    def record(self, index: int, result: Result[Any]) -> None:  # under the runner's lock
        self.results[index] = result
        if self.each is not None:
            self.each(index, result)

    def dropped(self, index: int) -> bool:
        return self.cancelled or index in self.skipped


class _Item:
    __slots__ = ("deadline", "index", "job")

    def __init__(self, job: _Job, index: int, deadline: float) -> None:
        self.job = job
        self.index = index
        self.deadline = deadline


class _Worker:
    """One render thread and what the watchdog knows about it."""

    __slots__ = ("abandoned", "current", "ident", "interrupted", "interrupted_at", "thread")

    def __init__(self) -> None:
        self.current: _Item | None = None
        self.interrupted: str | None = None  # why the watchdog interrupted the current item: time, memory, cancelled
        self.interrupted_at = 0.0
        self.abandoned = False
        self.ident = 0
        self.thread: threading.Thread | None = None


class BoundedRunner:
    """Runs callables on a dedicated thread, one at a time, each interrupted past its time limit."""

    def __init__(self, *, grace_seconds: float = 0.5, poll_seconds: float = 0.01, name: str = "flowdb-render") -> None:
        self.grace_seconds = grace_seconds
        self.poll_seconds = poll_seconds
        self.name = name
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # render threads wait here for jobs
        # The watchdog sleeps on an event of its own and reads the render thread's state without the lock: a lock
        # the watchdog waits on would make every release by the render thread (twice a call) a wake-up.
        self._wake = threading.Event()
        self._jobs: deque[_Job] = deque()
        self._worker: _Worker | None = None
        self._watchdog: threading.Thread | None = None
        self._watch_idle = False
        self._closed = False
        self._abandoned = 0
        self._started = 0

    @property
    def abandoned_threads(self) -> int:
        """How many render threads were left behind stuck in C code (each one still held until its call returns)."""
        return self._abandoned

    async def run(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """fn() on the render thread; raises what it raised, or TemplateTimeout past `timeout`
        (default: limits().timeout_seconds)."""
        [result] = await self.run_each([fn], timeout)
        return result.get()

    async def run_each(self, fns: Sequence[Callable[[], T]], timeout: float | None = None) -> list[Result[T]]:
        """Each fn() in turn on the render thread, each with its own deadline; one Result per fn, in order.

        A call past its deadline gets a TemplateTimeout in its Result and the others run as usual. Cancelling
        the awaiting task interrupts the call running and skips the rest.
        """
        if not fns:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Result[T]]] = loop.create_future()

        def settle(results: list[Result[T]]) -> None:
            if not future.done():
                future.set_result(results)

        def deliver(results: list[Result[T]]) -> None:
            try:
                loop.call_soon_threadsafe(settle, results)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        job = self._submit(list(fns), timeout, deliver)
        try:
            return await future
        except asyncio.CancelledError:
            self._cancel(job)
            raise

    def start_each(self, fns: Sequence[Callable[[], T]], timeout: float | None = None) -> list[asyncio.Future[T]]:
        """Like `run_each`, with one future per call, each done as soon as its call is (so a slow call
        holds up only those who wait for it). Cancelling a future skips its call, or interrupts it if it
        runs. Call it on the event loop."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[T]] = [loop.create_future() for _ in fns]
        if not futures:
            return futures

        def settle(index: int, result: Result[T]) -> None:
            future = futures[index]
            if future.done():
                return
            if result.error is not None:
                future.set_exception(result.error)
            else:
                future.set_result(cast(T, result.value))

        def each(index: int, result: Result[Any]) -> None:
            try:
                loop.call_soon_threadsafe(settle, index, result)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        job = self._submit(list(fns), timeout, lambda results: None, each)

        def forget(index: int, future: asyncio.Future[T]) -> None:
            if future.cancelled():
                job.skipped.add(index)
                self._wake.set()

        for index, future in enumerate(futures):
            future.add_done_callback(lambda f, i=index: forget(i, f))  # type: ignore[misc]
        return futures

    def run_sync(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Like `run`, blocking the calling thread (never call it on the event loop)."""
        [result] = self.run_each_sync([fn], timeout)
        return result.get()

    def run_each_sync(self, fns: Sequence[Callable[[], T]], timeout: float | None = None) -> list[Result[T]]:
        """Like `run_each`, blocking the calling thread (never call it on the event loop)."""
        if not fns:
            return []
        done = threading.Event()
        box: list[list[Result[T]]] = []

        def deliver(results: list[Result[T]]) -> None:
            box.append(results)
            done.set()

        self._submit(list(fns), timeout, deliver)
        done.wait()
        return box[0]

    def close(self) -> None:
        """Let the threads end once the calls already submitted have run; later calls raise RuntimeError."""
        with self._lock:
            self._closed = True
            self._work.notify_all()
        self._wake.set()

    # -- The caller's side

    def _submit(self, fns: list[Callable[[], Any]], timeout: float | None,
                deliver: Callable[[list[Result[Any]]], None],
                each: Callable[[int, Result[Any]], None] | None = None) -> _Job:
        seconds = limits().timeout_seconds if timeout is None else timeout
        if seconds <= 0:
            raise ValueError(f"timeout must be positive, not {seconds!r}")
        job = _Job(fns, seconds, deliver, each)
        with self._lock:
            if self._closed:
                raise RuntimeError("the BoundedRunner is closed")
            if self._worker is None:
                self._start_worker()
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_loop, name=f"{self.name}-watchdog", daemon=True)
                self._watchdog.start()
            self._jobs.append(job)
            self._work.notify()
        return job

    def _cancel(self, job: _Job) -> None:
        job.cancelled = True
        self._wake.set()

    # -- The render thread

    def _start_worker(self) -> None:  # under the lock
        worker = _Worker()
        self._started += 1
        worker.thread = threading.Thread(target=self._thread_main, args=(worker,),
                                         name=f"{self.name}-{self._started}", daemon=True)
        self._worker = worker
        worker.thread.start()

    def _thread_main(self, me: _Worker) -> None:
        me.ident = threading.get_ident()
        while True:
            try:
                self._serve(me)
                with self._lock:
                    _absorb_pending()
                return
            except _Interrupt:  # landed outside the call it was meant for: record that call as interrupted
                item = me.current
                self._next(me, item, Result(error=self._interruption(me, item)) if item is not None else None,
                           take=False)

    def _serve(self, me: _Worker) -> None:
        item = self._next(me)
        while item is not None:
            try:
                result: Result[Any] = Result(value=item.job.fns[item.index]())
            except _Interrupt:
                result = Result(error=self._interruption(me, item))
            except BaseException as exc:  # handed to the caller, whatever it is
                result = Result(error=exc)
            item = self._next(me, item, result)

    def _next(self, me: _Worker, done: _Item | None = None, result: Result[Any] | None = None, *,
              take: bool = True) -> _Item | None:
        """Record `done`'s result, then take the next call (waiting for one); None when the thread should end.

        One lock for both, since this runs between every two calls. An interrupt that comes too late to matter
        is dropped here; if it lands in this method instead, the method runs again (recording is idempotent).
        """
        while True:
            try:
                with self._lock:
                    if done is not None and me.current is done and not me.abandoned:
                        done.job.record(done.index, cast(Result[Any], result))
                        me.current = None
                    if me.interrupted is not None and me.current is None:
                        _absorb_pending()
                        me.interrupted = None
                    return self._take(me) if take else None
            except _Interrupt:
                continue

    def _take(self, me: _Worker) -> _Item | None:  # under the lock
        while True:
            if me.abandoned:
                return None
            if self._jobs:
                job = self._jobs[0]
                while job.next < len(job.fns) and job.dropped(job.next):
                    job.next += 1
                if job.next >= len(job.fns):
                    self._jobs.popleft()
                    job.deliver(job.results)
                    continue
                item = _Item(job, job.next, time.monotonic() + job.timeout)
                job.next += 1
                me.current = item
                if self._watch_idle:
                    self._wake.set()
                return item
            if self._closed:
                return None
            self._work.wait()

    def _interruption(self, me: _Worker, item: _Item) -> BaseException:
        if me.interrupted == "memory":
            limit = limits().max_memory_bytes
            return TemplateMemoryError(f"the worker's memory grew by more than {limit / 2**20:,.0f} MiB while the "
                                       "template ran (FLOWDB_TEMPLATE_MAX_MEMORY_BYTES)")
        if me.interrupted == "cancelled":
            return asyncio.CancelledError()
        return TemplateTimeout(item.job.timeout)

    # -- The watchdog

    def _watch_loop(self) -> None:
        seen: _Item | None = None
        baseline: int | None = None
        while True:
            worker = self._worker
            item = worker.current if worker is not None else None
            if worker is None or item is None:
                if self._closed:
                    return
                self._watch_idle = True  # from here on the render thread wakes us when it starts a call
                if self._worker is None or self._worker.current is None:
                    self._wake.wait()
                self._wake.clear()
                self._watch_idle = False
                continue
            now = time.monotonic()
            if item is not seen:
                seen, baseline = item, None
            elif worker.interrupted is None:  # the same call still runs: has it grown the memory?
                resident = _resident_bytes()
                if baseline is None:
                    baseline = resident
                elif resident is not None and resident - baseline > limits().max_memory_bytes:
                    self._interrupt(worker, item, "memory", now)
            if worker.interrupted is None:
                if item.job.dropped(item.index):
                    self._interrupt(worker, item, "cancelled", now)
                elif now >= item.deadline:
                    self._interrupt(worker, item, "time", now)
            if worker.interrupted is not None and worker.current is item:
                if now >= worker.interrupted_at + self.grace_seconds:
                    self._abandon(worker, item)
                    continue
                wait = worker.interrupted_at + self.grace_seconds - now
            else:
                wait = item.deadline - now
            self._wake.wait(max(min(wait, self.poll_seconds), 0.0))
            self._wake.clear()

    def _interrupt(self, worker: _Worker, item: _Item, reason: str, now: float) -> None:
        with self._lock:
            if worker.current is item and worker.interrupted is None and not worker.abandoned:
                worker.interrupted = reason
                worker.interrupted_at = now
                _async_raise(worker.ident, _Interrupt)

    def _abandon(self, worker: _Worker, item: _Item) -> None:
        """The call did not give up (stuck in C code): leave its thread behind, go on with a fresh one."""
        with self._lock:
            if worker.current is not item or worker.abandoned:
                return
            worker.abandoned = True
            item.job.record(item.index, Result(error=self._interruption(worker, item)))
            worker.current = None
            self._abandoned += 1
            self._start_worker()
