"""Redis wake-ups: with Redis an idle worker reacts at once; without it (or when it is gone) it polls."""

from __future__ import annotations

import asyncio
import time

from flowdb.agents.registry import AgentRegistry
from flowdb.notify import publish_sync
from flowdb.worker import Worker, WorkerOptions

from conftest import EXAMPLES, Database
from helpers import instance, start


async def _run_until_done(db: Database, worker: Worker, iid: int, limit: float) -> float:
    began = time.monotonic()

    def done() -> bool:
        return instance(db.engine, iid).status == "completed"

    await asyncio.wait_for(worker.run(until=done), limit)
    return time.monotonic() - began


def test_redis_wakes_an_idle_worker_long_before_its_poll(db: Database, redis_url: str) -> None:
    agents = AgentRegistry.from_file(EXAMPLES / "agents.yaml")
    # A poll interval of 20 s: only a wake-up can make this finish in a few seconds.
    worker = Worker(db.engine, agents, WorkerOptions(poll_seconds=20, lease_seconds=60, redis_url=redis_url))
    started: list[int] = []

    def done() -> bool:
        return bool(started) and instance(db.engine, started[0]).status == "completed"

    async def scenario() -> float:
        task = asyncio.create_task(asyncio.wait_for(worker.run(until=done), 15))
        await asyncio.sleep(0.5)  # the worker has polled once, found nothing, and is waiting
        began = time.monotonic()
        started.extend(start(db.engine, EXAMPLES / "simple-report.yaml"))
        publish_sync(redis_url)
        await task
        return time.monotonic() - began

    elapsed = asyncio.run(scenario())
    assert instance(db.engine, started[0]).status == "completed"
    assert elapsed < 10


def test_worker_without_reachable_redis_still_finishes_by_polling(db: Database) -> None:
    agents = AgentRegistry.from_file(EXAMPLES / "agents.yaml")
    worker = Worker(db.engine, agents, WorkerOptions(poll_seconds=0.1, redis_url="redis://127.0.0.1:1/0"))
    [iid] = start(db.engine, EXAMPLES / "simple-report.yaml")
    asyncio.run(_run_until_done(db, worker, iid, 30))
    assert instance(db.engine, iid).status == "completed"
