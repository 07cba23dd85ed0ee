"""An emulator of the agent platform's MCP server, for trying flowdb's MCP agents and for flowdb's tests.

It is not the real platform: no model runs. It speaks the platform's contract (MCP over streamable HTTP at /mcp,
a bearer API key, the tools `chat_with_agent` and `get_execution_result` and their JSON answers) and answers
from directives written inside the message, so every answer the platform can give can be provoked on purpose.

Start it with one command:

    TRINITY_MCP_KEY=dev-key python examples/mcp/agent_platform.py --port 8765

and point an MCP agent at http://127.0.0.1:8765/mcp with the header `Authorization: Bearer dev-key`.
`--help` lists the options, the directives and the answers.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from mcp.server.fastmcp import FastMCP
from mcp.server.fastmcp.tools import Tool
from mcp.server.fastmcp.utilities.func_metadata import ArgModelBase, FuncMetadata
from pydantic import Field
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

CONTEXT_TOKENS_MAX = 200_000

DIRECTIVES_HELP = """\
directives (written anywhere inside `message`; several may combine):
  [slow S]        the work takes S seconds (default 0)
  [queue S]       the work takes S seconds and the call answers queued_timeout at once; poll get_execution_result
  [busy N]        the first N calls with this exact message answer agent_busy
  [retry R]       retry_after_seconds of a [busy N] answer (default --busy-retry)
  [refuse]        refusal: {"status": "error", ..., "retryable": false}
  [flaky N]       the first N calls with this exact message answer a transient error (retryable true)
  [badjson]       the work runs but the answer is not JSON
  [cost X]        the reply's cost_usd (default 0.001)
  [tokens N]      the reply's tokens_in and tokens_out (default 10 each)
  [echo-model]    append " (model <model>)" to the response text
agent names starting with `missing` are refused as unknown agents.

answers of chat_with_agent (one text item holding JSON):
  {"response": "<agent>: <message without directives>", "metadata": {"cost_usd", "tokens_in", "tokens_out",
   "context_tokens_used", "context_tokens_max", "execution_id", "session_id" (sequential calls only)}}
  {"status": "agent_busy", "retry_after_seconds": N, "error": ...}      nothing ran
  {"status": "queued_timeout", "execution_id": ..., "error": ...}       the work still runs
  {"status": "accepted", "execution_id": ...}                           parallel + async: the work runs
  {"status": "error", "error": ..., "retryable": false|true}
get_execution_result(execution_id): {"status": "running", ...}, the reply once done (kept), or an error.

sequential calls (parallel false) share the agent's one session and run one at a time; at most --queue-limit
calls wait behind the running one, the next answers agent_busy. A call running past timeout_seconds is stopped
and answers a retryable error.

call log (--log): one JSON line per tool call {"tool", "agent", "message", "parallel", "model", "answer",
"execution_id", "received", "answered"} with answer reply | agent_busy | queued_timeout | accepted | error |
badjson | running | cancelled (the caller went away; its work goes on), and one per piece of work run
{"event": "work", "agent", "message", "execution_id", "start", "end", "timed_out"} (times: time.time()).
"""


class ChatArguments(ArgModelBase):
    """chat_with_agent's arguments. `async` is a Python keyword: the field is `async_`, its wire name `async`."""

    agent_name: str = Field(description="The agent to talk to")
    message: str = Field(description="The message for the agent")
    parallel: bool = Field(False, description="A stateless task run side by side with others, not the session")
    model: str | None = Field(None, description="The model the agent should use")
    timeout_seconds: int | None = Field(None, description="Stop the work after this many seconds")
    async_: bool = Field(False, alias="async", description="With parallel: answer at once with an execution_id")

    def model_dump_one_level(self) -> dict[str, Any]:
        # FastMCP hands the function the wire names (`async`), which no Python parameter can take: use field names.
        return {name: getattr(self, name) for name in type(self).model_fields}


