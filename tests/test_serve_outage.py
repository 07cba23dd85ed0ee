"""`flowdb serve` through a PostgreSQL outage (issue 20, point 1): while the database is down every
endpoint that needs it answers 503 database-unavailable with Retry-After (never a 500), /healthz says
so, the server stays up, an open event stream stays open; once the database is back, requests succeed
again by themselves and the stream delivers what was committed since."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from flowdb.db.engine import database_unavailable, make_engine
from flowdb.tokens import create_token

from conftest import Database
from pgserver import PgServer
from servers import free_port

FLOWDB = shutil.which("flowdb", path=str(Path(sys.executable).parent)) or "flowdb"
ONE_STEP = """\
process:
  name: one-step
  steps:
    - {id: only, type: agent_task, agent: noop, message: "hi"}
"""
RECOVERY_SECONDS = 10  # "within a few seconds" of the database answering again; generous for a loaded machine
PROBLEM = "https://flowdb.dev/problems/database-unavailable"


class Serve:
    """A real `flowdb serve` process; its output goes to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([FLOWDB, "serve", "--port", str(self.port)], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class StreamReader(threading.Thread):
    """Reads /v1/events/stream and keeps the ids of the events it got."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, headers
        self.ids: list[int] = []
        self.opened = threading.Event()
        self.error: BaseException | None = None
        self.stop = False

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url + "/v1/events/stream", headers=self.headers,
                              timeout=httpx.Timeout(5, read=None)) as response:
                assert response.status_code == 200
                self.opened.set()
                for line in response.iter_lines():
                    if line.startswith("id:"):
                        self.ids.append(int(line[3:].strip()))
                    if self.stop:
                        return
        except BaseException as exc:
            self.error = exc


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["retry-after"] == "2"
    body: dict[str, Any] = response.json()
    assert (body["type"], body["title"], body["status"]) == (PROBLEM, "Service Unavailable", 503)
    assert body["detail"].startswith("the database is unavailable (") and body["detail"].endswith(
        "); retry in a few seconds"), body


def until_ok(call: Any, expected: int) -> httpx.Response:
    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        response: httpx.Response = call()
        if response.status_code == expected:
            return response
        assert response.status_code == 503, response.text  # still coming back: never a 500
        assert time.monotonic() < deadline, f"no {expected} within {RECOVERY_SECONDS} s: {response.text}"
        time.sleep(0.1)


@pytest.mark.slow
def test_serve_answers_503_while_postgresql_is_down_and_recovers(private_pg: PgServer, tmp_path: Path) -> None:
    _, token = create_token(private_pg.engine, "ops@company.com", "admin")
    auth = {"Authorization": f"Bearer {token}"}
    env = {**private_pg.cli_env(), "FLOWDB_API_STREAM_POLL_SECONDS": "0.1"}
    serve = Serve(env, tmp_path / "serve.log")
    reader = StreamReader(serve.url, auth)
    try:
        with httpx.Client(base_url=serve.url, headers=auth, timeout=30) as http:
            deployed = http.post("/v1/definitions", content=ONE_STEP, headers={"content-type": "application/yaml"})
            assert deployed.status_code == 201, deployed.text
            before = http.post("/v1/processes/one-step/instances", json={})
            assert before.status_code == 201, before.text
            reader.start()
            assert reader.opened.wait(10)

            private_pg.stop()
            for _ in range(3):  # again and again: the pool has no good connection, nothing recovers by luck
                assert_unavailable(http.get(f"/v1/instances/{before.json()['id']}"))
                assert_unavailable(http.get("/v1/instances"))
                assert_unavailable(http.post("/v1/processes/one-step/instances", json={}))
                assert_unavailable(http.post(f"/v1/instances/{before.json()['id']}/cancel"))
                assert_unavailable(http.get("/v1/events/stream"))
            health = http.get("/healthz")
            assert health.status_code == 503
            assert health.json()["status"] == "degraded" and health.json()["redis"] == "not configured"
            assert health.json()["database"] != "ok" and "\n" not in health.json()["database"]
            assert serve.proc.poll() is None and reader.is_alive() and reader.error is None

            private_pg.start()
            got = until_ok(lambda: http.get(f"/v1/instances/{before.json()['id']}"), 200)
            assert got.json()["status"] == "running"
            after = until_ok(lambda: http.post("/v1/processes/one-step/instances", json={}), 201)
            assert until_ok(lambda: http.get("/healthz"), 200).json() == {
                "status": "ok", "database": "ok", "redis": "not configured"}
            # The stream stayed open through the outage and delivers the events committed after it.
            deadline = time.monotonic() + RECOVERY_SECONDS
            with private_pg.engine.connect() as conn:
                expected = [row[0] for row in conn.exec_driver_sql(
                    f"SELECT id FROM events WHERE instance_id = {after.json()['id']} ORDER BY id")]
            while not set(expected) <= set(reader.ids):
                assert time.monotonic() < deadline and reader.error is None, (reader.ids, expected, reader.error)
                time.sleep(0.05)
            assert serve.proc.poll() is None
    finally:
        reader.stop = True
        serve.close()
    output = serve.output()
    assert "Traceback" not in output, output[-5000:]
    # Stopped by the test's SIGTERM only (uvicorn exits 0 or re-raises the signal, by version).
    assert serve.proc.returncode in (0, -signal.SIGTERM) and "Finished server process" in output, output[-5000:]
    # One warning for the outage, not one per request.
    assert output.count("the database is unavailable") == 1, output[-5000:]


def test_which_database_errors_mean_unavailable(db: Database, tmp_path: Path) -> None:
    """Real errors: a server that is not there is unavailable; a wrong statement or a broken rule is not."""
    def error_of(engine: Engine, sql: str) -> BaseException:
        with pytest.raises(SQLAlchemyError) as caught, engine.begin() as conn:
            conn.execute(text(sql))
        return caught.value

    assert not database_unavailable(error_of(db.engine, "SELECT * FROM no_such_table"))
    assert not database_unavailable(error_of(db.engine, "SELEC 1"))
    assert not database_unavailable(error_of(db.engine, "INSERT INTO process_definitions (id) VALUES (NULL)"))
    if db.kind == "postgresql":
        gone = make_engine(f"postgresql://flowdb@127.0.0.1:{free_port()}/nothing")
        assert database_unavailable(error_of(gone, "SELECT 1"))
        gone.dispose()
        terminated = error_of(db.engine, "SELECT pg_terminate_backend(pg_backend_pid())")
        assert database_unavailable(terminated)
        with db.engine.connect() as conn:  # the pool replaced the dead connection
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    else:
        unreachable = make_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.sqlite3'}")
        assert database_unavailable(error_of(unreachable, "SELECT 1"))
        unreachable.dispose()
