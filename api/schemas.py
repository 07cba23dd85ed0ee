"""Bodies the API takes and gives, as pydantic models (they validate input and feed openapi.json)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flowdb.approvals import DECISION_WORDS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DefinitionOut(Strict):
    name: str
    version: int
    content_hash: str
    created_at: datetime | None
    created: bool = Field(description="false when identical content was already deployed")
    warnings: list[str] = Field(default_factory=list,
                                description="agents of the definition that no running worker serves (on deploy)")


class DefinitionSummary(Strict):
    name: str
    latest_version: int
    versions: int
    updated_at: datetime | None


class DefinitionList(Strict):
    items: list[DefinitionSummary]


class DefinitionVersion(Strict):
    name: str
    version: int
    content_hash: str
    created_at: datetime | None
    source: str = Field(description="the YAML as deployed")
    parsed: dict[str, Any]


class DefinitionDetail(Strict):
    name: str
    latest_version: int
    versions: list[DefinitionOut]


class StartIn(Strict):
    inputs: dict[str, Any] = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)


class RerunIn(Strict):
    from_step: str = Field(min_length=1, max_length=100, description="the step to run again, and all after it")
    version: int | None = Field(default=None, ge=1, le=2**31 - 1,
                                description="run the rest on this deployed version (it keeps the steps before)")


class StepOut(Strict):
    id: int = Field(description="step_instances.id (the step_instance_id of its events)")
    step_id: str
    round: int = Field(description="the loop round this row ran (1: the first visit)")
    item: int | None = Field(description="the for_each item's index; null for the step's own row")
    type: str
    status: str
    attempt: int
    max_attempts: int
    agent: str | None
    ready_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    input: Any
    output: Any
    error: str | None
    error_type: str | None = None  # StepTimeout, AgentRefused, an agent's exception class... (failed steps)
    cost_usd: float
    tokens_in: int
    tokens_out: int
    backend: str | None = Field(description="how the worker reached the agent: python, http or mcp (agent state "
                                "binding; null until an agent task ran)")
    execution_id: str | None = Field(description="the agent platform's execution that ran the step, or still runs "
                                     "it while the step waits")
    session_id: str | None = Field(description="the agent platform's chat session the step ran in")


class InstanceOut(Strict):
    id: int
    process: str
    version: int
    status: str
    trigger: str
    idempotency_key: str | None
    inputs: Any
    outputs: Any
    error: str | None
    cost_usd: float
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    paused_at: datetime | None = None  # paused (flowdb pause, POST .../pause): no new step starts
    paused_by: str | None = None


class InstanceDetail(InstanceOut):
    steps: list[StepOut]


class InstancePage(Strict):
    items: list[InstanceOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class EventOut(Strict):
    id: int
    instance_id: int
    step_instance_id: int | None
    step_id: str | None = Field(description="the step the event is about (null: about the instance)")
    round: int | None = Field(description="that step row's loop round (1: the first visit)")
    item: int | None = Field(description="that step row's for_each item index (null: the step's own row)")
    type: str
    payload: Any
    created_at: datetime | None


class EventPage(Strict):
    items: list[EventOut]
    next_cursor: str | None


class PauseOut(Strict):
    id: int
    paused: bool  # true after a pause, false after a resume
    paused_at: datetime | None
    paused_by: str | None


class ProcessPauseOut(Strict):
    process: str
    paused: bool
    instances: list[int]  # the instances paused (or resumed) by this request


class CancelOut(Strict):
    id: int
    status: Literal["cancelled"]
    cancelled_steps: list[str]


class CancelStepOut(Strict):
    id: int
    step_id: str
    step_status: Literal["cancelled"]


class BudgetOut(Strict):
    scope: str = Field(description="process (the whole instance) or step (one agent task)")
    step_id: str | None = Field(description="the step a step budget limits; null for the process's")
    max_cost_usd: float | None
    max_tokens: int | None
    on_exceed: str = Field(description="fail | pause | ask")
    approver: str | None
    raises: int = Field(description="approved asks that raised it")
    spent_usd: float
    spent_tokens: int
    running_steps: int


class BudgetList(Strict):
    items: list[BudgetOut]


class BudgetIn(Strict):
    step_id: str | None = Field(default=None, max_length=100,
                                description="the agent task whose own budget to set; omitted: the process's")
    max_cost_usd: float | None = Field(default=None, gt=0, lt=1e12, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1, le=2**62)


class RetryOut(Strict):
    id: int
    status: str
    step_id: str
    step_status: str


class VoteOut(Strict):
    approver: str
    decision: str | None
    comment: str | None
    decided_at: datetime | None


class ApprovalOut(Strict):
    id: int
    instance_id: int
    step_id: str
    status: str
    decision: str | None
    decided_by: str | None
    comment: str | None
    title: str
    instructions: str | None
    artifacts: list[str]
    approvers: list[str]
    quorum: int
    on_timeout: str
    timeout_s: float | None
    reminders: int
    requested_at: datetime | None
    due_at: datetime | None
    notified_at: datetime | None
    decided_at: datetime | None
    votes: list[VoteOut] | None = None


class ApprovalList(Strict):
    items: list[ApprovalOut]


class DecisionIn(Strict):
    # Read by flowdb.approvals.normalize_decision, as on the command line: the same words, the same refusal.
    decision: str = Field(max_length=20, json_schema_extra={"enum": list(DECISION_WORDS)},
                          description="approve or reject; approved and rejected are taken too, in any case")
    comment: str | None = Field(default=None, max_length=10_000)


class DecisionOut(Strict):
    approval: ApprovalOut
    decided: bool
    approvals_needed: int


class Health(Strict):
    status: Literal["ok", "degraded"]
    database: str
    redis: str
