"""Pydantic models of a process definition, one class per step type.

Type-specific fields may stand on the step or under `config:`; definitions.py merges `config:` into
the step before these models see it, so each model lists its fields once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from flowdb.durations import parse_duration

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
STEP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _seconds(value: Any) -> float:
    return parse_duration(value)



class RetryPolicy(Strict):
    max_attempts: int = Field(default=3, ge=1, le=1000)
    initial_interval: float = 1.0
    backoff: float = Field(default=2.0, ge=1.0, le=100.0)
    max_interval: float = 60.0
    # Error types that fail the step at once, attempts left or not (an agent's exception class name,
    # StepTimeout, ...): retrying a refusal or a bad request only costs time and money.
    non_retryable: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(default=[], max_length=100)
    # When the last attempt fails (and no error boundary takes the error): fail the instance, or pause
    # it with the step ready again (fresh attempts) for a person to fix the cause and resume.
    on_exhausted: Literal["fail", "pause"] = "fail"

    @field_validator("initial_interval", "max_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return _seconds(value)

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait before the attempt that follows failed attempt number `attempt`."""
        delay: float = self.initial_interval * self.backoff ** max(attempt - 1, 0)
        return min(delay, self.max_interval)


DEFAULT_RETRY = RetryPolicy()


class InputSpec(Strict):
    type: Literal["string", "integer", "number", "boolean", "object", "array"] = "string"
    default: Any = None
    description: str | None = None
    required: bool | None = None


class Budget(Strict):
    """A spending limit of a process (all its steps together) or of one agent task (all its attempts,
    rounds and items), checked before each agent task starts (flowdb/db/budgets.py)."""

    max_cost_usd: float | None = Field(default=None, gt=0, lt=1e12, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1, le=2**62)
    # fail the step; pause it until `flowdb budget raise`; ask `approver` to raise the budget.
    on_exceed: Literal["fail", "pause", "ask"] = "fail"
    approver: str | None = Field(default=None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _complete(self) -> Budget:
        if self.max_cost_usd is None and self.max_tokens is None:
            raise ValueError("a budget needs max_cost_usd, max_tokens or both")
        if self.on_exceed == "ask" and self.approver is None:
            raise ValueError("on_exceed: ask needs an approver (who may raise the budget), e.g. approver: "
                             "finance@example.com")
        if self.on_exceed != "ask" and self.approver is not None:
            raise ValueError(f"approver is only for on_exceed: ask (this budget's on_exceed is {self.on_exceed})")
        return self


class LogAction(Strict):
    type: Literal["log"]
    message: str
    level: Literal["info", "warning", "error"] = "info"


class NotifyAction(Strict):
    """Send a notice when the instance finishes (after the commit; see worker.py)."""

    type: Literal["notify"]
    channel: Literal["log", "email", "slack"]
    message: str
    title: str | None = None
    to: list[str] = []


Action = Annotated[LogAction | NotifyAction, Field(discriminator="type")]
ACTION_TYPES = ("log", "notify")


class OutputActions(Strict):
    on_success: list[Action] = []
    on_failure: list[Action] = []


class AtLeast(Strict):
    at_least: int = Field(ge=1)


# How a step with several parents joins them (DESIGN.md, R6): `all` waits for every parent and runs
# when at least one completed; `any` runs at the first completion; `at_least: N` at the N-th.
Join = Literal["all", "any"] | AtLeast


class ErrorRoute(Strict):
    """One entry of a list `on_error`: errors of this type (any error without `error`) go to `next`."""

    error: str | None = Field(default=None, min_length=1, max_length=100)
    next: str


class StepBase(Strict):
    id: str = Field(pattern=STEP_ID_PATTERN, max_length=100)
    name: str | None = None
    description: str | None = None
    depends_on: list[str] = []
    join: Join = "all"
    cancel_others: bool = False  # once the join fires, cancel the parents still open (a race)
    max_visits: int = Field(default=10, ge=1, le=10_000)  # rounds a loop may run this step, counting the first (R3)
    # for_each (R7): run the step once per element of a list (or of an expression giving one), with
    # {{ item }} and {{ index }}; at most max_parallel at once; complete_when releases the successors
    # early (cancel_remaining: and cancels the items not finished).
    for_each: list[Any] | str | None = None
    max_parallel: int | None = Field(default=None, ge=1)
    complete_when: str | None = None
    cancel_remaining: bool = False
    condition: str | None = None
    retry: RetryPolicy | None = None
    # Error boundary: when the step fails for good, its error goes to this step (or to the first entry
    # whose `error` matches the error's type) and the instance goes on from there.
    on_error: str | list[ErrorRoute] | None = None
    timeout: float | None = None
    # Agents sent a short notice when the step completes (at least once; never holds the process up).
    subscribers: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(default=[], max_length=50)

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float | None:
        return None if value is None else _seconds(value)


class ContextCheckpoint(Strict):
    """`save`: keep the context the agent's reply leaves under this name; `restore`: pass the context
    saved under this name to the call (db/contexts.py)."""

    save: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=100)
    restore: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=100)

    @model_validator(mode="after")
    def _one(self) -> ContextCheckpoint:
        if self.save is None and self.restore is None:
            raise ValueError("context needs save: NAME, restore: NAME or both")
        return self


