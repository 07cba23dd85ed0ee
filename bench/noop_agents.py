"""The benchmark's noop agent: a plain Python function returning a small dict."""

from __future__ import annotations

from typing import Any

from flowdb import AgentRequest


def noop(request: AgentRequest) -> dict[str, Any]:
    return {"ok": True, "step": request.step_id}


async def noop_async(request: AgentRequest) -> dict[str, Any]:
    return {"ok": True, "step": request.step_id}
