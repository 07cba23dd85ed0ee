"""The web UI's routes under /ui, mounted beside the API by api/app.py."""

from __future__ import annotations

from sqlalchemy import Engine
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from flowdb.notify import Wakeups
from flowdb.settings import Settings

from . import approvals, definitions, reports, runs
from .auth_pages import login_pages, logout
from .web import HERE, Handler, Page, UiCall, endpoint_of, home_for


async def home(call: UiCall) -> Response:
    return RedirectResponse(home_for(call.who), status_code=303)


def ui_routes(engine: Engine, settings: Settings, wakeups: Wakeups) -> list[BaseRoute]:
    def page(path: str, role: str | None, handler: Handler, method: str = "GET") -> Route:
        return Route(path, endpoint_of(Page(role, handler), engine, settings, wakeups), methods=[method])

    show_login, submit_login = login_pages(engine, settings)
    return [
        page("/ui", None, home), page("/ui/", None, home),
        Route("/ui/login", show_login, methods=["GET"]),
        Route("/ui/login", submit_login, methods=["POST"]),
        page("/ui/logout", None, logout, "POST"),
        page("/ui/runs", "viewer", runs.runs),
        page("/ui/instances/{instance_id:int}", "viewer", runs.instance_page),
        page("/ui/instances/{instance_id:int}/live", "viewer", runs.instance_live),
        page("/ui/instances/{instance_id:int}/graph.json", "viewer", runs.instance_graph),
        page("/ui/instances/{instance_id:int}/cancel", "operator", runs.cancel, "POST"),
        page("/ui/instances/{instance_id:int}/pause", "operator", runs.pause, "POST"),
        page("/ui/instances/{instance_id:int}/resume", "operator", runs.resume, "POST"),
        page("/ui/instances/{instance_id:int}/steps/{step_id}/retry", "operator", runs.retry, "POST"),
        page("/ui/instances/{instance_id:int}/steps/{step_id}/rerun", "operator", runs.rerun, "POST"),
        page("/ui/instances/{instance_id:int}/steps/{step_id}/cancel", "operator", runs.cancel_one_step, "POST"),
        page("/ui/approvals", "approver", approvals.inbox),
        page("/ui/approvals/{approval_id:int}/decision", "approver", approvals.decide_one, "POST"),
        page("/ui/definitions", "viewer", definitions.definitions_page),
        page("/ui/definitions/{name}", "viewer", definitions.latest_version),
        page("/ui/definitions/{name}/{version:int}", "viewer", definitions.version_page),
        page("/ui/definitions/{name}/{version:int}/start", "operator", definitions.start, "POST"),
        page("/ui/reports", "viewer", reports.reports_page),
        page("/ui/reports/{view}.csv", "viewer", reports.report_csv),
        page("/ui/reports/{view}", "viewer", reports.report_page),
        Route("/ui/static/highlight.css", definitions.highlight_stylesheet),
        Mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static"),
    ]
