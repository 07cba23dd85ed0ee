"""Real `flowdb worker` processes for the crash and concurrency tests, and polling helpers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from flowdb.db.tables import events, process_instances, step_instances

from helpers import AGENTS_FILE

FLOWDB = shutil.which("flowdb", path=str(Path(sys.executable).parent)) or "flowdb"


class Fleet:
    """Worker processes sharing one database; stderr of each goes to a file (never a pipe that fills)."""

    def __init__(self, env: dict[str, str], folder: Path, *args: str, agents: Path = AGENTS_FILE) -> None:
        self.env = env
        self.folder = folder
        self.args = args
        self.agents = agents
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def start(self, count: int = 1) -> list[int]:
        started = []
        for _ in range(count):
            index = len(self.procs)
            log = self.folder / f"worker-{index}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([FLOWDB, "worker", "--agents", str(self.agents), *self.args],
                                        env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
            self.procs.append(proc)
            self.logs[proc.pid] = log
            started.append(proc.pid)
        return started

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until every worker has logged that it started (so work is shared from the first step)."""
        wait_until(lambda: all("started on" in self.output(pid) for pid in self.pids), timeout,
                   "the workers to start", 0.05, self)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def output(self, pid: int) -> str:
        return self.logs[pid].read_text(errors="replace")

    def all_output(self) -> str:
        return "\n".join(f"--- worker {pid} ---\n{self.output(pid)}" for pid in self.logs)

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        next(p for p in self.procs if p.pid == pid).wait(10)

    def terminate(self, timeout: float = 30) -> dict[int, int | None]:
        """SIGTERM every live worker; wait for each; return pid → exit code (None: did not exit)."""
        live = [p for p in self.procs if p.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[int, int | None] = {}
        for proc in live:
            try:
                codes[proc.pid] = proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                codes[proc.pid] = None
        return codes

    def close(self) -> None:
        """Kill whatever still runs (for finally blocks)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
               fleet: Fleet | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if fleet is not None:
            dead = [p.pid for p in fleet.procs if p.poll() is not None and p.returncode != -signal.SIGKILL]
            assert not dead, f"worker(s) {dead} exited while waiting for {what}\n{fleet.all_output()[-5000:]}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}"
                                 + (f"\n{fleet.all_output()[-5000:]}" if fleet else ""))
        time.sleep(interval)


def instance_statuses(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(process_instances.c.status, func.count()).group_by(process_instances.c.status))
        return {status: count for status, count in rows}


def step_statuses(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(step_instances.c.status, func.count()).group_by(step_instances.c.status))
        return {status: count for status, count in rows}


def event_count(engine: Engine, kind: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(events.c.type == kind)).scalar_one())


def read_call_log(path: Path) -> list[tuple[str, int, str, int, int]]:
    """The `counted` agent's lines: (start|end, instance, step, attempt, pid)."""
    if not path.exists():
        return []
    calls = []
    for line in path.read_text().splitlines():
        kind, instance_id, step_id, attempt, pid = line.split()
        calls.append((kind, int(instance_id), step_id, int(attempt), int(pid)))
    return calls
