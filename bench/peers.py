"""Peer engines on flowdb's `chain` workload: N instances × 3 sequential noop steps (issue 3, section 4).

Each peer is written the way its documentation recommends and runs in its own spawned process (DBOS keeps
global state; every peer gets a fresh interpreter), against a scratch database that is dropped afterwards:

- DBOS Transact: one `@DBOS.workflow` calling three `@DBOS.step`s, each returning a small dict; N workflows
  started with `DBOS.start_workflow` and awaited with `handle.get_result()`. Timed from the first start to
  the last result, so the durable start of each workflow is inside the figure.
- procrastinate: three async tasks, each job defers the next (a → b → c); the N `a` jobs are deferred
  before the clock starts, then one worker (`run_worker_async`, concurrency 10) runs until all 3N jobs
  have succeeded.
- SpiffWorkflow: a BPMN process of three script tasks, N instances run one after the other in-process;
  the workflow is serialized to JSON after each script task (that is its durability cost) and kept in
  memory, so the figure is an upper bound for a Spiff application that also writes it somewhere.

    python bench/peers.py            # each peer's figure for 300 instances
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import multiprocessing
import os
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from typing import Any

import psycopg
from psycopg import sql

# The (name, kind) pairs the benchmark runs; kind is the database the peer keeps its state in.
PEERS: list[tuple[str, str]] = [
    ("dbos", "sqlite"),
    ("dbos", "postgresql"),
    ("procrastinate", "postgresql"),
    ("spiffworkflow", "memory"),
]
# Distribution names on PyPI (for importlib.metadata.version and the error message).
DISTRIBUTIONS = {"dbos": "dbos", "procrastinate": "procrastinate", "spiffworkflow": "SpiffWorkflow"}
# Server and maintenance database in which scratch databases `peer_<name>_<hex>` are created and dropped.
PG_ADMIN_URL = os.environ.get("FLOWDB_BENCH_PG_URL", "postgresql://127.0.0.1:5432/test")
TIMEOUT_SECONDS = 600.0
STEPS = 3
PROCRASTINATE_CONCURRENCY = 10


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (not installed, or it failed); the message says why."""


def run_peer(name: str, kind: str, instances: int) -> dict[str, Any]:
    """Run peer `name` on database `kind` ('sqlite'|'postgresql'|'memory') for `instances` chains of 3
    noop steps; returns {"peer", "kind", "version", "steps", "seconds", "steps_per_s"}."""
    if (name, kind) not in PEERS:
        raise ValueError(f"unknown peer {name}/{kind}; known: {PEERS}")
    try:
        version = importlib.metadata.version(DISTRIBUTIONS[name])
    except importlib.metadata.PackageNotFoundError:
        raise PeerUnavailable(f"{DISTRIBUTIONS[name]} is not installed (pip install -e '.[bench]')") from None
    with _database(name, kind) as url:
        steps, seconds = _in_subprocess(name, url, instances)
    return {"peer": name, "kind": kind, "version": version, "steps": steps, "seconds": seconds,
            "steps_per_s": steps / seconds}


# ---------------------------------------------------------------- isolation and scratch databases


