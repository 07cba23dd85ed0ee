"""What a handler decided about a claimed step; the store turns it into row updates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flowdb.db.claims import Claimed

# deferred: nothing ran (an agent's queue was full); ready again after retry_delay, the attempt given back.
Kind = Literal["completed", "failed", "skipped", "waiting", "deferred"]


@dataclass
class Outcome:
    step: Claimed
    kind: Kind
    output: Any = None
    error: str | None = None
    # What kind of failure (the exception's class name when an agent raised, StepTimeout, ...);
    # on_failure templates read it as error.type. None: StepFailed.
    error_type: str | None = None
    retryable: bool = True
    retry_delay: float = 0.0  # seconds before the next attempt, when retried
    cost_usd: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    input: Any = None  # what the step was given (rendered message, ...), kept on the row
    taken: frozenset[str] | None = None  # children whose edge is taken; None = all (gateways choose)
    ends_instance: bool = False  # completing this step completes its instance (`end`)
    expand: list[Any] | None = None  # for `waiting`: a for_each step's list, one item row per element
    cancel_items: bool = False  # for `completed`: a for_each's complete_when held; cancel its unfinished items
    wake_in: float | None = None  # for `waiting`: seconds until the claim query should wake it
    # Side rows the step type writes in the same transaction (its record() hook: an approval's rows,
    # db/approvals.py); it may turn the outcome into another (an expiry that lost the race against a
    # human decision parks again).
    side: Any = None
    events: Sequence[tuple[str, dict[str, Any]]] = ()  # facts recorded with the outcome (a notice sent...)
    # Agent state binding: which backend ran it, and the platform's execution and session (step row columns).
    backend: str | None = None
    execution: str | None = None
    session: str | None = None
    context: dict[str, Any] | None = None  # for a completed agent task: what its reply's context holds (to save)
    metered: str | None = None  # the agent whose tokens_per_minute these tokens count against (db/agent_usage.py)
    restart: bool = False  # for a retried failure: the next attempt starts afresh (not a woken row's next turn)
