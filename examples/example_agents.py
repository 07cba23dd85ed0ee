"""Offline agents for the examples: deterministic answers, a cost and token counts, no network."""

from __future__ import annotations

import hashlib

from flowdb import AgentReply, AgentRequest


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


def researcher(request: AgentRequest) -> AgentReply:
    subject = request.message.removeprefix("Research ").strip() or "the market"
    findings = [f"{subject}: demand grew in the last quarter",
                f"{subject}: three new competitors entered",
                f"{subject}: pricing pressure on the low end"]
    return AgentReply(output={"subject": subject, "findings": findings},
                      cost_usd=0.0021, tokens_in=_tokens(request.message), tokens_out=42)


def writer(request: AgentRequest) -> AgentReply:
    digest = hashlib.sha256(request.message.encode()).hexdigest()[:8]
    text = f"Report ({len(request.message)} chars of brief): {request.message[:120]}"
    return AgentReply(output={"text": text, "output_path": f"reports/{request.instance_id}-{digest}.md"},
                      cost_usd=0.0034, tokens_in=_tokens(request.message), tokens_out=120)


def analyst(request: AgentRequest) -> AgentReply:
    score = int(hashlib.sha256(str(request.instance_id).encode()).hexdigest(), 16) % 101
    return AgentReply(output={"summary": f"analysis of: {request.message}", "quality_score": score},
                      cost_usd=0.0015, tokens_in=_tokens(request.message), tokens_out=64)


def trader(request: AgentRequest) -> str:
    return f"order placed: {request.message}"
