"""The Starlette application: every endpoint from the route modules, errors as problem documents."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute

from flowdb.db.engine import make_engine
from flowdb.db.instances import DefinitionCache
from flowdb.errors import FlowdbError
from flowdb.notify import BackgroundWakeups
from flowdb.settings import Settings, load_settings

from . import openapi, problems
from .endpoints import Endpoint, route_of
from .routes import approvals, definitions, events, health, instances
from .ui.app import ui_routes

ENDPOINTS: list[Endpoint] = [*health.ENDPOINTS, *definitions.ENDPOINTS, *instances.ENDPOINTS,
                             *approvals.ENDPOINTS, *events.ENDPOINTS]


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> Starlette:
    """The API over the database in `settings` (or the given engine)."""
    settings = settings or load_settings()
    engine = engine or make_engine(settings.database_url)
    document = openapi.build(ENDPOINTS)
    # Wake-ups go out from a thread of their own: no request waits for Redis, even a hanging one.
    wakeups = BackgroundWakeups(settings.redis_url)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await anyio.to_thread.run_sync(wakeups.close)
        engine.dispose()

    routes: list[BaseRoute] = [route_of(endpoint, engine, settings, wakeups) for endpoint in ENDPOINTS]
    routes += ui_routes(engine, settings, wakeups)  # the web UI under /ui
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            problems.ApiError: problems.on_api_error,
            FlowdbError: problems.on_flowdb_error,
            SQLAlchemyError: problems.on_database_error,  # 503 database-unavailable while it is down
            HTTPException: problems.on_http_exception,
            Exception: problems.on_unexpected,
        },
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.wakeups = wakeups
    app.state.openapi = document  # served by GET /openapi.json (routes/health.py)
    app.state.definitions = DefinitionCache()  # compiled definitions by id, for starts
    return app
