"""Instances: start (with an Idempotency-Key), list (keyset pages), show, events, cancel, retry a step."""

from __future__ import annotations

import base64
import binascii

from sqlalchemy import Connection, Engine, select
from starlette.responses import Response

from flowdb.budget_ops import instance_budgets, set_budget
from flowdb.control import (
    cancel_instance,
    cancel_step,
    pause_instance,
    pause_process,
    resume_instance,
    resume_process,
    retry_step,
)
from flowdb.db.instances import DefinitionCache, StartRequest, find_definition, instance_row, start_instances, step_rows
from flowdb.db.tables import events, process_instances
from flowdb.rerun import rerun_instance

from ..convert import instance_out, step_out, utc
from ..endpoints import MAX_ID, Call, Endpoint, Header, Query, json_response
from ..problems import ApiError
from ..routes.events import event_out, event_rows
from ..schemas import (
    BudgetIn,
    BudgetList,
    BudgetOut,
    CancelOut,
    CancelStepOut,
    EventPage,
    InstanceDetail,
    InstancePage,
    PauseOut,
    ProcessPauseOut,
    RerunIn,
    RetryOut,
    StartIn,
)

I, E = process_instances, events  # noqa: E741
STATUSES = ("running", "completed", "failed", "cancelled")
MAX_LIMIT = 500


def _limit(call: Call, default: int = 50) -> int:
    raw = call.request.query_params.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(422, f"limit must be a whole number from 1 to {MAX_LIMIT}", kind="invalid-query")
    return int(raw)


def _cursor(call: Call) -> int | None:
    """Keyset pagination: the cursor is an opaque token for the last id of the previous page."""
    raw = call.request.query_params.get("cursor")
    if raw is None:
        return None
    try:
        value = base64.urlsafe_b64decode(raw.encode() + b"=" * (-len(raw) % 4)).decode()
        if not value.startswith("id:") or not (value[3:].isascii() and value[3:].isdigit()) \
                or int(value[3:]) > MAX_ID:
            raise ValueError
        return int(value[3:])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(422, "cursor is not one this API gave out; use next_cursor from the previous page",
                       kind="invalid-query") from None


def _next_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


async def start_instance(call: Call) -> Response:
    name = call.request.path_params["name"]
    body = await call.body(StartIn)
    key = call.request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 200:
        raise ApiError(422, "Idempotency-Key must be 1 to 200 characters", kind="invalid-header")

    definitions: DefinitionCache = call.request.app.state.definitions  # compiled once per process

    def start(engine: Engine) -> tuple[InstanceDetail, bool]:
        with engine.begin() as conn:
            definition_id, version = find_definition(conn, name, body.version)
            definition = definitions.get(conn, definition_id)
            [(instance_id, created)] = start_instances(conn, definition_id, version, definition,
                                                       [StartRequest(body.inputs, key)], trigger="api",
                                                       pinned_version=body.version is not None)
            detail = _detail(conn, instance_id)
        return detail, created

    detail, created = await call.db(start, call.engine)
    if created:
        call.wakeups.notify(workers=True, events=True)
    return json_response(detail, 201 if created else 200)


def _load_detail(engine: Engine, instance_id: int) -> InstanceDetail:
    with engine.connect() as conn:
        return _detail(conn, instance_id)


def _detail(conn: Connection, instance_id: int) -> InstanceDetail:
    row = instance_row(conn, instance_id)
    return InstanceDetail(**instance_out(row).model_dump(), steps=[step_out(s) for s in step_rows(conn, instance_id)])


