"""GET /healthz (is the database answering? Redis?) and GET /openapi.json; neither needs a token."""

from __future__ import annotations

import asyncio

import anyio
from sqlalchemy import Engine, text
from starlette.responses import JSONResponse, Response

from ..endpoints import Call, Endpoint, json_response
from ..schemas import Health

CHECK_SECONDS = 5.0  # a database check that has not answered by then counts as failed
# Redis answers a PING in well under a millisecond; one that takes longer than this is in trouble, and the
# probe must not be: the answer says so at once (Redis is optional, workers and streams poll without it).
REDIS_CHECK_SECONDS = 0.1


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _select_one(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1")).scalar_one()


async def _database(engine: Engine) -> str:
    try:
        # A thread that may be abandoned: a database that hangs (a dropped network) must not hang the probe.
        with anyio.move_on_after(CHECK_SECONDS):
            await anyio.to_thread.run_sync(_select_one, engine, abandon_on_cancel=True)
            return "ok"
        return f"no answer within {CHECK_SECONDS:g} s"
    except Exception as exc:  # whatever the driver raises, the answer is a body, never a 500
        return _first_line(exc)


async def _redis(redis_url: str | None) -> str:
    if not redis_url:
        return "not configured"
    try:
        import redis.asyncio as aredis

        client = aredis.Redis.from_url(redis_url, socket_connect_timeout=REDIS_CHECK_SECONDS,
                                       socket_timeout=REDIS_CHECK_SECONDS)
        try:
            await asyncio.wait_for(client.ping(), REDIS_CHECK_SECONDS)
        finally:
            await client.aclose()
    except TimeoutError:
        return f"no answer within {REDIS_CHECK_SECONDS:g} s"
    except Exception as exc:  # a bad URL, a refused connection, a wrong password...
        return _first_line(exc)
    return "ok"


async def healthz(call: Call) -> Response:
    database, redis = await asyncio.gather(_database(call.engine), _redis(call.settings.redis_url))
    ok = database == "ok" and redis in ("ok", "not configured")
    health = Health(status="ok" if ok else "degraded", database=database, redis=redis)
    # Without Redis the engine is only slower to wake up, so only a database that does not answer
    # makes the API unfit to serve (503, for load balancers); a Redis problem is `degraded` with 200.
    return json_response(health, status=200 if database == "ok" else 503)


async def openapi_json(call: Call) -> Response:
    return JSONResponse(call.request.app.state.openapi)


ENDPOINTS = [
    Endpoint("GET", "/healthz", healthz, "Whether the database (and Redis, when configured) answers: 503 when the "
             "database does not; 200 with status degraded when only Redis does not", role=None,
             tag="meta", responses={200: Health, 503: Health}),
    Endpoint("GET", "/openapi.json", openapi_json, "This API's OpenAPI 3.1 document", role=None, tag="meta",
             responses={200: None}),
]
