"""One quick figure until the real benchmark (issue 3): steps/s for 1,000 instances of a 3-step
noop chain, worked by N `flowdb worker` processes, measured from the events table
(first step.started → last step.completed).

    python bench/chain_once.py sqlite 3
    python bench/chain_once.py postgresql 3      # PostgreSQL on 127.0.0.1, database `test`
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, func, select, text

from flowdb.db import migrate
from flowdb.db.engine import make_engine
from flowdb.db.instances import StartRequest, deploy, start_instances
from flowdb.db.tables import events, process_instances
from flowdb.definitions import parse_definition

ROOT = Path(__file__).resolve().parent.parent
CHAIN = """
process:
  name: noop-chain
  steps:
    - {id: a, type: agent_task, agent: noop, message: "a"}
    - {id: b, type: agent_task, agent: noop, message: "b", depends_on: [a]}
    - {id: c, type: agent_task, agent: noop, message: "c", depends_on: [b]}
"""


def main(kind: str, workers: int, instances: int = 1000) -> None:
    if kind == "sqlite":
        url = f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"
    else:
        name = "flowdb_bench_" + uuid.uuid4().hex[:8]
        admin = create_engine("postgresql+psycopg://127.0.0.1/test", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        url = f"postgresql://127.0.0.1/{name}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    definition = parse_definition(CHAIN, "noop-chain.yaml")
    with engine.begin() as conn:
        deployed = deploy(conn, definition)
        start_instances(conn, deployed.id, deployed.version, definition, [StartRequest({})] * instances)
    env = {**os.environ, "FLOWDB_DATABASE_URL": url, "FLOWDB_POLL_SECONDS": "0.1"}
    exe = str(Path(sys.executable).parent / "flowdb")
    procs = [subprocess.Popen([exe, "worker", "--agents", str(ROOT / "tests" / "agents.yaml")], env=env,
                              stderr=subprocess.DEVNULL) for _ in range(workers)]
    try:
        while True:
            with engine.connect() as conn:
                left = conn.execute(select(func.count()).where(process_instances.c.status == "running")).scalar()
            if left == 0:
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
    with engine.connect() as conn:
        first = conn.execute(select(func.min(events.c.created_at)).where(events.c.type == "step.started")).scalar()
        last = conn.execute(select(func.max(events.c.created_at)).where(events.c.type == "step.completed")).scalar()
        steps = conn.execute(select(func.count()).where(events.c.type == "step.completed")).scalar_one()
    seconds = (last - first).total_seconds()
    print(f"{kind}: {workers} worker(s), {steps} steps in {seconds:.2f}s = {steps / seconds:.0f} steps/s")
    engine.dispose()
    if kind != "sqlite":
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
