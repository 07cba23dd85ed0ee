"""Wake-ups over Redis pub/sub. Optional: without Redis (or when it goes away) workers just poll.

Two channels: CHANNEL ("flowdb:wake") tells idle workers that steps became ready; EVENTS_CHANNEL
("flowdb:events") tells the API's event streams that rows were added to the events table. A message
carries no data: the tables are the truth, a message only says "read them now".

Redis going away or hanging never holds anyone up for long: after a publish fails (or times out),
publishing is skipped for RETRY_SECONDS (Backoff; the workers' Waker and everything else share it),
with one warning per outage. Outside the worker loop a publish waits at most PUBLISH_TIMEOUT_SECONDS
(publish_sync, for one-shot commands), or not at all (BackgroundWakeups, for the API: a thread of
its own publishes, and wake-ups asked for meanwhile are sent once).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("flowdb.notify")
CHANNEL = "flowdb:wake"
EVENTS_CHANNEL = "flowdb:events"
RETRY_SECONDS = 5.0
PUBLISH_TIMEOUT_SECONDS = 0.25  # a publish from outside the worker loop (connect, send, reply)


class Backoff:
    """After Redis failed, leave it alone for RETRY_SECONDS: callers skip it meanwhile (and poll).

    Warns once per outage, not once per try. Shared by every publisher and listener in flowdb.
    """

    def __init__(self, what: str, seconds: float = RETRY_SECONDS) -> None:
        self.what = what  # the warning's tail: what happens meanwhile
        self.seconds = seconds
        self._down_until = 0.0
        self._warned = False

    def ready(self) -> bool:
        """Whether to try Redis now."""
        return time.monotonic() >= self._down_until

    def failed(self, exc: BaseException) -> None:
        if not self._warned:
            log.warning("Redis is not answering (%s); %s", exc, self.what)
            self._warned = True
        self._down_until = time.monotonic() + self.seconds

    def recovered(self) -> None:
        if self._warned:
            log.info("Redis answers again")
        self._down_until = 0.0
        self._warned = False


class _SyncPublisher:
    """One client (and its connection pool) per URL for the life of the process, with its back-off:
    a connection per publish would cost a TCP handshake on every start."""

    def __init__(self, redis_url: str) -> None:
        import redis

        self._errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(redis_url, socket_timeout=PUBLISH_TIMEOUT_SECONDS,
                                           socket_connect_timeout=PUBLISH_TIMEOUT_SECONDS)
        self.backoff = Backoff(f"wake-ups are skipped for {RETRY_SECONDS:g} s at a time until it is back; "
                               "workers and event streams find the work by polling")

    def publish(self, channel: str) -> None:
        if not self.backoff.ready():
            return
        try:
            self.client.publish(channel, b"1")
        except self._errors as exc:
            self.backoff.failed(exc)
        else:
            self.backoff.recovered()


@functools.lru_cache(maxsize=4)
def _sync_publisher(redis_url: str) -> _SyncPublisher:
    return _SyncPublisher(redis_url)


def publish_sync(redis_url: str | None) -> None:
    """Tell idle workers that steps became ready (used by code outside the worker loop)."""
    if redis_url:
        _sync_publisher(redis_url).publish(CHANNEL)


def publish_events_sync(redis_url: str | None) -> None:
    """Tell the API's event streams that events were committed (call after the commit)."""
    if redis_url:
        _sync_publisher(redis_url).publish(EVENTS_CHANNEL)


class Wakeups:
    """Where code outside the worker loop says what it committed: publishes at once (publish_sync)."""

    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url

    def notify(self, *, workers: bool = False, events: bool = False) -> None:
        """`workers`: steps became ready; `events`: events were committed (call after the commit)."""
        if workers:
            publish_sync(self.redis_url)
        if events:
            publish_events_sync(self.redis_url)

    def close(self) -> None:
        pass


class BackgroundWakeups(Wakeups):
    """Wake-ups handed to one thread of their own: notify() returns at once, whatever Redis does.

    Wake-ups asked for while the thread is busy are sent once, after (a message carries no data,
    so one says as much as many); none is lost. close() sends what is pending and stops the thread.
    """

    def __init__(self, redis_url: str | None) -> None:
        super().__init__(redis_url)
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._scheduled = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="flowdb-wakeups") if redis_url else None

    def notify(self, *, workers: bool = False, events: bool = False) -> None:
        if self._thread is None or not (workers or events):
            return
        with self._lock:
            self._pending |= {CHANNEL} if workers else set()
            self._pending |= {EVENTS_CHANNEL} if events else set()
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._thread.submit(self._send)
        except RuntimeError:  # closed: the process is stopping
            pass

    def _send(self) -> None:
        with self._lock:
            channels, self._pending, self._scheduled = self._pending, set(), False
        assert self.redis_url is not None  # no thread without a URL
        publisher = _sync_publisher(self.redis_url)
        for channel in (CHANNEL, EVENTS_CHANNEL):  # workers first: their wake-up starts work
            if channel in channels:
                publisher.publish(channel)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)


class Waker:
    """A worker's link to Redis: publish after commits that make steps ready, listen for others'."""

    def __init__(self, redis_url: str, on_wake: Callable[[], None]) -> None:
        import redis.asyncio as aredis

        self._aredis = aredis
        self.url = redis_url
        self.on_wake = on_wake
        self._client = aredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._backoff = Backoff("polling until it is back")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def publish(self) -> None:
        """Wake idle workers: steps became ready."""
        await self._publish(CHANNEL)

    async def publish_events(self) -> None:
        """Wake the API's event streams: events were committed."""
        await self._publish(EVENTS_CHANNEL)

    async def _publish(self, channel: str) -> None:
        if not self._backoff.ready():
            return
        try:
            await self._client.publish(channel, b"1")
        except (self._aredis.RedisError, OSError) as exc:
            self._backoff.failed(exc)

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self._client.pubsub()
                await pubsub.subscribe(CHANNEL)
                self._backoff.recovered()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.on_wake()
            except asyncio.CancelledError:
                raise
            except (self._aredis.RedisError, OSError) as exc:
                self._backoff.failed(exc)
                await asyncio.sleep(RETRY_SECONDS)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await self._client.aclose()
        except Exception:  # closing a connection to a Redis that is gone
            pass
