"""Real servers on 127.0.0.1 for tests: SMTP (aiosmtpd), a Slack-like webhook, and a private redis-server
that a test may stop (SIGSTOP: it hangs) and continue (SIGCONT)."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Collecting:
    """aiosmtpd handler: keeps every message; answers DATA with `reply`."""

    reply: str = "250 Message accepted for delivery"
    envelopes: list[Envelope] = field(default_factory=list)
    data_calls: int = 0

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.data_calls += 1
        if self.reply.startswith("250"):
            self.envelopes.append(envelope)
        return self.reply

    def bodies(self) -> list[str]:
        """Message bodies with the wire's CRLF line ends turned back into newlines."""
        return [str(m.get_content()).replace("\r\n", "\n") for m in self.messages()]

    def messages(self) -> list[EmailMessage]:
        out = []
        for env in self.envelopes:
            assert isinstance(env.content, bytes)
            msg = email.message_from_bytes(env.content, policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            out.append(msg)
        return out


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., tuple[Collecting, int]]]:
    controllers: list[Controller] = []

    def start(handler: Collecting | None = None, **kwargs: Any) -> tuple[Collecting, int]:
        handler = handler or Collecting()
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        controllers.append(controller)
        return handler, port

    yield start
    for c in controllers:
        c.stop()


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes


class Webhook:
    """A ThreadingHTTPServer on 127.0.0.1 answering POSTs from a script of (status, headers, body)."""

    def __init__(
        self, script: list[tuple[int, dict[str, str], bytes]] | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.script = list(script or [])
        self.requests: list[Recorded] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.requests.append(Recorded(self.path, dict(self.headers.items()), body))
                status, headers, reply = hook.script.pop(0) if hook.script else (200, {}, b"ok")
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/services/T000/B000/secret") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Callable[..., Webhook]]:
    servers: list[Webhook] = []

    def start(
        script: list[tuple[int, dict[str, str], bytes]] | None = None, tls: ssl.SSLContext | None = None
    ) -> Webhook:
        servers.append(Webhook(script, tls))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


class RedisServer:
    """A redis-server of the test's own on 127.0.0.1 (no persistence): hang() and resume() it at will."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def hang(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()  # a stopped process would not act on SIGTERM until continued
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own (its own port), stopped at the end."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()
