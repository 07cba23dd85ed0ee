"""Agents behind an HTTP endpoint: `http: {url, headers_env, timeout}` in the agents file.

Each call is one POST of JSON `{agent, message, instance_id, step_id, attempt, idempotency_key}` (the
key also as the `Idempotency-Key` header: the same for every attempt of one run of a step, so the
endpoint can make a retry harmless), with `context` when the step restores a saved context and
`feedback` when reviewers judged its earlier output. The reply is JSON `{output, cost_usd, tokens_in,
tokens_out, context}` (only `output` is required; `context` is what `context: {save: NAME}` keeps).
Secrets stay out of the agents file: `headers_env` maps a header to the environment variable that
holds its value, read when the worker starts.

What is retried under the step's policy: transport errors, timeouts, 408, 429 and 5xx. What fails the
step at once: any other 4xx, a reply that says `"retryable": false`, and a 2xx reply that is not the
JSON above (the endpoint speaks another protocol: another attempt would not help).
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from flowdb.agents.spec import endpoint_spec
from flowdb.agents.types import AgentReply, AgentRequest, as_reply
from flowdb.durations import parse_duration
from flowdb.errors import AgentConfigError, AgentFailed, AgentRefused, AgentReplyInvalid, AgentUnreachable

DEFAULT_TIMEOUT_SECONDS = 300.0
RETRIED_STATUSES = frozenset({408, 425, 429})
KEYS = frozenset({"url", "headers_env", "timeout"})

if TYPE_CHECKING:
    import httpx  # imported by the first call: every command loads the agents file, few call an agent


class HttpBackend:
    key = "http"

    def __init__(self, name: str, spec: Any) -> None:
        self.name = name
        self.url = endpoint_spec(name, "http", spec, KEYS, "{url: https://..., headers_env: {Authorization: ENV_VAR}, "
                                 "timeout: 60s}", "http(s)://host/path")
        headers_env = spec.get("headers_env") or {}
        if not isinstance(headers_env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in headers_env.items()):
            raise AgentConfigError(f"agent {name!r}: headers_env maps a header name to the environment variable "
                                   "holding its value, e.g. {Authorization: AGENT_TOKEN}")
        self.headers_env: dict[str, str] = headers_env
        try:
            self.timeout = parse_duration(spec.get("timeout", DEFAULT_TIMEOUT_SECONDS))
        except ValueError as exc:
            raise AgentConfigError(f"agent {name!r}: timeout: {exc}") from None
        if self.timeout <= 0:
            raise AgentConfigError(f"agent {name!r}: timeout must be more than 0")
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _headers(self) -> dict[str, str]:
        missing = [variable for variable in self.headers_env.values() if variable not in os.environ]
        if missing:
            raise AgentConfigError(f"agent {self.name!r}: set the environment variable(s) {', '.join(missing)} "
                                   "(its headers_env reads them)")
        return {header: os.environ[variable] for header, variable in self.headers_env.items()}

    def check(self) -> None:
        self._headers()

    async def call(self, request: AgentRequest) -> AgentReply:
        import httpx

        headers = {**self._headers(), "Idempotency-Key": request.idempotency_key}
        body: dict[str, Any] = {"agent": request.agent, "message": request.message,
                                "instance_id": request.instance_id, "step_id": request.step_id,
                                "attempt": request.attempt, "idempotency_key": request.idempotency_key}
        if request.context is not None:  # a context a `context: {restore: NAME}` step brings
            body["context"] = request.context
        if request.feedback:  # reviewers' feedback on the step's earlier output (also in the message)
            body["feedback"] = list(request.feedback)
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # one client per event loop: connections reused
            self._client, self._loop = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False), loop
        where = f"agent {self.name!r} at {self.url}"
        try:
            response = await self._client.post(self.url, json=body, headers=headers)
        except httpx.TimeoutException:
            raise AgentUnreachable(f"{where} did not answer within {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise AgentUnreachable(f"{where}: {type(exc).__name__}: {exc}") from None
        reply = _json(response)
        if response.status_code >= 300:
            said = _said(reply, response)
            retryable = (response.status_code in RETRIED_STATUSES or response.status_code >= 500) \
                and not (isinstance(reply, dict) and reply.get("retryable") is False)
            kind = AgentFailed if retryable else AgentRefused
            raise kind(f"{where} answered {response.status_code}: {said}", retryable=retryable)
        if not isinstance(reply, dict) or "output" not in reply:
            raise AgentReplyInvalid(f"{where} answered {response.status_code} without a JSON object holding `output` "
                                    f"(got: {response.text[:200]!r})")
        if reply.get("retryable") is False:
            raise AgentRefused(f"{where} refused: {_said(reply, response)}", retryable=False)
        try:
            cost, tokens_in, tokens_out = (float(reply.get("cost_usd") or 0), int(reply.get("tokens_in") or 0),
                                           int(reply.get("tokens_out") or 0))
        except (TypeError, ValueError):
            raise AgentReplyInvalid(f"{where}: cost_usd, tokens_in and tokens_out must be numbers") from None
        context = reply.get("context") if isinstance(reply.get("context"), dict) else None
        return as_reply(AgentReply(reply["output"], cost, tokens_in, tokens_out, context=context), self.name)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _said(reply: Any, response: httpx.Response) -> str:
    if isinstance(reply, dict):
        for key in ("error", "detail", "message"):
            if isinstance(reply.get(key), str):
                return str(reply[key])[:300]
    return response.text[:300] or response.reason_phrase
