"""Wake-ups over Redis pub/sub. Optional: without Redis (or when it goes away) workers just poll.

Two channels: CHANNEL ("flowdb:wake") tells idle workers that steps became ready; EVENTS_CHANNEL
("flowdb:events") tells the API's event streams that rows were added to the events table. A message
carries no data: the tables are the truth, a message only says "read them now".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("flowdb.notify")
CHANNEL = "flowdb:wake"
EVENTS_CHANNEL = "flowdb:events"
RETRY_SECONDS = 5.0


@functools.lru_cache(maxsize=4)
def _sync_client(redis_url: str) -> Any:
    import redis

    # One client (and its connection pool) per URL for the life of the process: a connection per
    # publish would cost a TCP handshake on every start.
    return redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)


def publish_sync(redis_url: str | None) -> None:
    """Tell idle workers that steps became ready (used by code outside the worker loop)."""
    _publish(redis_url, CHANNEL, "workers will find the work by polling")


def publish_events_sync(redis_url: str | None) -> None:
    """Tell the API's event streams that events were committed (call after the commit)."""
    _publish(redis_url, EVENTS_CHANNEL, "event streams will find the events by polling")


def _publish(redis_url: str | None, channel: str, fallback: str) -> None:
    if not redis_url:
        return
    import redis

    try:
        _sync_client(redis_url).publish(channel, b"1")
    except (redis.RedisError, OSError) as exc:
        log.warning("could not publish to Redis channel %s (%s); %s", channel, exc, fallback)


class Waker:
    """A worker's link to Redis: publish after commits that make steps ready, listen for others'."""

    def __init__(self, redis_url: str, on_wake: Callable[[], None]) -> None:
        import redis.asyncio as aredis

        self._aredis = aredis
        self.url = redis_url
        self.on_wake = on_wake
        self._client = aredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._down_until = 0.0
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
        if time.monotonic() < self._down_until:
            return
        try:
            await self._client.publish(channel, b"1")
        except (self._aredis.RedisError, OSError) as exc:
            self._went_away(exc)

    def _went_away(self, exc: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("Redis is not answering (%s); polling until it is back", exc)
        self._down_until = time.monotonic() + RETRY_SECONDS

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self._client.pubsub()
                await pubsub.subscribe(CHANNEL)
                self._down_until = 0.0
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.on_wake()
            except asyncio.CancelledError:
                raise
            except (self._aredis.RedisError, OSError) as exc:
                self._went_away(exc)
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
