"""Typed errors of the notifier, and the one-line form errors take when they are recorded."""

from __future__ import annotations

from flowdb.errors import FlowdbError


class NotificationError(FlowdbError):
    """A notice could not be delivered. retryable=False when another attempt cannot help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(one_line(message))
        self.retryable = retryable


class ChannelNotConfigured(NotificationError):
    """The channel lacks the settings it needs; says which FLOWDB_ variables to set."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class OutboundURLRefused(NotificationError):
    """An outbound URL is not allowed: scheme, credentials, or an address on a private network."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message, retryable=retryable)


def one_line(message: str, limit: int = 500) -> str:
    """Collapse whitespace (errors are stored as events, one line each) and bound the length."""
    flat = " ".join(message.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
