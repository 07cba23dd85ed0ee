"""Helpers for engine tests: deploy, start and work instances in-process against a real database."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from flowdb.agents.registry import AgentRegistry
from flowdb.db.instances import StartRequest, deploy, start_instances
from flowdb.db.tables import approvals, events, process_instances, step_instances
from flowdb.definitions import CompiledDefinition, load_definition_file, parse_definition
from flowdb.notifications import Notifier
from flowdb.worker import Worker, WorkerOptions

TESTS = Path(__file__).resolve().parent
AGENTS_FILE = TESTS / "agents.yaml"


def definition_from(text: str, name: str = "test.yaml") -> CompiledDefinition:
    return parse_definition(text, name)


def start(engine: Engine, definition: CompiledDefinition | str | Path, inputs: dict[str, Any] | None = None,
          count: int = 1) -> list[int]:
    if isinstance(definition, str) and "\n" in definition:
        definition = definition_from(definition)
    elif not isinstance(definition, CompiledDefinition):
        definition = load_definition_file(definition)
    with engine.begin() as conn:
        deployed = deploy(conn, definition)
        started = start_instances(conn, deployed.id, deployed.version, definition,
                                  [StartRequest(dict(inputs or {})) for _ in range(count)])
    return [instance_id for instance_id, _ in started]


def work(engine: Engine, agents_file: Path = AGENTS_FILE, *, timeout: float = 60.0,
         lease_seconds: float = 30.0, **options: Any) -> Worker:
    """Run one in-process worker until no instance is running (or timeout)."""
    agents = AgentRegistry.from_file(agents_file)
    worker = Worker(engine, agents, WorkerOptions(lease_seconds=lease_seconds, poll_seconds=0.05, **options))

    def all_done() -> bool:
        with engine.connect() as conn:
            return conn.execute(select(process_instances.c.id)
                                .where(process_instances.c.status == "running").limit(1)).first() is None

    async def go() -> None:
        await asyncio.wait_for(worker.run(until=all_done), timeout)

    asyncio.run(go())
    return worker


def instance(engine: Engine, instance_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(process_instances).where(process_instances.c.id == instance_id)).one()


def steps(engine: Engine, instance_id: int) -> dict[str, Any]:
    """Each step's own row of its latest round (what a step's state is)."""
    with engine.connect() as conn:
        rows = conn.execute(select(step_instances).where(step_instances.c.instance_id == instance_id,
                                                         step_instances.c.item.is_(None))
                            .order_by(step_instances.c.round)).all()
    return {row.step_id: row for row in rows}


def runs(engine: Engine, instance_id: int, step_id: str) -> list[Any]:
    """Every row of one step (rounds, items), in round and item order."""
    S = step_instances
    with engine.connect() as conn:
        return list(conn.execute(select(S).where(S.c.instance_id == instance_id, S.c.step_id == step_id)
                                 .order_by(S.c.round, S.c.item.is_not(None), S.c.item)).all())


def event_types(engine: Engine, instance_id: int) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(events.c.type).where(events.c.instance_id == instance_id)
                                 .order_by(events.c.id)).scalars())


def drive(engine: Engine, until: Callable[[], bool], agents_file: Path = AGENTS_FILE, timeout: float = 30.0,
          notifier: Notifier | None = None) -> Worker:
    """Run one in-process worker until `until()` holds."""
    worker = Worker(engine, AgentRegistry.from_file(agents_file), WorkerOptions(poll_seconds=0.05),
                    notifier=notifier)
    asyncio.run(asyncio.wait_for(worker.run(until=until), timeout))
    return worker


def approval_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(approvals).order_by(approvals.c.id)))


def waiting_for_decision(engine: Engine, count: int = 1) -> Callable[[], bool]:
    """`count` approvals, every one notified and its step parked (waiting)."""
    def check() -> bool:
        rows = approval_rows(engine)
        return len(rows) == count and all(r.notified_at is not None for r in rows) and all(
            steps(engine, r.instance_id)[r.step_id].status == "waiting" for r in rows)
    return check


@contextmanager
def background_worker(engine: Engine, agents_file: Path = AGENTS_FILE, seconds: float = 60.0) -> Iterator[Worker]:
    """An in-process worker in a thread while the block runs (the test acts on instances meanwhile)."""
    worker = Worker(engine, AgentRegistry.from_file(agents_file), WorkerOptions(poll_seconds=0.05))
    stop = threading.Event()
    deadline = time.monotonic() + seconds
    thread = threading.Thread(target=lambda: asyncio.run(worker.run(
        until=lambda: stop.is_set() or time.monotonic() > deadline)), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(30)


def until(check: Callable[[], Any], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)
