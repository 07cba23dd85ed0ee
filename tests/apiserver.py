"""The HTTP API on a real uvicorn server (127.0.0.1, a free port, a background thread) for tests.

    with serve(app) as url: ...                    # any ASGI app
    with api_for(db, redis_url=...) as api: ...   # the flowdb API over a test database, settings overridden
    def test_x(api_server: ApiServer) -> None:     # the same as a fixture, default settings
        httpx.get(api_server.url + "/v1/...", headers=api_server.auth("operator"))
    with serve_process(db.cli_env(), log, preexec_fn=...) as served: ...  # `flowdb serve` as its own process
    with client(api_server, "approver", "a@b.c") as http: assert_problem(http.get(...), 404, "does not exist")
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvicorn
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.types import ASGIApp

from flowdb.settings import Settings
from flowdb.tokens import create_token
from flowdb_api.app import create_app

if TYPE_CHECKING:  # conftest loads this module as a plugin: no import back at run time
    from conftest import Database

START_SECONDS = 10.0
STOP_SECONDS = 10.0


@contextmanager
def serve(app: ASGIApp, *, graceful_seconds: int = 2) -> Iterator[str]:
    """Run `app` under uvicorn until the block ends; yields the base URL (http://127.0.0.1:PORT).

    Streams still open at the end are cut after `graceful_seconds`.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; the socket is handed over, so no race
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_seconds,
                            access_log=False)
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported to the test thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_SECONDS
    while not server.started:
        if failure or not thread.is_alive():
            sock.close()
            raise RuntimeError(f"the test API server did not start: {failure[0] if failure else 'it exited'}")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the test API server did not start within {START_SECONDS:g} s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(STOP_SECONDS)
        sock.close()
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_SECONDS)
            raise RuntimeError("the test API server did not stop")


@dataclass
class ApiServer:
    url: str
    engine: Engine
    settings: Settings
    app: Starlette  # app.state: engine, settings, openapi (and what routes keep there)

    def token(self, role: str = "operator", identity: str | None = None) -> str:
        """A new bearer token for `identity` (default: `<role>@example.com`) with `role`."""
        _, token = create_token(self.engine, identity or f"{role}@example.com", role)
        return token

    def auth(self, role: str = "operator", identity: str | None = None) -> dict[str, str]:
        """Authorization headers with a new token."""
        return {"Authorization": f"Bearer {self.token(role, identity)}"}


PROBLEM = "application/problem+json"


def client(server: ApiServer, role: str | None = "admin", identity: str | None = None) -> httpx.Client:
    """An httpx client for `server` with a new token of `role` (None: no token)."""
    headers = server.auth(role, identity) if role else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def assert_problem(response: httpx.Response, status: int, text: str = "") -> dict[str, Any]:
    """The response is a problem document with `status` whose detail holds `text`; its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["type"].startswith("https://")
    assert text in body["detail"], body
    return body


def settings_for(db: Database, **overrides: Any) -> Settings:
    """Settings for the API over `db`: no Redis unless given; nothing read from FLOWDB_* variables."""
    return Settings.model_construct(**{"database_url": db.url, "redis_url": None, **overrides})


@contextmanager
def api_for(db: Database, **overrides: Any) -> Iterator[ApiServer]:
    """The flowdb API over `db` (its engine), with settings overridden (redis_url=..., api_stream_poll_seconds=...)."""
    settings = settings_for(db, **overrides)
    app = create_app(settings, db.engine)
    with serve(app) as url:
        yield ApiServer(url, db.engine, settings, app)


@pytest.fixture
def api_server(db: Database) -> Iterator[ApiServer]:
    """The flowdb API over the test database (both backends, through `db`), without Redis."""
    with api_for(db) as server:
        yield server


@dataclass
class ServeProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_process(env: dict[str, str], log: Path, *, preexec_fn: Callable[[], None] | None = None,
                  start_seconds: float = 60.0) -> Iterator[ServeProcess]:
    """`flowdb serve` as a real process on 127.0.0.1 (a free port) until the block ends.

    `env` carries FLOWDB_DATABASE_URL (see Database.cli_env); its output goes to `log`; `preexec_fn` runs in the
    child before it starts (e.g. an address-space limit). Yields once /healthz answers 200.
    """
    exe = shutil.which("flowdb", path=str(Path(sys.executable).parent)) or "flowdb"
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "serve", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=preexec_fn)
    served = ServeProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + start_seconds
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"flowdb serve exited with {proc.returncode}:\n{served.output()[-3000:]}")
            try:
                if httpx.get(served.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"flowdb serve did not answer within {start_seconds:g} s:\n"
                                   f"{served.output()[-3000:]}")
            time.sleep(0.1)
        yield served
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_SECONDS)


def csrf_of(page: httpx.Response) -> str:
    """The CSRF token of a web UI page's forms (the sign-in form's, or the session's)."""
    return page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]


@contextmanager
def ui_session(server: ApiServer, role: str = "operator", identity: str = "ops@x.com") -> Iterator[httpx.Client]:
    """An httpx client signed in to the web UI with a new token (redirects not followed)."""
    with httpx.Client(base_url=server.url, follow_redirects=False, timeout=30) as http:
        form = {"csrf": csrf_of(http.get("/ui/login")), "token": server.token(role, identity), "next": "/ui/runs"}
        signed = http.post("/ui/login", data=form)
        assert signed.status_code == 303, signed.text
        yield http
