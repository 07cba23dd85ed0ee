"""NotifierConfig: the notifier's settings, frozen, buildable without the environment (tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from flowdb.settings import Settings

SmtpTls = Literal["none", "starttls", "ssl"]


@dataclass(frozen=True)
class NotifierConfig:
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_sender: str | None = None
    smtp_tls: SmtpTls = "starttls"
    smtp_username: str | None = None
    smtp_password: str | None = field(default=None, repr=False)  # never printed
    slack_webhook_url: str | None = field(default=None, repr=False)  # the URL path is the webhook's secret
    allow_private: bool = False  # allow webhook URLs resolving to private/loopback/link-local addresses
    attempts: int = 3
    backoff_seconds: float = 1.0
    timeout_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> NotifierConfig:
        password = settings.smtp_password.get_secret_value() if settings.smtp_password is not None else None
        return cls(
            smtp_host=settings.smtp_host or None,
            smtp_port=settings.smtp_port,
            smtp_sender=settings.smtp_sender or None,
            smtp_tls=settings.smtp_tls,
            smtp_username=settings.smtp_username or None,
            smtp_password=password,
            slack_webhook_url=settings.slack_webhook_url or None,
            allow_private=settings.notify_allow_private,
            attempts=settings.notify_attempts,
            backoff_seconds=settings.notify_backoff_seconds,
            timeout_seconds=settings.notify_timeout_seconds,
        )
