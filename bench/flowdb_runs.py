"""flowdb itself under load: real `flowdb worker` processes on a fresh database, measured from events.

Workers start first and idle; then all instances start in one transaction, so every worker sees the
work at once. Throughput runs from the first step.started event to the last step.completed event;
the hand-off latency of a step is its step.started time minus the latest step.completed time of
its parents (the database's clock writes both).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from bench.databases import REDIS_URL, scratch_database
from bench.workloads import STEPS_PER_INSTANCE, WORKLOADS
from flowdb.db import migrate
from flowdb.db.engine import make_engine
from flowdb.db.instances import StartRequest, deploy, start_instances
from flowdb.db.tables import events, process_instances, step_instances
from flowdb.definitions import CompiledDefinition, parse_definition
from flowdb.notify import publish_sync

HERE = Path(__file__).resolve().parent
POLL_SECONDS = 0.1


def run_flowdb(kind: str, workload: str, processes: int, redis: bool, instances: int,
               agent: str = "noop", spacing: float = 0.0, timeout: float = 300) -> dict[str, Any]:
    """`agent` is noop (a plain function: run in a thread) or noop_async (an async function).

    spacing = 0 starts every instance at once (throughput: hand-offs then include queueing behind
    the backlog); spacing > 0 starts them one by one, that many seconds apart, on idle workers
    (latency: a hand-off is then the wake-up and claim alone)."""
    definition = parse_definition(WORKLOADS[workload](agent), f"{workload}.yaml")
    with scratch_database(kind) as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDB_")}
        env.update(FLOWDB_DATABASE_URL=url, FLOWDB_POLL_SECONDS=str(POLL_SECONDS))
        if redis:
            env["FLOWDB_REDIS_URL"] = REDIS_URL
        exe = str(Path(sys.executable).parent / "flowdb")
        workers = [subprocess.Popen([exe, "worker", "--agents", str(HERE / "agents.yaml")], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for _ in range(processes)]
        try:
            time.sleep(1.5)  # every worker is up and idle
            if spacing:
                for _ in range(instances):
                    _start(engine, definition, 1, redis)
                    time.sleep(spacing)
            else:
                _start(engine, definition, instances, redis)
            _wait_done(engine, workers, timeout)
        finally:
            for proc in workers:
                proc.terminate()
            errors = [proc.communicate(timeout=60)[1] for proc in workers]
        result = _measure(engine, definition, instances * STEPS_PER_INSTANCE[workload])
        engine.dispose()
    if any("Traceback" in e or "database is locked" in e for e in errors):
        raise RuntimeError("a worker reported an error:\n" + "\n".join(errors)[-3000:])
    return {"engine": "flowdb", "kind": kind, "workload": workload, "processes": processes,
            "redis": redis, "instances": instances, "agent": agent, "spacing_s": spacing, **result}


def _start(engine: Engine, definition: CompiledDefinition, instances: int, redis: bool) -> None:
    with engine.begin() as conn:
        deployed = deploy(conn, definition)
        start_instances(conn, deployed.id, deployed.version, definition, [StartRequest({})] * instances)
    publish_sync(REDIS_URL if redis else None)


def _wait_done(engine: Engine, workers: list[subprocess.Popen[str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            left = conn.execute(select(func.count()).where(process_instances.c.status == "running")).scalar_one()
        if left == 0:
            return
        if any(proc.poll() is not None for proc in workers):
            raise RuntimeError("a worker exited during the run")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{left} instances still running after {timeout:g}s")
        time.sleep(0.1)


def _measure(engine: Engine, definition: CompiledDefinition, expected_steps: int) -> dict[str, Any]:
    query = (select(events.c.type, events.c.created_at, step_instances.c.instance_id, step_instances.c.step_id)
             .join(step_instances, step_instances.c.id == events.c.step_instance_id)
             .where(events.c.type.in_(["step.started", "step.completed"])))
    started: dict[tuple[int, str], Any] = {}
    completed: dict[tuple[int, str], Any] = {}
    with engine.connect() as conn:
        for kind, at, instance_id, step_id in conn.execute(query):
            target = started if kind == "step.started" else completed
            target.setdefault((instance_id, step_id), at)
        failed = conn.execute(select(func.count()).where(process_instances.c.status != "completed")).scalar_one()
        instance_started = dict(conn.execute(select(events.c.instance_id, events.c.created_at)
                                             .where(events.c.type == "instance.started")).tuples().all())
    if len(completed) != expected_steps or failed:
        raise RuntimeError(f"expected {expected_steps} completed steps, got {len(completed)} ({failed} bad instances)")
    first, last = min(started.values()), max(completed.values())
    seconds = (last - first).total_seconds()
    parents: dict[str, list[str]] = {sid: step.parents for sid, step in definition.steps.items()}
    handoffs = []  # parent completed -> child claimed
    wakeups = []  # instance started (by another process) -> its first step claimed by a worker
    for (instance_id, step_id), at in started.items():
        if parents[step_id]:
            ready = max(completed[(instance_id, p)] for p in parents[step_id])
            handoffs.append((at - ready).total_seconds() * 1000)
        else:
            wakeups.append((at - instance_started[instance_id]).total_seconds() * 1000)
    return {"steps": expected_steps, "seconds": round(seconds, 3), "steps_per_s": round(expected_steps / seconds),
            **_percentiles("handoff", handoffs), **_percentiles("wakeup", wakeups)}


def _percentiles(name: str, samples_ms: list[float]) -> dict[str, float | None]:
    if len(samples_ms) < 2:
        return {f"{name}_p50_ms": None, f"{name}_p99_ms": None}
    cuts = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {f"{name}_p50_ms": round(cuts[49], 2), f"{name}_p99_ms": round(cuts[98], 2)}