class AgentTask(StepBase):
    type: Literal["agent_task"]
    agent: str = Field(min_length=1)
    message: str
    model: str | None = None  # passed to backends that take a model (the MCP platform's `model`)
    context: ContextCheckpoint | None = None  # save the agent's context for a later step, or restore one
    budget: Budget | None = None  # this step's own limit, over all its attempts, rounds and items
    # Reserved against the budgets while the step runs, so parallel branches cannot overspend together.
    estimated_cost_usd: float | None = Field(default=None, ge=0, lt=1e12, allow_inf_nan=False)


class HumanApproval(StepBase):
    type: Literal["human_approval"]
    # The agent task whose output this approval judges: each vote's decision and comment is recorded as
    # feedback for that step, and given to its agent when it runs again (a loop round, a retry).
    reviews: str | None = None
    approvers: list[str] = Field(min_length=1)
    quorum: int = Field(default=1, ge=1)
    on_timeout: Literal["notify", "approve", "reject", "fail"] = "fail"
    artifacts: list[str] = []
    title: str | None = None
    instructions: str | None = None

    @field_validator("approvers")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for approver in value:
            key = approver.strip().lower()
            if not key:
                raise ValueError("an approver is empty; list identities such as email addresses")
            if len(key) > 200:
                raise ValueError(f"approver {approver[:40]!r}... is longer than 200 characters")
            if key in seen:
                raise ValueError(f"{approver!r} is listed twice (identities compare without case)")
            seen.add(key)
        return value

    @field_validator("quorum")
    @classmethod
    def _quorum(cls, value: int, info: ValidationInfo) -> int:
        approvers = info.data.get("approvers")  # absent when approvers itself is invalid
        if approvers is not None and value > len(approvers):
            raise ValueError(f"{value} is more than the {len(approvers)} approvers listed; "
                             "lower the quorum or list more approvers")
        return value


class Route(Strict):
    """One way out of a gateway: its condition, or `default: true`, or neither on a parallel gateway
    (which takes every route); which of these a gateway needs is checked in definitions.py."""

    next: str
    condition: str | None = None
    default: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> Route:
        if self.default and self.condition is not None:
            raise ValueError("a route has either a condition or `default: true`, not both")
        return self


class Gateway(StepBase):
    type: Literal["gateway"]
    gateway_type: Literal["exclusive", "parallel", "inclusive"]
    routes: list[Route] = Field(min_length=1)  # at most one default: checked in definitions.py


class Timer(StepBase):
    type: Literal["timer"]
    duration: float | None = None
    wait_until: str | None = None
    until: str | None = None
    timezone: str | None = None

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return None if value is None else _seconds(value)


class SubProcess(StepBase):
    type: Literal["sub_process"]
    process: str = Field(pattern=NAME_PATTERN)
    version: int | None = None
    inputs: dict[str, Any] = {}


class End(StepBase):
    """Completes the instance at once; what still runs or waits is cancelled."""

    type: Literal["end"]


class Notification(StepBase):
    type: Literal["notification"]
    channel: Literal["log", "email", "slack"]
    message: str
    to: list[str] = []
    title: str | None = None


def effective_retry(model: StepBase) -> RetryPolicy | None:
    """The step's retry policy: its own, or the default for steps that reach outside (agents,
    approvals and their notices, notifications); None for steps that only compute."""
    if model.retry is not None:
        return model.retry
    return DEFAULT_RETRY if isinstance(model, AgentTask | HumanApproval | Notification) else None


Step = Annotated[
    AgentTask | HumanApproval | Gateway | Timer | SubProcess | Notification | End,
    Field(discriminator="type"),
]
STEP_TYPES = ("agent_task", "human_approval", "gateway", "timer", "sub_process", "notification", "end")

# Fields that place a step in the graph; any other field may be written under `config:` instead.
COMMON_FIELDS = frozenset({"id", "type", "name", "description", "depends_on", "join", "cancel_others", "max_visits",
                           "for_each", "max_parallel", "complete_when", "cancel_remaining", "condition",
                           "config"})


class Process(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    version: int | None = Field(default=None, ge=1)
    description: str | None = None
    inputs: dict[str, InputSpec] = {}
    budget: Budget | None = None
    steps: list[Step] = Field(min_length=1)
    output: OutputActions = OutputActions()


class Document(Strict):
    process: Process