@dataclass
class Directives:
    text: str  # the message without its directives
    work_seconds: float = 0.0
    queue: bool = False
    busy: int = 0
    retry: float | None = None
    refuse: bool = False
    flaky: int = 0
    badjson: bool = False
    cost: float = 0.001
    tokens: int = 10
    echo_model: bool = False

    PATTERN = re.compile(r"\[(slow|queue|busy|retry|refuse|flaky|badjson|cost|tokens|echo-model)(?:\s+([^\]]*))?\]")

    @classmethod
    def parse(cls, message: str) -> Directives:
        """Raises ValueError naming a directive whose value does not fit."""
        d = cls(text=cls.PATTERN.sub("", message).strip())
        for m in cls.PATTERN.finditer(message):
            name, value = m.group(1), (m.group(2) or "").strip()
            try:
                if name in ("slow", "queue"):
                    d.work_seconds = float(value)
                    d.queue = d.queue or name == "queue"
                elif name in ("busy", "flaky", "tokens"):
                    setattr(d, name, int(value))
                elif name in ("retry", "cost"):
                    setattr(d, name, float(value))
                else:
                    setattr(d, name.replace("-", "_"), True)
            except ValueError:
                raise ValueError(f"directive {m.group(0)} needs a number") from None
        return d


@dataclass
class Outcome:
    kind: str  # the call log's `answer`: reply, agent_busy, queued_timeout, accepted, error, badjson, running...
    text: str  # the tool's text content


@dataclass
class Execution:
    id: str
    agent: str
    message: str
    parallel: bool
    model: str | None
    task: asyncio.Task[Outcome]


@dataclass
class Agent:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: sequential calls run in arrival order
    pending: int = 0  # sequential executions not finished: the running one and those waiting
    context_tokens: int = 0
    session: int = 1  # the agent's one chat session (the platform numbers them: <agent>-session-<n>)


def number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def answer(**fields: Any) -> str:
    return json.dumps(fields)