@contextmanager
def _database(name: str, kind: str) -> Iterator[str]:
    """A fresh database URL for one run, removed afterwards ('' for the in-memory kind)."""
    if kind == "memory":
        yield ""
    elif kind == "sqlite":
        directory = tempfile.mkdtemp(prefix=f"peer_{name}_")
        try:
            yield f"sqlite:///{directory}/{name}.sqlite3"
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    else:
        database = f"peer_{name}_{uuid.uuid4().hex[:8]}"
        try:
            admin = psycopg.connect(PG_ADMIN_URL, autocommit=True)
        except psycopg.OperationalError as exc:
            raise PeerUnavailable(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {exc}") from exc
        with admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
            try:
                yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database
            finally:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


def _in_subprocess(name: str, url: str, instances: int) -> tuple[int, float]:
    """Run the peer in a fresh spawned interpreter; returns (steps, seconds) or raises PeerUnavailable."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, name, url, instances), name=f"peer-{name}")
    process.start()
    sender.close()
    try:
        if not receiver.poll(TIMEOUT_SECONDS):
            raise PeerUnavailable(f"{name} did not finish {instances} instances within {TIMEOUT_SECONDS:.0f}s")
        status, payload = receiver.recv()
    except EOFError:
        raise PeerUnavailable(f"{name}'s process died (exit code {process.exitcode})") from None
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
        receiver.close()
    if status != "ok":
        raise PeerUnavailable(f"{name} failed: {payload}")
    steps, seconds = payload
    return steps, seconds


def _child(sender: Connection, name: str, url: str, instances: int) -> None:
    try:
        sender.send(("ok", RUNNERS[name](url, instances)))
    except BaseException as exc:  # the parent raises PeerUnavailable; the traceback goes to stderr
        traceback.print_exc()
        sender.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        sender.close()


# ---------------------------------------------------------------- DBOS Transact


def _run_dbos(url: str, instances: int) -> tuple[int, float]:
    from dbos import DBOS, DBOSConfig

    @DBOS.step()
    def noop(step: int) -> dict[str, Any]:
        return {"step": step, "ok": True}

    @DBOS.workflow()
    def chain(instance: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for step in range(1, STEPS + 1):
            result = noop(step)
        return result

    config: DBOSConfig = {"name": "flowdb-peer-bench", "system_database_url": url, "log_level": "WARNING"}
    DBOS(config=config)
    DBOS.launch()
    try:
        started = time.perf_counter()
        handles = [DBOS.start_workflow(chain, instance) for instance in range(instances)]
        results = [handle.get_result() for handle in handles]
        seconds = time.perf_counter() - started
    finally:
        DBOS.destroy()
    if results != [{"step": STEPS, "ok": True}] * instances:
        raise RuntimeError("a DBOS workflow returned an unexpected result")
    return STEPS * instances, seconds


# ---------------------------------------------------------------- procrastinate


def _run_procrastinate(url: str, instances: int) -> tuple[int, float]:
    return asyncio.run(_procrastinate(url, instances))


async def _procrastinate(url: str, instances: int) -> tuple[int, float]:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="step_a")
    async def step_a(instance: int) -> dict[str, Any]:
        await step_b.defer_async(instance=instance)
        return {"step": "a", "ok": True}

    @app.task(name="step_b")
    async def step_b(instance: int) -> dict[str, Any]:
        await step_c.defer_async(instance=instance)
        return {"step": "b", "ok": True}

    @app.task(name="step_c")
    async def step_c(instance: int) -> dict[str, Any]:
        return {"step": "c", "ok": True}

    count = "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'succeeded'"
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        first_jobs: list[dict[str, Any]] = [{"instance": instance} for instance in range(instances)]
        await step_a.batch_defer_async(*first_jobs)
        started = time.perf_counter()
        worker = asyncio.create_task(app.run_worker_async(
            concurrency=PROCRASTINATE_CONCURRENCY, wait=True, install_signal_handlers=False))
        while (await app.connector.execute_query_one_async(count))["n"] < STEPS * instances:
            if worker.done():  # the worker stopped on its own: surface its error
                worker.result()
                raise RuntimeError("procrastinate's worker stopped before all jobs succeeded")
            await asyncio.sleep(0.01)
        seconds = time.perf_counter() - started
        worker.cancel()
        with suppress(asyncio.CancelledError):
            await worker
    return STEPS * instances, seconds


# ---------------------------------------------------------------- SpiffWorkflow

SPIFF_BPMN = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL" id="defs" targetNamespace="bench">
  <bpmn:process id="chain" isExecutable="true">
    <bpmn:startEvent id="start"/>
    <bpmn:scriptTask id="a"><bpmn:script>a = {"step": "a", "ok": True}</bpmn:script></bpmn:scriptTask>
    <bpmn:scriptTask id="b"><bpmn:script>b = {"step": "b", "ok": True}</bpmn:script></bpmn:scriptTask>
    <bpmn:scriptTask id="c"><bpmn:script>c = {"step": "c", "ok": True}</bpmn:script></bpmn:scriptTask>
    <bpmn:endEvent id="end"/>
    <bpmn:sequenceFlow id="f0" sourceRef="start" targetRef="a"/>
    <bpmn:sequenceFlow id="f1" sourceRef="a" targetRef="b"/>
    <bpmn:sequenceFlow id="f2" sourceRef="b" targetRef="c"/>
    <bpmn:sequenceFlow id="f3" sourceRef="c" targetRef="end"/>
  </bpmn:process>
</bpmn:definitions>
"""


def _run_spiffworkflow(url: str, instances: int) -> tuple[int, float]:
    from SpiffWorkflow.bpmn.parser import BpmnParser
    from SpiffWorkflow.bpmn.serializer import BpmnWorkflowSerializer
    from SpiffWorkflow.bpmn.specs.mixins import ScriptTaskMixin
    from SpiffWorkflow.bpmn.workflow import BpmnWorkflow
    from SpiffWorkflow.task import Task

    parser = BpmnParser()
    parser.add_bpmn_str(SPIFF_BPMN.encode())
    spec = parser.get_spec("chain")
    serializer = BpmnWorkflowSerializer()
    store: dict[int, str] = {}  # instance → its latest serialized state
    saves = 0

    def save(instance: int, workflow: BpmnWorkflow) -> Callable[[Task], None]:
        def did_complete_task(task: Task) -> None:
            nonlocal saves
            if isinstance(task.task_spec, ScriptTaskMixin):
                store[instance] = serializer.serialize_json(workflow)
                saves += 1
        return did_complete_task

    started = time.perf_counter()
    for instance in range(instances):
        workflow = BpmnWorkflow(spec)
        workflow.do_engine_steps(did_complete_task=save(instance, workflow))
        if not workflow.is_completed() or workflow.data.get("c") != {"step": "c", "ok": True}:
            raise RuntimeError(f"SpiffWorkflow instance {instance} did not complete")
    seconds = time.perf_counter() - started
    if saves != STEPS * instances:
        raise RuntimeError(f"expected {STEPS * instances} script tasks, saw {saves}")
    return STEPS * instances, seconds


RUNNERS: dict[str, Callable[[str, int], tuple[int, float]]] = {
    "dbos": _run_dbos,
    "procrastinate": _run_procrastinate,
    "spiffworkflow": _run_spiffworkflow,
}


if __name__ == "__main__":
    for peer, kind in PEERS:
        try:
            figure = run_peer(peer, kind, 300)
        except PeerUnavailable as exc:
            print(f"{peer:14} {kind:11} unavailable: {exc}")
            continue
        print(f"{peer:14} {kind:11} {figure['version']:8} {figure['steps']} steps in {figure['seconds']:.2f}s"
              f" = {figure['steps_per_s']:.0f} steps/s")