async def list_instances(call: Call) -> Response:
    status = call.request.query_params.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(422, f"status must be one of {', '.join(STATUSES)}", kind="invalid-query")
    process = call.request.query_params.get("process")
    limit = _limit(call)
    after = _cursor(call)

    def load(engine: Engine) -> InstancePage:
        query = select(I).order_by(I.c.id.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(I.c.status == status)
        if process is not None:
            query = query.where(I.c.process_name == process)
        if after is not None:
            query = query.where(I.c.id < after)
        with engine.connect() as conn:
            rows = conn.execute(query).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return InstancePage(items=[instance_out(r) for r in rows],
                            next_cursor=_next_cursor(rows[-1].id) if more else None)

    return json_response(await call.db(load, call.engine))


async def get_instance(call: Call) -> Response:
    instance_id = call.path_int("instance_id")
    return json_response(await call.db(_load_detail, call.engine, instance_id))


async def instance_events(call: Call) -> Response:
    instance_id = call.path_int("instance_id")
    limit = _limit(call, 200)
    after = _cursor(call)

    def load(engine: Engine) -> EventPage:
        with engine.connect() as conn:
            instance_row(conn, instance_id)  # 404 when it does not exist
            query = event_rows().where(E.c.instance_id == instance_id).order_by(E.c.id).limit(limit + 1)
            if after is not None:
                query = query.where(E.c.id > after)
            rows = conn.execute(query).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return EventPage(items=[event_out(r) for r in rows],
                         next_cursor=_next_cursor(rows[-1].id) if more else None)

    return json_response(await call.db(load, call.engine))


async def cancel(call: Call) -> Response:
    instance_id = call.path_int("instance_id")
    reason = f"cancelled by {call.who.identity} over the API"
    steps = await call.db(cancel_instance, call.engine, instance_id, reason, call.wakeups)
    return json_response(CancelOut(id=instance_id, status="cancelled", cancelled_steps=steps))


async def cancel_one_step(call: Call) -> Response:
    instance_id = call.path_int("instance_id")
    step_id = call.request.path_params["step_id"]
    reason = f"cancelled by {call.who.identity} over the API"
    await call.db(cancel_step, call.engine, instance_id, step_id, reason, call.wakeups)
    return json_response(CancelStepOut(id=instance_id, step_id=step_id, step_status="cancelled"))


async def retry(call: Call) -> Response:
    instance_id = call.path_int("instance_id")
    step_id = call.request.path_params["step_id"]
    status = await call.db(retry_step, call.engine, instance_id, step_id)
    call.wakeups.notify(workers=True, events=True)
    return json_response(RetryOut(id=instance_id, status=status, step_id=step_id, step_status="ready"))


async def rerun(call: Call) -> Response:
    instance_id = call.path_int("instance_id")
    body = await call.body(RerunIn)
    await call.db(rerun_instance, call.engine, instance_id, body.from_step, f"{call.who.identity} (api)",
                  body.version, call.wakeups)
    return json_response(await call.db(_load_detail, call.engine, instance_id))


async def pause(call: Call) -> Response:
    instance_id = call.path_int("instance_id")
    await call.db(pause_instance, call.engine, instance_id, f"{call.who.identity} (api)", call.wakeups)
    return json_response(await call.db(_pause_state, call.engine, instance_id))


async def resume(call: Call) -> Response:
    instance_id = call.path_int("instance_id")
    await call.db(resume_instance, call.engine, instance_id, f"{call.who.identity} (api)", call.wakeups)
    return json_response(await call.db(_pause_state, call.engine, instance_id))


def _pause_state(engine: Engine, instance_id: int) -> PauseOut:
    with engine.connect() as conn:
        row = instance_row(conn, instance_id)
    return PauseOut(id=instance_id, paused=row.paused_at is not None, paused_at=utc(row.paused_at),
                    paused_by=row.paused_by)


async def pause_all(call: Call) -> Response:
    name = call.request.path_params["name"]
    ids = await call.db(pause_process, call.engine, name, f"{call.who.identity} (api)", call.wakeups)
    return json_response(ProcessPauseOut(process=name, paused=True, instances=ids))


async def resume_all(call: Call) -> Response:
    name = call.request.path_params["name"]
    ids = await call.db(resume_process, call.engine, name, f"{call.who.identity} (api)", call.wakeups)
    return json_response(ProcessPauseOut(process=name, paused=False, instances=ids))


async def budgets(call: Call) -> Response:
    instance_id = call.path_int("instance_id")

    def load(engine: Engine) -> BudgetList:
        with engine.connect() as conn:
            instance_row(conn, instance_id)  # 404 when it does not exist
            return BudgetList(items=[BudgetOut(**row) for row in instance_budgets(conn, instance_id)])

    return json_response(await call.db(load, call.engine))


async def change_budget(call: Call) -> Response:
    instance_id = call.path_int("instance_id")
    body = await call.body(BudgetIn)
    rows = await call.db(set_budget, call.engine, instance_id, body.step_id, body.max_cost_usd, body.max_tokens,
                         call.who.identity, call.wakeups)
    return json_response(BudgetList(items=[BudgetOut(**row) for row in rows]))


ENDPOINTS = [
    Endpoint("POST", "/v1/processes/{name}/instances", start_instance, "Start an instance", "operator", "instances",
             body=StartIn, responses={201: InstanceDetail, 200: InstanceDetail}, errors=(404, 409),
             headers=(Header("Idempotency-Key", "starting again with this key returns the same instance (200); "
                                                 "409 idempotency-conflict if the process, inputs or asked version "
                                                 "differ, 409 idempotency-in-progress (with Retry-After) while "
                                                 "another start with the key has not committed"),)),
    Endpoint("GET", "/v1/instances", list_instances, "List instances, newest first", "viewer", "instances",
             responses={200: InstancePage}, errors=(422,),
             query=(Query("status", {"type": "string", "enum": list(STATUSES)}, "only instances in this status"),
                    Query("process", {"type": "string"}, "only instances of this process"),
                    Query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "page size (50)"),
                    Query("cursor", {"type": "string"}, "next_cursor of the previous page"))),
    Endpoint("GET", "/v1/instances/{instance_id:int}", get_instance, "An instance with its steps", "viewer",
             "instances", responses={200: InstanceDetail}, errors=(404,)),
    Endpoint("GET", "/v1/instances/{instance_id:int}/events", instance_events, "An instance's events, in order",
             "viewer", "instances", responses={200: EventPage}, errors=(404, 422),
             query=(Query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "page size (200)"),
                    Query("cursor", {"type": "string"}, "next_cursor of the previous page"))),
    Endpoint("GET", "/v1/instances/{instance_id:int}/budgets", budgets,
             "An instance's budgets with what was spent against each", "viewer", "instances",
             responses={200: BudgetList}, errors=(404,)),
    Endpoint("POST", "/v1/instances/{instance_id:int}/budgets", change_budget,
             "Set a budget's limits for a running instance (wakes the steps a budget holds back)", "operator",
             "instances", body=BudgetIn, responses={200: BudgetList}, errors=(404, 409, 422)),
    Endpoint("POST", "/v1/instances/{instance_id:int}/cancel", cancel, "Cancel a running instance", "operator",
             "instances", responses={200: CancelOut}, errors=(404, 409)),
    Endpoint("POST", "/v1/instances/{instance_id:int}/rerun", rerun,
             "Run a finished instance again from a step (that step and those after it, as new rounds)", "operator",
             "instances", body=RerunIn, responses={200: InstanceDetail}, errors=(404, 409, 422)),
    Endpoint("POST", "/v1/instances/{instance_id:int}/pause", pause,
             "Pause a running instance: no new step of it starts until it resumes", "operator", "instances",
             responses={200: PauseOut}, errors=(404, 409)),
    Endpoint("POST", "/v1/instances/{instance_id:int}/resume", resume,
             "Resume a paused instance: its steps start as they are due", "operator", "instances",
             responses={200: PauseOut}, errors=(404, 409)),
    Endpoint("POST", "/v1/processes/{name}/pause", pause_all, "Pause every running instance of a process",
             "operator", "instances", responses={200: ProcessPauseOut}, errors=(404,)),
    Endpoint("POST", "/v1/processes/{name}/resume", resume_all, "Resume every paused instance of a process",
             "operator", "instances", responses={200: ProcessPauseOut}, errors=(404,)),
    Endpoint("POST", "/v1/instances/{instance_id:int}/steps/{step_id}/cancel", cancel_one_step,
             "Cancel one step (its successors go on as after a skipped step)", "operator", "instances",
             responses={200: CancelStepOut}, errors=(404, 409)),
    Endpoint("POST", "/v1/instances/{instance_id:int}/steps/{step_id}/retry", retry,
             "Retry a failed step (its instance runs again from there)", "operator", "instances",
             responses={200: RetryOut}, errors=(404, 409)),
]