class Platform:
    def __init__(self, sync_wait: float, queue_limit: int, busy_retry: float, log: Path | None) -> None:
        self.sync_wait = sync_wait
        self.queue_limit = queue_limit
        self.busy_retry = busy_retry
        self.log_path = log
        self.log_lock = asyncio.Lock()
        self.agents: dict[str, Agent] = {}
        self.executions: dict[str, Execution] = {}  # kept for good: a result can be read long after
        self.busy_seen: Counter[str] = Counter()
        self.flaky_seen: Counter[str] = Counter()

    async def log(self, line: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        async with self.log_lock:  # one writer at a time: lines never interleave
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    async def chat_with_agent(
        self, agent_name: str, message: str, parallel: bool = False, model: str | None = None,
        timeout_seconds: int | None = None, async_: bool = False,
    ) -> str:
        received = time.time()
        line = {"tool": "chat_with_agent", "agent": agent_name, "message": message, "parallel": parallel,
                "model": model, "timeout_seconds": timeout_seconds, "async": async_}
        started: list[str] = []  # the execution's id once there is one
        outcome = Outcome("failed", "")  # an exception of the emulator's own
        try:
            outcome = await self._chat(agent_name, message, parallel, model, timeout_seconds, async_, started)
        except asyncio.CancelledError:
            # The caller went away while waiting (its work, if any, goes on): the call still happened, log it.
            outcome = Outcome("cancelled", "")
            raise
        finally:
            await asyncio.shield(self.log({**line, "answer": outcome.kind, "execution_id": started[0] if started
                                           else None, "received": received, "answered": time.time()}))
        return outcome.text

    async def _chat(
        self, name: str, message: str, parallel: bool, model: str | None, timeout: int | None, async_: bool,
        started: list[str],
    ) -> Outcome:
        try:
            d = Directives.parse(message)
        except ValueError as e:
            return refusal(str(e))
        if name.startswith("missing"):
            return refusal(f"agent '{name}' not found")
        if self.busy_seen[message] < d.busy:
            self.busy_seen[message] += 1
            return self.busy(name, d.retry)
        if d.refuse:
            return refusal(f"agent '{name}' refused the message")
        if self.flaky_seen[message] < d.flaky:
            self.flaky_seen[message] += 1
            error = f"agent '{name}' failed for now"
            return Outcome("error", answer(status="error", error=error, retryable=True))
        agent = self.agents.setdefault(name, Agent())
        if not parallel and agent.pending > self.queue_limit:
            return self.busy(name, None)
        ex = self.start(name, message, parallel, model, timeout, d)
        started.append(ex.id)
        if parallel and async_:
            return Outcome("accepted", answer(status="accepted", execution_id=ex.id))
        if not d.queue:
            # asyncio.wait leaves the work running when the wait ends (or the caller goes away).
            done, _ = await asyncio.wait({ex.task}, timeout=self.sync_wait)
            if done:
                return ex.task.result()
        error = f"agent '{name}' is still working; poll get_execution_result"
        return Outcome("queued_timeout", answer(status="queued_timeout", execution_id=ex.id, error=error))

    def busy(self, name: str, retry: float | None) -> Outcome:
        seconds = number(self.busy_retry if retry is None else retry)
        return Outcome("agent_busy", answer(status="agent_busy", retry_after_seconds=seconds,
                                            error=f"agent {name} queue is full"))

    def start(self, name: str, message: str, parallel: bool, model: str | None, timeout: int | None,
              d: Directives) -> Execution:
        agent = self.agents[name]
        if not parallel:
            agent.pending += 1  # counted now, before the task runs: the next call sees the queue as it is
        ex_id = f"exe-{secrets.token_hex(6)}"
        task = asyncio.create_task(self.run(agent, ex_id, name, message, parallel, model, timeout, d))
        ex = Execution(ex_id, name, message, parallel, model, task)
        self.executions[ex_id] = ex
        return ex

    async def run(self, agent: Agent, ex_id: str, name: str, message: str, parallel: bool, model: str | None,
                  timeout: int | None, d: Directives) -> Outcome:
        if parallel:
            return await self.work(agent, ex_id, name, message, parallel, model, timeout, d)
        try:
            async with agent.lock:
                return await self.work(agent, ex_id, name, message, parallel, model, timeout, d)
        finally:
            agent.pending -= 1

    async def work(self, agent: Agent, ex_id: str, name: str, message: str, parallel: bool, model: str | None,
                   timeout: int | None, d: Directives) -> Outcome:
        start = time.time()
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.sleep(d.work_seconds), timeout)
        except TimeoutError:
            timed_out = True
        await self.log({"event": "work", "agent": name, "message": message, "execution_id": ex_id,
                        "parallel": parallel, "start": start, "end": time.time(), "timed_out": timed_out})
        if timed_out:
            error = f"agent '{name}' timed out after {timeout} s"
            return Outcome("error", answer(status="error", error=error, retryable=True))
        if d.badjson:
            return Outcome("badjson", "agent exploded <<")
        used = 2 * d.tokens
        metadata: dict[str, Any] = {"cost_usd": d.cost, "tokens_in": d.tokens, "tokens_out": d.tokens}
        if not parallel:
            agent.context_tokens += used  # the session keeps the conversation: its context grows per call
            used = agent.context_tokens
        metadata |= {"context_tokens_used": used, "context_tokens_max": CONTEXT_TOKENS_MAX, "execution_id": ex_id}
        if not parallel:
            metadata["session_id"] = f"{name}-session-{agent.session}"
        text = f"{name}: {d.text}" + (f" (model {model})" if d.echo_model else "")
        return Outcome("reply", answer(response=text, metadata=metadata))

    async def get_execution_result(self, execution_id: str) -> str:
        """The result of a chat_with_agent call that answered queued_timeout (or accepted): running, or its answer."""
        received = time.time()
        ex = self.executions.get(execution_id)
        if ex is None:
            outcome = refusal(f"unknown execution {execution_id}")
        elif not ex.task.done():
            outcome = Outcome("running", answer(status="running", execution_id=execution_id))
        else:
            outcome = ex.task.result()
        await self.log({
            "tool": "get_execution_result", "agent": ex and ex.agent, "message": ex and ex.message,
            "parallel": ex and ex.parallel, "model": ex and ex.model, "answer": outcome.kind,
            "execution_id": execution_id, "received": received, "answered": time.time(),
        })
        return outcome.text


