"""What to send (Notice) and what came of it (Delivery)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

CHANNELS = ("log", "email", "slack")


def decide_command(approval_id: int) -> str:
    """The command an approver runs to decide; named in every approval notice."""
    return f"flowdb approvals decide {approval_id} approve|reject --as <you>"


def _as_tuple(value: Iterable[str] | str) -> tuple[str, ...]:
    # A lone string is one item, not a sequence of characters.
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class Notice:
    channel: str  # "log" | "email" | "slack"
    title: str
    text: str
    to: tuple[str, ...] = ()  # email recipients; slack and log ignore it
    artifacts: tuple[str, ...] = ()
    approval_id: int | None = None
    instance_id: int | None = None

    def __post_init__(self) -> None:
        # Callers building notices from JSON hand over lists; keep the notice hashable and immutable.
        object.__setattr__(self, "to", _as_tuple(self.to))
        object.__setattr__(self, "artifacts", _as_tuple(self.artifacts))


@dataclass(frozen=True)
class Delivery:
    channel: str
    ok: bool
    attempts: int
    error: str | None = None  # last error, one line, never a secret
    detail: dict[str, Any] = field(default_factory=dict)
    # Whether trying again later could succeed: False for a channel that is not configured or a
    # URL the outbound check refuses (a notification step then fails without further attempts).
    retryable: bool = True
