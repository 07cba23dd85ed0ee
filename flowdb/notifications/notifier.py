"""Notifier: routes a notice to its channel, retrying with backoff; send never raises for delivery."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from flowdb.notifications import logchannel, slack, smtp
from flowdb.notifications.config import NotifierConfig
from flowdb.notifications.errors import ChannelNotConfigured, NotificationError, one_line
from flowdb.notifications.notice import CHANNELS, Delivery, Notice

if TYPE_CHECKING:
    from flowdb.settings import Settings

log = logging.getLogger("flowdb.notifications")
MAX_BACKOFF_SECONDS = 30.0


def backoff_delay(config: NotifierConfig, failed_attempts: int) -> float:
    """Seconds to wait after the n-th failed attempt: backoff * 2**(n-1), at most 30 s."""
    return float(min(config.backoff_seconds * 2 ** (failed_attempts - 1), MAX_BACKOFF_SECONDS))


class Notifier:
    def __init__(self, config: NotifierConfig) -> None:
        self.config = config

    @classmethod
    def from_settings(cls, settings: Settings) -> Notifier:
        return cls(NotifierConfig.from_settings(settings))

    @classmethod
    def log_only(cls) -> Notifier:
        """A notifier with nothing configured but the log channel (the default for tests and handlers)."""
        return cls(NotifierConfig())

    def configured(self, channel: str) -> bool:
        """log: always; email: SMTP host and sender set; slack: webhook URL set; unknown channels: never."""
        return self._not_configured(channel) is None

    def _not_configured(self, channel: str) -> ChannelNotConfigured | None:
        if channel == "log":
            return None
        if channel == "email":
            return smtp.not_configured(self.config)
        if channel == "slack":
            return slack.not_configured(self.config)
        return ChannelNotConfigured(f"unknown channel {channel!r}; use one of {', '.join(CHANNELS)}")

    def deliver_once(self, notice: Notice) -> dict[str, Any]:
        """One attempt, blocking. Returns the channel's detail; NotificationError on any failure."""
        if (problem := self._not_configured(notice.channel)) is not None:
            raise problem
        if notice.channel == "email":
            return smtp.deliver(self.config, notice)
        if notice.channel == "slack":
            return slack.deliver(self.config, notice)
        return logchannel.deliver(notice)

    async def send(self, notice: Notice, attempts: int | None = None) -> Delivery:
        """Deliver with retries in a thread. Failures come back as Delivery(ok=False), never as exceptions."""
        limit = max(1, attempts if attempts is not None else self.config.attempts)
        if (problem := self._not_configured(notice.channel)) is not None:
            # Nothing will change between attempts: fail at once, saying what to set.
            return Delivery(notice.channel, ok=False, attempts=1, error=str(problem), retryable=False)
        for attempt in range(1, limit + 1):
            try:
                detail = await asyncio.to_thread(self.deliver_once, notice)
                return Delivery(notice.channel, ok=True, attempts=attempt, detail=detail)
            except NotificationError as exc:
                error, retryable = str(exc), exc.retryable
            except Exception as exc:  # a bug in a channel must not take the worker down with it
                log.exception("%s notice %r: unexpected error", notice.channel, notice.title)
                error, retryable = one_line(f"{type(exc).__name__}: {exc}"), True
            if not retryable or attempt == limit:
                log.warning("%s notice %r failed after %d attempt(s): %s", notice.channel, notice.title, attempt, error)
                return Delivery(notice.channel, ok=False, attempts=attempt, error=error, retryable=retryable)
            delay = backoff_delay(self.config, attempt)
            log.info(
                "%s notice %r attempt %d failed (%s); retrying in %.2f s",
                notice.channel,
                notice.title,
                attempt,
                error,
                delay,
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns on its last attempt