def refusal(error: str) -> Outcome:
    return Outcome("error", answer(status="error", error=error, retryable=False))


class BearerKey:
    """ASGI middleware: every HTTP request carries `Authorization: Bearer <key>`, or it gets 401 and nothing else."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization")
            scheme, _, token = (header or b"").partition(b" ")
            if header is None or scheme.lower() != b"bearer":
                error = "missing Authorization: Bearer <api key>"
            elif not hmac.compare_digest(token.strip(), self.key):
                error = "wrong API key"
            else:
                error = ""
            if error:
                await JSONResponse({"error": error}, 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def quiet_closed_streams(record: logging.LogRecord) -> bool:
    """The SDK logs a traceback when a client ends its session (its standing SSE stream closes): routine, drop it."""
    return not (record.exc_info and isinstance(record.exc_info[1], anyio.ClosedResourceError))


def build_app(platform: Platform, key: str) -> ASGIApp:
    chat = Tool(
        fn=platform.chat_with_agent, name="chat_with_agent", title=None, is_async=True, context_kwarg=None,
        annotations=None,
        description="Send a message to an agent: its reply, or agent_busy / queued_timeout / error as JSON.",
        parameters=ChatArguments.model_json_schema(by_alias=True),
        fn_metadata=FuncMetadata(arg_model=ChatArguments),  # no output schema: one text item, as the platform
    )
    server = FastMCP("agent-platform-emulator", tools=[chat], log_level="WARNING")
    server.add_tool(platform.get_execution_result, structured_output=False)
    app = server.streamable_http_app()
    logging.getLogger("mcp.server.streamable_http").addFilter(quiet_closed_streams)
    app.add_middleware(BearerKey, key=key)
    return app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="agent_platform.py", description=__doc__, epilog=DIRECTIVES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0 picks a free one)")
    p.add_argument("--api-key", help="the API key callers must send as `Authorization: Bearer KEY`")
    p.add_argument("--api-key-env", default="TRINITY_MCP_KEY",
                   help="environment variable holding the key when --api-key is not given (default TRINITY_MCP_KEY)")
    p.add_argument("--sync-wait", type=float, default=30.0,
                   help="seconds a call waits for its work before answering queued_timeout (default 30)")
    p.add_argument("--queue-limit", type=int, default=4,
                   help="sequential calls that may wait behind an agent's running one; more answer agent_busy "
                        "(default 4)")
    p.add_argument("--busy-retry", type=float, default=1.0,
                   help="retry_after_seconds of an agent_busy answer (default 1)")
    p.add_argument("--log", type=Path,
                   help="append one JSON line per tool call and per piece of work to this file")
    return p.parse_args(argv)


async def serve(app: ASGIApp, port: int) -> None:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if server.started:
        bound = server.servers[0].sockets[0].getsockname()[1]
        print(f"agent platform listening on http://127.0.0.1:{bound}/mcp", file=sys.stderr, flush=True)
    await serving


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    key = args.api_key or os.environ.get(args.api_key_env)
    if not key:
        print(f"agent platform: no API key: pass --api-key KEY or set {args.api_key_env}", file=sys.stderr)
        return 2
    if args.log is not None:
        args.log.touch()
    platform = Platform(args.sync_wait, args.queue_limit, args.busy_retry, args.log)
    asyncio.run(serve(build_app(platform, key), args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
