"""An instance as data (for --json and the API) and as a table for people."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click
from sqlalchemy import Connection

from flowdb.db.instances import instance_row, step_rows
from flowdb.db.workers import unservable_steps


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def status_json(conn: Connection, instance_id: int) -> dict[str, Any]:
    instance = instance_row(conn, instance_id)
    # Ready steps no running worker can serve: what each waits for (db/workers.py).
    waits_for = unservable_steps(conn, instance_id) if instance.status == "running" else {}
    steps = []
    for row in step_rows(conn, instance_id):
        steps.append({
            "id": row.id, "step_id": row.step_id, "round": row.round, "item": row.item, "type": row.type,
            "status": row.status, "attempt": row.attempt, "waits_for": waits_for.get(row.id),
            "error_type": row.error_type if row.error is not None else None,
            "started_at": _iso(row.started_at), "finished_at": _iso(row.finished_at),
            "duration_s": _seconds(row.started_at, row.finished_at), "cost_usd": row.cost_usd,
            "output": row.output, "error": row.error, "agent": row.agent, "backend": row.agent_backend,
            "execution_id": row.agent_execution, "session_id": row.agent_session,
        })
    return {
        "id": instance.id, "process": instance.process_name, "version": instance.version,
        "status": instance.status, "inputs": instance.inputs, "outputs": instance.outputs,
        "error": instance.error, "cost_usd": instance.cost_usd,
        "created_at": _iso(instance.created_at), "started_at": _iso(instance.started_at),
        "finished_at": _iso(instance.finished_at),
        "duration_s": _seconds(instance.started_at, instance.finished_at), "steps": steps,
        "paused_at": _iso(instance.paused_at), "paused_by": instance.paused_by,
    }


def run_label(step_id: str, round_: int, item: int | None) -> str:
    """How a run of a step is shown: `check #2` for a loop's second round, `research[3]` for an item."""
    return step_id + (f" #{round_}" if round_ > 1 else "") + (f"[{item}]" if item is not None else "")


def _short(value: Any, width: int = 60) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def print_status(data: dict[str, Any]) -> None:
    click.echo(f"instance {data['id']}  {data['process']} v{data['version']}  {data['status']}"
               f"  cost ${data['cost_usd']:.4f}"
               + (f"  {data['duration_s']:.3f}s" if data["duration_s"] is not None else ""))
    if data["error"]:
        click.echo(f"error: {data['error']}")
    if data.get("paused_at"):
        click.echo(f"paused since {data['paused_at']} by {data['paused_by']}: no new step starts until "
                   f"flowdb resume {data['id']}")
    header = f"{'step':<24} {'type':<14} {'status':<10} {'att':>3} {'secs':>8}  output / error"
    click.echo(header)
    click.echo("-" * len(header))
    for step in data["steps"]:
        secs = f"{step['duration_s']:.3f}" if step["duration_s"] is not None else ""
        detail = step["error"] if step["error"] else _short(step["output"])
        if step.get("waits_for"):
            detail = step["waits_for"]
        elif step["status"] == "waiting" and step.get("execution_id"):
            detail = f"the agent still works on it (execution {step['execution_id']})"
        name = run_label(step["step_id"], step["round"], step["item"])
        click.echo(f"{name:<24} {step['type']:<14} {step['status']:<10} {step['attempt']:>3} "
                   f"{secs:>8}  {_short(detail)}")
    ran = [step for step in data["steps"] if step.get("backend")]
    if ran:  # agent state binding: which agent, backend, platform execution and session ran each step
        click.echo("agents:")
        for step in ran:
            where = ", ".join(f"{key.removesuffix('_id')} {step[key]}" for key in ("execution_id", "session_id")
                              if step.get(key))
            click.echo(f"  {run_label(step['step_id'], step['round'], step['item']):<22} {step['agent']} via "
                       f"{step['backend']}" + (f" ({where})" if where else ""))
    if data["outputs"] is not None:
        click.echo("outputs:")
        click.echo(json.dumps(data["outputs"], indent=2, default=str))
