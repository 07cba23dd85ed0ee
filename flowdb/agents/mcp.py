"""Agents on an agent platform's MCP server: `mcp: {url, api_key_env, agent_name, mode, ...}`.

Each call opens an MCP session over streamable HTTP with the official `mcp` SDK (bearer key from
the environment variable `api_key_env`) and calls the platform's tool (`chat_with_agent`) with
`agent_name`, `message` and `parallel` (mode `sequential`: the agent's own chat session, which keeps
context and runs one call at a time; `parallel`: a stateless task beside others). The tool answers
text holding JSON; its answers map to flowdb's as follows:

- a reply (`response`, with metadata: cost_usd, tokens, execution_id, session_id) completes the step;
- `{"status": "agent_busy", "retry_after_seconds": N}`: nothing ran; AgentBusy puts the step back
  to ready N seconds later without spending an attempt;
- `{"status": "queued_timeout", "execution_id": E}` (or `running` from the result tool): the work
  still runs; AgentStillRunning parks the step, which then polls `get_execution_result(E)` and never
  sends the message again (a re-send would run the work twice);
- an answer that says `"retryable": false` fails the step at once; other errors, transport errors and
  timeouts are retried under the step's retry policy; a reply that is not JSON fails at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import orjson

from flowdb.agents.spec import endpoint_spec
from flowdb.agents.types import AgentBusy, AgentReply, AgentRequest, AgentStillRunning, as_reply
from flowdb.durations import parse_duration
from flowdb.errors import AgentConfigError, AgentFailed, AgentRefused, AgentReplyInvalid, AgentUnreachable

DEFAULT_TIMEOUT_SECONDS = 600.0
DEFAULT_POLL_SECONDS = 5.0
DEFAULT_BUSY_RETRY_SECONDS = 5.0
MODES = ("sequential", "parallel")
KEYS = frozenset({"url", "api_key_env", "tool", "result_tool", "agent_name", "mode", "model", "timeout",
                  "poll_interval"})
STILL_RUNNING = frozenset({"queued_timeout", "running", "queued", "pending"})
# The SDK logs a traceback for every dropped connection; flowdb reports the failure as the step's error.
logging.getLogger("mcp.client.streamable_http").setLevel(logging.CRITICAL)
# The SDK (and httpx) is imported by the first call (importing it costs a second of start-up every command
# would pay).
if TYPE_CHECKING:
    import httpx


class McpBackend:
    key = "mcp"

    def __init__(self, name: str, spec: Any) -> None:
        self.name = name
        self.url = endpoint_spec(name, "mcp", spec, KEYS, "{url: http://host:8080/mcp, api_key_env: TRINITY_MCP_KEY, "
                                 "agent_name: researcher, mode: sequential}", "http(s)://host:port/mcp")
        self.api_key_env = _text(name, spec, "api_key_env", None)
        self.tool: str = _text(name, spec, "tool", "chat_with_agent") or "chat_with_agent"
        self.result_tool: str = _text(name, spec, "result_tool", "get_execution_result") or "get_execution_result"
        self.agent_name: str = _text(name, spec, "agent_name", name) or name
        self.model = _text(name, spec, "model", None)
        mode = spec.get("mode", "sequential")
        if mode not in MODES:
            raise AgentConfigError(f"agent {name!r}: mode is sequential (the agent's own session: one call at a "
                                   f"time, context kept) or parallel (stateless tasks side by side), not {mode!r}")
        self.mode: str = mode
        self.timeout = _seconds(name, spec, "timeout", DEFAULT_TIMEOUT_SECONDS)
        self.poll_interval = _seconds(name, spec, "poll_interval", DEFAULT_POLL_SECONDS)
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def sequential(self) -> bool:
        return self.mode == "sequential"

    def _headers(self) -> dict[str, str]:
        if self.api_key_env is None:
            return {}
        key = os.environ.get(self.api_key_env)
        if not key:
            raise AgentConfigError(f"agent {self.name!r}: set the environment variable {self.api_key_env} "
                                   "(its api_key_env reads the platform's API key from it)")
        return {"Authorization": f"Bearer {key}"}

    def check(self) -> None:
        self._headers()

    async def call(self, request: AgentRequest) -> AgentReply:
        arguments: dict[str, Any]
        if request.execution_id is not None:
            tool, arguments = self.result_tool, {"execution_id": request.execution_id}
        else:
            tool = self.tool
            arguments = {"agent_name": self.agent_name, "message": _with_context(request),
                         "parallel": not self.sequential, "timeout_seconds": int(self.timeout)}
            model = request.model or self.model
            if model:
                arguments["model"] = model
        answer = await self._call_tool(tool, arguments)
        return self._reply(answer, tool, request.execution_id)

    async def _call_tool(self, tool: str, arguments: dict[str, Any]) -> str:
        import httpx
        from mcp import ClientSession
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared.exceptions import McpError
        from mcp.types import TextContent

        where = f"agent {self.name!r} at {self.url}"
        headers = self._headers()
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # one HTTP client per event loop: connections reused
            self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30.0, read=self.timeout + 30))
            self._loop = loop
        try:
            async with streamable_http_client(self.url, http_client=self._client) as (read, write, _):
                async with ClientSession(read, write, read_timeout_seconds=timedelta(seconds=self.timeout + 30)) \
                        as session:
                    await session.initialize()
                    result = await session.call_tool(tool, arguments)
        except McpError as exc:  # the server answered the protocol with an error (an unknown tool, a timeout)
            raise AgentFailed(f"{where}: {tool} failed: {exc.error.message}") from None
        except Exception as exc:  # transport errors, wrapped in groups by the SDK's task groups
            refused = _http_status(exc)
            if refused in (401, 403):
                raise AgentRefused(f"{where} refused the API key (HTTP {refused}): check the key in "
                                   f"{self.api_key_env or 'api_key_env'}", retryable=False) from None
            raise AgentUnreachable(f"{where}: {_first_cause(exc)}") from None
        text = "".join(part.text for part in result.content if isinstance(part, TextContent))
        if result.isError:
            said = _json(text)
            retryable = not (isinstance(said, dict) and said.get("retryable") is False)
            raise AgentFailed(f"{where}: {tool} failed: {_said(said, text)}", retryable=retryable)
        return text

    def _reply(self, text: str, tool: str, polled: str | None) -> AgentReply:
        where = f"agent {self.name!r} at {self.url}"
        answer = _json(text)
        if not isinstance(answer, dict):
            raise AgentReplyInvalid(f"{where}: {tool} answered something that is not a JSON object "
                                    f"(got: {text[:200]!r})")
        status = answer.get("status")
        if status == "agent_busy":
            after = _number(answer.get("retry_after_seconds"), DEFAULT_BUSY_RETRY_SECONDS)
            raise AgentBusy(f"{where} is busy: {_said(answer, text)}", after)
        if status in STILL_RUNNING:
            execution = answer.get("execution_id") or polled
            if not isinstance(execution, str) or not execution:
                raise AgentReplyInvalid(f"{where}: {tool} answered {status} without an execution_id to poll")
            raise AgentStillRunning(f"{where} still runs execution {execution}", execution, self.poll_interval)
        if answer.get("retryable") is False:
            raise AgentRefused(f"{where} refused: {_said(answer, text)}", retryable=False)
        if "response" not in answer:
            raise AgentFailed(f"{where}: {tool} failed: {_said(answer, text)}")
        given = answer.get("metadata")
        meta: dict[str, Any] = given if isinstance(given, dict) else {}
        try:
            cost = float(meta.get("cost_usd") or 0)
            tokens_in = int(meta.get("tokens_in") or meta.get("input_tokens") or 0)
            tokens_out = int(meta.get("tokens_out") or meta.get("output_tokens") or 0)
        except (TypeError, ValueError):
            raise AgentReplyInvalid(f"{where}: the reply's cost and token counts must be numbers") from None
        execution = meta.get("execution_id") or polled
        session = meta.get("session_id")
        context: dict[str, Any] = {"agent": self.agent_name, "session_id": session, "response": answer["response"],
                   **{k: meta[k] for k in ("context_tokens_used", "context_tokens_max") if k in meta}}
        return as_reply(AgentReply(answer["response"], cost, tokens_in, tokens_out,
                                   execution_id=str(execution) if execution else None,
                                   session_id=str(session) if session else None, context=context), self.name)


def _with_context(request: AgentRequest) -> str:
    """The message, after the context a `context: {restore: NAME}` step brings: the platform's tool takes
    no context of its own, so the saved reply goes before the message."""
    context = request.context
    if not context or not context.get("response"):
        return request.message
    source = f"step {context.get('step_id')!r}" + (f" ({context['agent']})" if context.get("agent") else "")
    return (f"Context saved as {context.get('name')!r} by {source}:\n{context['response']}\n\n---\n"
            f"{request.message}")


def _text(name: str, spec: dict[str, Any], key: str, default: str | None) -> str | None:
    value = spec.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise AgentConfigError(f"agent {name!r}: mcp {key} must be text, not {value!r}")
    return value


def _seconds(name: str, spec: dict[str, Any], key: str, default: float) -> float:
    try:
        value = parse_duration(spec.get(key, default))
    except ValueError as exc:
        raise AgentConfigError(f"agent {name!r}: {key}: {exc}") from None
    if value <= 0:
        raise AgentConfigError(f"agent {name!r}: {key} must be more than 0")
    return value


def _json(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _number(value: Any, default: float) -> float:
    try:
        return max(float(value), 0.0) if value is not None else default
    except (TypeError, ValueError):
        return default


def _said(answer: Any, text: str) -> str:
    if isinstance(answer, dict):
        for key in ("error", "detail", "message"):
            if isinstance(answer.get(key), str):
                return str(answer[key])[:300]
    return text[:300]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _http_status(exc: BaseException) -> int | None:
    import httpx  # loaded already: only a call's failure gets here

    for leaf in _leaves(exc):
        if isinstance(leaf, httpx.HTTPStatusError):
            return leaf.response.status_code
    return None


def _first_cause(exc: BaseException) -> str:
    leaf = _leaves(exc)[0]
    return f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
