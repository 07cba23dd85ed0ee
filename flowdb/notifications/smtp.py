"""The email channel: one message per notice over SMTP (plain, STARTTLS or implicit TLS)."""

from __future__ import annotations

import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any

from flowdb.notifications.config import NotifierConfig
from flowdb.notifications.errors import ChannelNotConfigured, NotificationError
from flowdb.notifications.notice import Notice, decide_command

# Syntax only (local@domain): deliverability is the SMTP server's business. No whitespace, so no
# header injection through a recipient.
_ADDRESS = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


def _is_address(value: str) -> bool:
    if "\r" in value or "\n" in value:
        return False
    _name, addr = parseaddr(value)
    return bool(addr) and _ADDRESS.fullmatch(addr) is not None


def not_configured(config: NotifierConfig) -> ChannelNotConfigured | None:
    """The error naming the FLOWDB_ variables email needs and lacks; None when it has them."""
    missing = [
        name
        for name, value in (("FLOWDB_SMTP_HOST", config.smtp_host), ("FLOWDB_SMTP_SENDER", config.smtp_sender))
        if not value
    ]
    return ChannelNotConfigured(f"email is not configured: set {' and '.join(missing)}") if missing else None


def body_text(notice: Notice) -> str:
    parts = [notice.text.rstrip()]
    if notice.artifacts:
        parts.append("Artifacts:\n" + "\n".join(f"- {a}" for a in notice.artifacts))
    if notice.approval_id is not None:
        parts.append(f"Approval {notice.approval_id}: decide with\n    {decide_command(notice.approval_id)}")
    if notice.instance_id is not None:
        parts.append(f"Instance {notice.instance_id}")
    return "\n\n".join(p for p in parts if p) + "\n"


def build_message(config: NotifierConfig, notice: Notice) -> EmailMessage:
    """The message for a notice; NotificationError when sender or recipients are unusable."""
    sender = config.smtp_sender or ""
    if not _is_address(sender):
        raise NotificationError(f"FLOWDB_SMTP_SENDER {sender!r} is not an email address", retryable=False)
    if not notice.to:
        raise NotificationError("email notice has no recipients (to is empty)", retryable=False)
    bad = [r for r in notice.to if not _is_address(r)]
    if bad:
        raise NotificationError(f"not email addresses: {', '.join(map(repr, bad))}", retryable=False)
    msg = EmailMessage()
    # A header may not span lines; a title with newlines is folded into one.
    msg["Subject"] = " ".join(notice.title.split()) or "(no title)"
    msg["From"] = sender
    msg["To"] = ", ".join(notice.to)
    if notice.approval_id is not None:
        msg["X-Flowdb-Approval"] = str(notice.approval_id)
    if notice.instance_id is not None:
        msg["X-Flowdb-Instance"] = str(notice.instance_id)
    msg.set_content(body_text(notice))
    return msg


def _describe(exc: Exception) -> str:
    # Server replies as "554 rejected" rather than "(554, b'rejected')". Nothing here carries the password.
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = ", ".join(f"{r} ({c} {_text(m)})" for r, (c, m) in exc.recipients.items())
        return f"all recipients refused: {refused}"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{type(exc).__name__}: {exc.smtp_code} {_text(exc.smtp_error)}"
    return f"{type(exc).__name__}: {exc}"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def deliver(config: NotifierConfig, notice: Notice) -> dict[str, Any]:
    """One SMTP session sending one message; the detail on success, NotificationError otherwise."""
    if (problem := not_configured(config)) is not None:
        raise problem
    assert config.smtp_host is not None  # checked just above; for the type checker
    msg = build_message(config, notice)
    where = f"{config.smtp_host}:{config.smtp_port}"
    timeout = config.timeout_seconds
    try:
        smtp: smtplib.SMTP
        if config.smtp_tls == "ssl":
            context = ssl.create_default_context()
            smtp = smtplib.SMTP_SSL(config.smtp_host, config.smtp_port, timeout=timeout, context=context)
        else:
            smtp = smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=timeout)
        with smtp:
            if config.smtp_tls == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if config.smtp_username:
                smtp.login(config.smtp_username, config.smtp_password or "")
            refused = smtp.send_message(msg)
    except (smtplib.SMTPException, OSError) as exc:
        raise NotificationError(f"SMTP {where}: {_describe(exc)}") from exc
    detail: dict[str, Any] = {"to": list(notice.to), "smtp": where}
    if refused:
        # Some recipients took it: another attempt would send them a duplicate, so report instead.
        detail["refused"] = {r: f"{c} {_text(m)}" for r, (c, m) in refused.items()}
    return detail
