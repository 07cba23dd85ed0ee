"""The live view `flowdb run` prints: each step as it starts and ends, then the outcome."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from flowdb.db.claims import Claimed
from flowdb.db.progress import Progress
from flowdb.definitions import CompiledDefinition
from flowdb.outcomes import Outcome
from flowdb.status import run_label
from flowdb.steptypes.registry import STEP_TYPES

MARKS = {"completed": "✓", "failed": "✗", "skipped": "–", "waiting": "…", "deferred": "↻"}


class LiveView:
    def __init__(self, definition: CompiledDefinition, instance_id: int) -> None:
        self.definition = definition
        self.instance_id = instance_id
        self.started: dict[int, float] = {}
        self.final: str | None = None

    def is_finished(self) -> bool:
        return self.final is not None

    def on_event(self, kind: str, data: Any) -> None:
        if kind == "claimed":
            for item in data:
                self._claimed(item)
        elif kind == "progress":
            outcomes, progress = data
            self._progress(outcomes, progress)
        elif kind == "actions":
            for action in data:
                if action.notice is None:
                    click.echo(f"  [{action.level}] {action.message}")

    def _claimed(self, item: Claimed) -> None:
        self.started[item.id] = time.monotonic()
        what = "woke" if item.woken else f"started (attempt {item.attempt})"
        click.echo(f"  ▶ {run_label(item.step_id, item.round, item.item):<28} {what}")

    def _progress(self, outcomes: list[Outcome], progress: Progress) -> None:
        late = {id(o) for o in progress.late}
        for outcome in outcomes:
            if id(outcome) in late:
                continue
            secs = time.monotonic() - self.started.get(outcome.step.id, time.monotonic())
            mark = MARKS.get(outcome.kind, "?")
            step = outcome.step
            retry = outcome.kind == "failed" and outcome.retryable and step.attempt < step.max_attempts
            label = run_label(step.step_id, step.round, step.item)
            if retry:  # the time it ran, then the delay its retry policy gives before the next attempt
                line = (f"  {mark} {label:<28} failed after {secs:.2f}s (attempt {step.attempt} of "
                        f"{step.max_attempts}); next attempt in {outcome.retry_delay:.2f}s")
            elif outcome.kind == "deferred":  # nothing ran: no attempt spent
                line = f"  {mark} {label:<28} put back; tries again in {outcome.retry_delay:.2f}s"
            else:
                line = f"  {mark} {label:<28} {outcome.kind} in {secs:.2f}s"
            if outcome.cost_usd:
                line += f"  ${outcome.cost_usd:.4f}"
            if outcome.error:
                line += f"  ({outcome.error})"
            click.echo(line)
            step_type = STEP_TYPES.get(outcome.step.type)
            if step_type is not None:
                said = step_type.describe_done(outcome) if outcome.kind == "completed" \
                    else step_type.describe_wait(outcome)
                if said:
                    click.echo(f"      {said}")
        for instance_id, status in progress.finished_instances:
            if instance_id == self.instance_id:
                self.final = status

    def summary(self, status: dict[str, Any], seconds: float) -> None:
        click.echo(f"instance {self.instance_id} {status['status']} in {seconds:.2f}s"
                   f" · {len(status['steps'])} steps · cost ${status['cost_usd']:.4f}")
        if status["error"]:
            click.echo(f"error: {status['error']}")
        if status.get("paused_at"):
            click.echo(f"paused by {status['paused_by']}: fix what failed, then flowdb resume {self.instance_id} "
                       "(a worker runs the rest)")
        if status["outputs"] is not None:
            click.echo("outputs:")
            click.echo(json.dumps(status["outputs"], indent=2, default=str))
