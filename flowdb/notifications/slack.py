"""The slack channel: a message with blocks, POSTed to an incoming-webhook URL."""

from __future__ import annotations

from typing import Any

from flowdb.notifications.config import NotifierConfig
from flowdb.notifications.errors import ChannelNotConfigured, NotificationError
from flowdb.notifications.notice import Notice, decide_command
from flowdb.notifications.outbound import post_json, redacted

# Slack's limits: a header is plain text up to 150 characters, a section text up to 3000.
_HEADER_MAX = 150
_SECTION_MAX = 3000


def _escape(text: str) -> str:
    # Slack mrkdwn treats <...> as links and mentions: the decide command's "<you>" must stay literal.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mrkdwn(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": _cut(text, _SECTION_MAX)}


def build_payload(notice: Notice) -> dict[str, Any]:
    """The webhook body: fallback text for notifications, blocks for the message itself."""
    title = notice.title.strip() or "(no title)"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(title, _HEADER_MAX)}},
    ]
    if notice.text.strip():
        blocks.append({"type": "section", "text": _mrkdwn(_escape(notice.text))})
    if notice.artifacts:
        items = "\n".join(f"• {_escape(a)}" for a in notice.artifacts)
        blocks.append({"type": "section", "text": _mrkdwn(f"*Artifacts*\n{items}")})
    context: list[str] = []
    if notice.approval_id is not None:
        command = _escape(decide_command(notice.approval_id))
        context.append(f"Approval {notice.approval_id}: decide with `{command}`")
    if notice.instance_id is not None:
        context.append(f"Instance {notice.instance_id}")
    if context:
        blocks.append({"type": "context", "elements": [_mrkdwn(c) for c in context]})
    fallback = f"{title}\n{notice.text}".strip()
    if notice.approval_id is not None:
        fallback += f"\nApproval {notice.approval_id}: {decide_command(notice.approval_id)}"
    return {"text": _cut(_escape(fallback), _SECTION_MAX), "blocks": blocks}


def not_configured(config: NotifierConfig) -> ChannelNotConfigured | None:
    """The error naming the FLOWDB_ variable slack lacks; None when the webhook URL is set."""
    return (
        None
        if config.slack_webhook_url
        else ChannelNotConfigured("slack is not configured: set FLOWDB_SLACK_WEBHOOK_URL")
    )


def deliver(config: NotifierConfig, notice: Notice) -> dict[str, Any]:
    """One POST to the webhook; the detail on success, NotificationError otherwise."""
    if (problem := not_configured(config)) is not None:
        raise problem
    url = config.slack_webhook_url
    assert url is not None  # checked just above; for the type checker
    resp = post_json(url, build_payload(notice), timeout=config.timeout_seconds, allow_private=config.allow_private)
    if 300 <= resp.status < 400:
        # Following would reach a URL that was never checked; report it instead.
        target = (resp.location or "(no Location)")[:200]
        raise NotificationError(
            f"webhook {redacted(url)} answered {resp.status} redirect to {target}; redirects are not followed"
        )
    if not 200 <= resp.status < 300:
        snippet = resp.body[:200].decode("utf-8", errors="replace")
        raise NotificationError(f"webhook {redacted(url)} answered {resp.status} {resp.reason}: {snippet}")
    return {"status": resp.status}
