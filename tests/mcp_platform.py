"""The agent-platform emulator (examples/mcp/agent_platform.py) as a subprocess for tests, and a small MCP client.

    with start_platform(tmp_path, queue_limit=0, sync_wait=2) as platform:
        answer = call_tool(platform, "chat_with_agent", agent_name="writer", message="hi [slow 0.2]")
        assert platform.calls()[-1]["answer"] == "reply"

Options become flags (`queue_limit=0` → `--queue-limit 0`); the call log is always on (`platform.log_path`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import TextContent

from servers import free_port

SERVER = Path(__file__).resolve().parent.parent / "examples" / "mcp" / "agent_platform.py"
START_SECONDS = 15.0
STOP_SECONDS = 5.0


def most_at_once(work: list[dict[str, Any]]) -> int:
    """The largest number of pieces of work (the call log's `work` lines) that ran at the same moment."""
    marks = sorted([(w["start"], 1) for w in work] + [(w["end"], -1) for w in work])  # an end before a start
    running = peak = 0
    for _, step in marks:
        running += step
        peak = max(peak, running)
    return peak


@dataclass
class Platform:
    proc: subprocess.Popen[bytes]
    port: int
    key: str
    log_path: Path
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def calls(self) -> list[dict[str, Any]]:
        """Every line of the call log so far: tool calls (`tool`) and pieces of work (`event: work`)."""
        text = self.log_path.read_text(encoding="utf-8") if self.log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def tool_calls(self, tool: str = "chat_with_agent") -> list[dict[str, Any]]:
        return [c for c in self.calls() if c.get("tool") == tool]

    def work(self) -> list[dict[str, Any]]:
        return [c for c in self.calls() if c.get("event") == "work"]

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL if it does not end in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_SECONDS)


def flags(options: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in options.items():
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextmanager
def start_platform(tmp_path: Path, *, key: str = "test-key", **options: Any) -> Iterator[Platform]:
    """The emulator on a free port with the call log in tmp_path; killed when the block ends, whatever happens.

    The key travels in TRINITY_MCP_KEY (not on the command line, as a user would start it).
    """
    log_path = tmp_path / "platform-calls.jsonl"
    for attempt in range(3):  # the free port may be taken between the look and the bind: try another
        port = free_port()
        stderr_path = tmp_path / f"platform-stderr-{port}.txt"
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, str(SERVER), "--port", str(port), "--log", str(log_path), *flags(options)],
                env={**os.environ, "TRINITY_MCP_KEY": key}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        platform = Platform(proc, port, key, log_path, stderr_path)
        try:
            deadline = time.monotonic() + START_SECONDS
            while proc.poll() is None and not answers(port) and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None and answers(port):
                yield platform
                return
            if proc.poll() is None:
                raise RuntimeError(f"the agent platform did not answer within {START_SECONDS} s:\n{platform.stderr()}")
            if "address already in use" not in platform.stderr().lower() or attempt == 2:
                raise RuntimeError(f"the agent platform exited with {proc.returncode}:\n{platform.stderr()}")
        finally:
            platform.kill()


@pytest.fixture
def mcp_platforms(tmp_path: Path) -> Iterator[Callable[..., Platform]]:
    """A factory: `mcp_platforms(queue_limit=0)` starts an emulator; all are killed when the test ends."""
    started: list[Any] = []

    def start(**options: Any) -> Platform:
        folder = tmp_path / f"platform-{len(started)}"
        folder.mkdir()
        manager = start_platform(folder, **options)
        platform = manager.__enter__()
        started.append(manager)
        return platform

    yield start
    for manager in reversed(started):
        manager.__exit__(None, None, None)


@asynccontextmanager
async def session(platform: Platform, key: str | None = None) -> AsyncIterator[ClientSession]:
    """An initialized MCP client session with the platform (its key unless `key` is given)."""
    headers = {"Authorization": f"Bearer {platform.key if key is None else key}"}
    # The SDK's streamablehttp_client(url, headers=...) is deprecated since 1.2x: headers go on the httpx client.
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300)) as http, \
            streamable_http_client(platform.url, http_client=http) as (read, write, _), \
            ClientSession(read, write) as client:
        await client.initialize()
        yield client


async def call_tool_async(platform: Platform, tool: str, key: str | None = None, **arguments: Any) -> Any:
    """One tool call over a fresh MCP session; the parsed JSON of the text item (the raw text if it is not JSON)."""
    async with session(platform, key) as client:
        result = await client.call_tool(tool, arguments)
    [item] = result.content
    assert isinstance(item, TextContent) and not result.isError, result
    try:
        return json.loads(item.text)
    except json.JSONDecodeError:
        return item.text


def call_tool(platform: Platform, tool: str, **arguments: Any) -> Any:
    return asyncio.run(call_tool_async(platform, tool, **arguments))
