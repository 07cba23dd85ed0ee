"""The web UI's pages over real HTTP (httpx against the app on a real uvicorn), on SQLite and PostgreSQL:
signing in and out, CSRF, roles, escaping of user data, the start form, the runs page's filters and
paging, reports, and what a session cookie may do on the API. Each test checks the database too where
a page could write something."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from sqlalchemy import Engine, func, insert, select, update

from flowdb.db.tables import api_tokens, ui_sessions
from flowdb.db.tables import approval_approvers as AA
from flowdb.db.tables import approvals as A
from flowdb.db.tables import events as E
from flowdb.db.tables import process_instances as I
from flowdb.db.tables import step_instances as S
from flowdb.db.views import view_names
from flowdb.reports import run_report
from flowdb.tokens import create_token, revoke_token
from flowdb_api.routes import events as events_route

from apiserver import ApiServer
from conftest import EXAMPLES
from helpers import AGENTS_FILE, drive, start, waiting_for_decision

REVIEWED = (EXAMPLES / "reviewed-report.yaml").read_text()
EXAMPLE_AGENTS = EXAMPLES / "agents.yaml"
MANAGER = "manager@company.com"  # the approver reviewed-report lists
CSRF = re.compile(r'name="csrf" value="([^"]*)"')
XSS_TAG = "<script>alert(1)</script>"
XSS_ATTR = '"><img src=x onerror=alert(1)>'
XSS_TAG_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
XSS_ATTR_ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"
DIAGRAM = re.compile(r'<script type="application/json" id="diagram-data">(.*?)</script>', re.S)

# A step that fails at once (NonRetryableError) and one the failure cancels: a failed instance to retry.
FAILS = """
process:
  name: fails
  steps:
    - {id: first, type: agent_task, agent: refuses, message: "go"}
    - {id: second, type: agent_task, agent: noop, message: "after", depends_on: [first]}
"""

# Inputs of each kind the start form makes a field for.
TYPED = """
process:
  name: typed
  inputs:
    title: {type: string, description: "what it is about"}
    count: {type: integer, default: 3}
    urgent: {type: boolean, default: false}
    meta: {type: object, required: false}
  steps:
    - {id: only, type: agent_task, agent: noop, message: "{{ inputs.title }}"}
"""

# reviewed-report with a step name that would close the diagram's <script> element if written raw.
XSS_PROCESS = f"""
process:
  name: xss-report
  steps:
    - id: draft
      name: {json.dumps("</script>" + XSS_TAG + XSS_ATTR)}
      type: agent_task
      agent: writer
      message: "Write draft report"
    - id: review
      type: human_approval
      depends_on: [draft]
      config:
        approvers: [{MANAGER}]
"""


# An agent that answers with its message: whatever the input holds comes back as the step's output.
ECHOES = """
process:
  name: echoes
  inputs: {msg: {type: string}}
  steps:
    - {id: say, type: agent_task, agent: echo, message: "{{ inputs.msg }}"}
"""


def simple(name: str) -> str:
    """A one-step process with a string input (no digits anywhere, so a search for an id matches only ids)."""
    return f"""
process:
  name: {name}
  inputs: {{topic: {{type: string, default: none}}}}
  steps:
    - {{id: only, type: agent_task, agent: noop, message: "go"}}
"""


def none_broken(broken: list[Any], what: str) -> None:
    """Every check runs first and the failures are listed together (the list is complete)."""
    assert broken == [], f"{what}: {broken}"


# -- a browser over httpx ------------------------------------------------------------------------------


def assert_secure_headers(response: httpx.Response) -> None:
    """Every HTML page: scripts only from this server, never framed, no MIME sniffing."""
    if response.headers.get("content-type", "").startswith("text/html"):
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy, policy
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"


class Browser:
    """A signed-in (or not) browser: its own cookies, no redirects followed, every HTML page's headers checked."""

    def __init__(self, server: ApiServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=30, follow_redirects=False)
        self._csrf: str | None = None

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.get(path, **kwargs)
        assert_secure_headers(response)
        return response

    def post(self, path: str, data: dict[str, str] | None = None, *, csrf: str | None = "session",
             **kwargs: Any) -> httpx.Response:
        """A form POST; `csrf`: "session" sends this session's token, None sends none, anything else as is."""
        fields = dict(data or {})
        if csrf == "session":
            fields["csrf"] = self.csrf
        elif csrf is not None:
            fields["csrf"] = csrf
        response = self.http.post(path, data=fields, **kwargs)
        assert_secure_headers(response)
        return response

    def login_form(self, next_: str | None = None) -> str:
        """GET /ui/login: sets the flowdb_login cookie; returns the form's CSRF token."""
        page = self.get("/ui/login", params={"next": next_} if next_ is not None else None)
        assert page.status_code == 200, page.text
        assert "flowdb_login" in self.http.cookies
        return str(CSRF.findall(page.text)[0])

    def sign_in(self, token: str, next_: str = "/ui/runs") -> httpx.Response:
        response = self.post("/ui/login", {"token": token, "next": next_}, csrf=self.login_form())
        self._csrf = None
        return response

    @property
    def csrf(self) -> str:
        """The session's CSRF token, from the sign-out form every signed-in page (an error page too) carries."""
        if self._csrf is None:
            page = self.get("/ui/runs")
            assert page.status_code in (200, 403), page.text
            self._csrf = CSRF.findall(page.text)[-1]
        return self._csrf

    def close(self) -> None:
        self.http.close()


@contextmanager
def browser(server: ApiServer, role: str | None = None, identity: str | None = None) -> Iterator[Browser]:
    """A browser, signed in with a new token of `role` unless None."""
    b = Browser(server)
    try:
        if role is not None:
            assert b.sign_in(server.token(role, identity)).status_code == 303
        yield b
    finally:
        b.close()


# -- the database ------------------------------------------------------------------------------------------


def admin(server: ApiServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=server.auth("admin"), timeout=30)


def deploy(server: ApiServer, *sources: str) -> None:
    with admin(server) as http:
        for source in sources:
            response = http.post("/v1/definitions", content=source, headers={"content-type": "application/yaml"})
            assert response.status_code in (200, 201), response.text


def start_api(server: ApiServer, process: str, inputs: dict[str, Any] | None = None) -> int:
    with admin(server) as http:
        response = http.post(f"/v1/processes/{process}/instances", json={"inputs": inputs or {}})
        assert response.status_code == 201, response.text
        return int(response.json()["id"])


def count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def status_of(engine: Engine, instance_id: int) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(I.c.status).where(I.c.id == instance_id)).scalar_one())


def step_status(engine: Engine, instance_id: int, step_id: str) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(S.c.status).where(S.c.instance_id == instance_id, S.c.step_id == step_id,
                                                         S.c.item.is_(None))
                                .order_by(S.c.round.desc()).limit(1)).scalar_one())


def snapshot(engine: Engine) -> tuple[Any, ...]:
    """Everything a UI action could change: instances, steps, approvals and their votes, sessions aside."""
    with engine.connect() as conn:
        return (
            sorted(tuple(r) for r in conn.execute(select(I.c.id, I.c.status, I.c.error))),
            sorted(tuple(r) for r in conn.execute(select(S.c.id, S.c.status, S.c.attempt))),
            sorted(tuple(r) for r in conn.execute(select(A.c.id, A.c.status, A.c.decision))),
            sorted(tuple(r) for r in conn.execute(select(AA.c.approval_id, AA.c.approver, AA.c.decision))),
        )


def the_approval(engine: Engine, instance_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(A).where(A.c.instance_id == instance_id)).one()


def fail_instance(server: ApiServer) -> int:
    """An instance of FAILS, worked until it failed (FAILS deployed)."""
    iid = start_api(server, "fails")
    drive(server.engine, lambda: status_of(server.engine, iid) != "running", AGENTS_FILE)
    assert status_of(server.engine, iid) == "failed"
    return iid


def waiting_reviews(server: ApiServer, process: str, n: int) -> list[int]:
    """`n` instances of `process` (reviewed-report-like), worked until each one's approval is pending."""
    ids = [start_api(server, process) for _ in range(n)]
    drive(server.engine, waiting_for_decision(server.engine, count(server.engine, A) + n), EXAMPLE_AGENTS)
    return ids


def text_of(page: httpx.Response) -> str:
    """A page's text with entities decoded (to look for messages, not to check escaping)."""
    return html.unescape(page.text)


def buttons(page: str) -> list[str]:
    return [html.unescape(re.sub(r"<[^>]+>", "", b)).strip() for b in re.findall(r"<button\b.*?</button>", page, re.S)]


def post_forms(page: str) -> list[str]:
    return re.findall(r'<form[^>]*method="post"[^>]*action="([^"]+)"', page)


# -- 1. signing in and out ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sign_in_and_out(api_server: ApiServer) -> None:
    engine = api_server.engine
    with browser(api_server) as b:
        # Any page without a session: to the sign-in page, which comes back to it.
        for path in ("/ui/runs", "/ui/instances/1", "/ui/definitions", "/ui/reports/v_instance_summary",
                     "/ui/approvals", "/ui/runs?status=failed&q=x"):
            gone = b.get(path)
            assert gone.status_code == 303, (path, gone.text)
            assert gone.headers["location"] == f"/ui/login?next={quote(path, safe='')}"
        refused = b.post("/ui/instances/1/cancel", csrf="anything")
        assert refused.status_code == 401 and "session has ended" in text_of(refused)

        # The sign-in form's own CSRF token: its cookie and its field must both be there and match.
        token = api_server.token("operator", "op@example.com")
        login_csrf = b.login_form("/ui/reports")
        assert b.post("/ui/login", {"token": token, "next": "/ui/reports"}, csrf=None).status_code == 403
        assert b.post("/ui/login", {"token": token, "next": "/ui/reports"}, csrf="wrong").status_code == 403
        b.http.cookies.delete("flowdb_login")
        assert b.post("/ui/login", {"token": token, "next": "/ui/reports"}, csrf=login_csrf).status_code == 403
        assert count(engine, ui_sessions) == 0

        # A bad token and a revoked one: 401 with the reason, no session.
        for bad, reason in ("fdb_" + "x" * 40, "not valid"), ("not-a-token", "not valid"), ("", "required"):
            page = b.post("/ui/login", {"token": bad, "next": "/ui/runs"}, csrf=b.login_form())
            assert page.status_code == 401, page.text
            assert "Cannot sign in" in text_of(page) and "flowdb tokens create" in text_of(page)
            assert reason in text_of(page).lower(), (reason, page.text)
        revoked_token = api_server.token("operator", "gone@example.com")
        revoke_token(engine, token_id_of(engine, "gone@example.com"))
        page = b.post("/ui/login", {"token": revoked_token, "next": "/ui/runs"}, csrf=b.login_form())
        assert page.status_code == 401 and "revoked" in text_of(page)
        assert count(engine, ui_sessions) == 0 and "flowdb_session" not in b.http.cookies

        # A good token: 303 to `next`, an HttpOnly, SameSite=lax session cookie for the whole site.
        signed = b.post("/ui/login", {"token": token, "next": "/ui/reports"}, csrf=b.login_form())
        assert signed.status_code == 303 and signed.headers["location"] == "/ui/reports"
        cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith("flowdb_session="))
        attributes = {part.strip().split("=")[0].lower(): part.strip().partition("=")[2]
                      for part in cookie.split(";")[1:]}
        assert "httponly" in attributes and attributes["samesite"].lower() == "lax" and attributes["path"] == "/"
        assert count(engine, ui_sessions) == 1
        assert b.get("/ui/reports").status_code == 200
        assert b.get("/ui").headers["location"] == "/ui/runs" and b.get("/ui/").headers["location"] == "/ui/runs"
        # Signed in, the sign-in page sends on (and still only within the UI).
        assert b.get("/ui/login", params={"next": "/ui/definitions"}).headers["location"] == "/ui/definitions"
        assert b.get("/ui/login", params={"next": "//evil.example/x"}).headers["location"] == "/ui/runs"

    # `next` never leaves the UI.
    for target in ("//evil.example/x", "https://evil.example", "/\\evil", "/ui/../\\evil", "javascript:alert(1)",
                   "/\t/evil.example"):
        with browser(api_server) as b:
            shown = b.get("/ui/login", params={"next": target})
            assert 'name="next" value="/ui/runs"' in shown.text, (target, shown.text)
            went = b.sign_in(api_server.token("viewer"), next_=target)
            assert went.status_code == 303 and went.headers["location"] == "/ui/runs", (target, went.headers)

    # Revoking the token ends its session at once; signing out deletes the session's row.
    with browser(api_server, "operator", "revoked@example.com") as b:
        assert b.get("/ui/runs").status_code == 200
        before = count(engine, ui_sessions)
        revoke_token(engine, token_id_of(engine, "revoked@example.com"))
        ended = b.get("/ui/runs")
        assert ended.status_code == 303 and ended.headers["location"] == "/ui/login?next=%2Fui%2Fruns"
        with httpx.Client(base_url=api_server.url, cookies=b.http.cookies) as api:
            assert api.get("/v1/instances").status_code == 401
        assert count(engine, ui_sessions) == before  # the row stays, dead with its token
    with browser(api_server, "viewer", "leaving@example.com") as b:
        mine = token_id_of(engine, "leaving@example.com")
        assert count(engine, ui_sessions, ui_sessions.c.token_id == mine) == 1
        assert b.post("/ui/logout", csrf=None).status_code == 403  # signing out is a form like any other
        out = b.post("/ui/logout")
        assert out.status_code == 303 and out.headers["location"] == "/ui/login"
        assert count(engine, ui_sessions, ui_sessions.c.token_id == mine) == 0
        assert "flowdb_session" not in b.http.cookies
        assert b.get("/ui/runs").status_code == 303


def test_a_session_lasts_its_hours_and_then_ends(api_server: ApiServer) -> None:
    engine = api_server.engine
    hours = api_server.settings.ui_session_hours
    with browser(api_server) as b:
        # Sent to the sign-in page from a page with a query: back to that very page afterwards.
        target = "/ui/runs?status=failed&q=x%2By"
        gone = b.get(target)
        assert gone.status_code == 303
        login = b.get(gone.headers["location"])
        assert f'name="next" value="{html.escape(target)}"' in login.text
        signed = b.post("/ui/login", {"token": api_server.token("viewer"), "next": target},
                        csrf=CSRF.findall(login.text)[0])
        assert signed.status_code == 303 and signed.headers["location"] == target
        cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith("flowdb_session="))
        assert f"max-age={int(hours * 3600)}" in cookie.lower()
        with engine.connect() as conn:
            row = conn.execute(select(ui_sessions)).one()
        assert abs((row.expires_at - row.created_at).total_seconds() - hours * 3600) < 1
        assert b.get(target).status_code == 200

        # Past its time the session is over; the next sign-in clears such rows.
        with engine.begin() as conn:
            conn.execute(update(ui_sessions).values(expires_at=row.created_at - timedelta(minutes=1)))
        ended = b.get("/ui/definitions")
        assert ended.status_code == 303 and ended.headers["location"] == "/ui/login?next=%2Fui%2Fdefinitions"
        assert b.post("/ui/logout", csrf="anything").status_code == 401
        assert b.sign_in(api_server.token("viewer")).status_code == 303
        assert count(engine, ui_sessions) == 1
        assert count(engine, ui_sessions, ui_sessions.c.session_hash == row.session_hash) == 0
        assert b.get("/ui/definitions").status_code == 200
    with browser(api_server) as b:  # a sign-in form posted from another site (its Origin) is refused
        refused = b.post("/ui/login", {"token": api_server.token("viewer"), "next": "/ui/runs"},
                         csrf=b.login_form(), headers={"Origin": "http://evil.example"})
        assert refused.status_code == 403 and count(engine, ui_sessions) == 1


def token_id_of(engine: Engine, identity: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(api_tokens.c.id).where(api_tokens.c.identity == identity)).scalar_one())


# -- 2. CSRF -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_forms_need_the_session_csrf_token_and_this_origin(api_server: ApiServer) -> None:
    engine = api_server.engine
    deploy(api_server, REVIEWED)
    to_cancel, to_decide = waiting_reviews(api_server, "reviewed-report", 2)
    approval = the_approval(engine, to_decide)
    evil = {"Origin": "http://evil.example"}
    with browser(api_server, "operator", MANAGER) as b:
        here = {"Origin": api_server.url}
        for path, fields in ((f"/ui/instances/{to_cancel}/cancel", {}),
                             (f"/ui/approvals/{approval.id}/decision", {"decision": "approve", "comment": "ok"}),
                             ("/ui/definitions/reviewed-report/1/start", {})):
            before = snapshot(engine)
            for csrf, headers in ((None, {}), ("wrong", {}), (b.csrf[:-1], {}), ("session", evil),
                                  ("session", {"Origin": "null"})):
                refused = b.post(path, fields, csrf=csrf, headers=headers)
                assert refused.status_code == 403, (path, csrf, headers, refused.text)
                assert "CSRF token is missing or wrong" in text_of(refused)
            assert snapshot(engine) == before, path
            # Another session's token is no better than none.
            with browser(api_server, "operator", MANAGER) as other:
                assert b.post(path, fields, csrf=other.csrf).status_code == 403
            assert snapshot(engine) == before, path

        instances = count(engine, I)
        done = b.post(f"/ui/instances/{to_cancel}/cancel", headers=here)
        assert done.status_code == 303 and done.headers["location"] == f"/ui/instances/{to_cancel}?done=cancelled"
        assert status_of(engine, to_cancel) == "cancelled"
        assert "The instance was cancelled." in b.get(done.headers["location"]).text

        decided = b.post(f"/ui/approvals/{approval.id}/decision", {"decision": "approve", "comment": "fine"})
        assert decided.status_code == 303 and decided.headers["location"] == "/ui/approvals?done=approved"
        row = the_approval(engine, to_decide)
        assert (row.status, row.decision, row.decided_by) == ("approved", "approved", MANAGER)
        with engine.connect() as conn:
            vote = conn.execute(select(AA.c.decision, AA.c.comment).where(AA.c.approval_id == approval.id)).one()
        assert tuple(vote) == ("approved", "fine")
        assert "Recorded: approved." in b.get(decided.headers["location"]).text
        decided_page = b.get("/ui/approvals", params={"status": "approved"})
        assert f'id="approval-{approval.id}"' in decided_page.text
        assert "fine" in decided_page.text and ">Approve<" not in decided_page.text
        assert f'id="approval-{approval.id}"' not in b.get("/ui/approvals").text  # no longer pending
        before = snapshot(engine)
        again = b.post(f"/ui/approvals/{approval.id}/decision", {"decision": "reject"})
        assert again.status_code == 409, again.text
        for fields, what in (({"decision": "maybe"}, "choose Approve or Reject"), ({}, "choose Approve or Reject"),
                             ({"decision": "approve", "comment": "x" * 4001}, "longer than 4000")):
            refused = b.post(f"/ui/approvals/{approval.id}/decision", fields)
            assert refused.status_code == 422 and what in text_of(refused), (fields, refused.text)
        assert b.post("/ui/approvals/999999/decision", {"decision": "approve"}).status_code == 404
        assert b.get("/ui/approvals", params={"status": "lost"}).status_code == 422
        assert snapshot(engine) == before

        started = b.post("/ui/definitions/reviewed-report/1/start", headers=here)
        assert started.status_code == 303, started.text
        new_id = int(started.headers["location"].rsplit("/", 1)[1])
        assert started.headers["location"] == f"/ui/instances/{new_id}"
        assert count(engine, I) == instances + 1
        with engine.connect() as conn:
            new = conn.execute(select(I).where(I.c.id == new_id)).one()
        assert (new.process_name, new.status, new.trigger) == ("reviewed-report", "running", "ui")


# -- 3. roles ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_roles_see_and_do_only_what_they_may(api_server: ApiServer) -> None:
    engine = api_server.engine
    deploy(api_server, REVIEWED, FAILS)
    failed = fail_instance(api_server)
    [waiting] = waiting_reviews(api_server, "reviewed-report", 1)
    approval = the_approval(engine, waiting)
    actions = [(f"/ui/instances/{waiting}/cancel", {}),
               (f"/ui/instances/{failed}/steps/first/retry", {}),
               (f"/ui/instances/{waiting}/steps/review/cancel", {}),
               ("/ui/definitions/reviewed-report/1/start", {}),
               (f"/ui/approvals/{approval.id}/decision", {"decision": "approve"})]

    # A viewer reads everything but approvals, sees no button but Sign out (and the runs filter), changes nothing.
    with browser(api_server, "viewer", MANAGER) as viewer:
        for path in ("/ui/runs", f"/ui/instances/{waiting}", f"/ui/instances/{failed}",
                     f"/ui/instances/{waiting}/live", "/ui/definitions", "/ui/definitions/reviewed-report/1",
                     "/ui/reports", "/ui/reports/v_instance_summary"):
            page = viewer.get(path)
            assert page.status_code == 200, (path, page.text)
            shown = [b for b in buttons(page.text) if b != "Sign out"]
            assert shown == (["Filter"] if path == "/ui/runs" else []), (path, shown)
            assert post_forms(page.text) == ([] if path.endswith("/live") else ["/ui/logout"]), path
            for absent in ('/start"', ">Cancel step<", ">Retry<", ">Cancel instance<", ">Approve<"):
                assert absent not in page.text, (path, absent, page.text[page.text.find(absent) - 300:][:600])
        before = snapshot(engine)
        instances = count(engine, I)
        for path, fields in actions:
            refused = viewer.post(path, fields)
            assert refused.status_code == 403, (path, refused.text)
            assert "you are signed in as manager@company.com with the viewer role" in text_of(refused)
        assert snapshot(engine) == before and count(engine, I) == instances
        assert viewer.get("/ui/approvals").status_code == 403
        assert 'href="/ui/approvals"' not in viewer.get("/ui/runs").text

    # An approver: its inbox (title, quorum, the reviewed step's output), and nothing of the runs.
    with browser(api_server, "approver", MANAGER) as approver:
        inbox = approver.get("/ui/approvals")
        assert inbox.status_code == 200
        text = text_of(inbox)
        assert approval.title in text and "0 of 1 approval needed" in text
        with engine.connect() as conn:
            draft = conn.execute(select(S.c.output).where(S.c.instance_id == waiting, S.c.step_id == "draft")
                                 ).scalar_one()
        assert draft["text"].startswith("Report (") and draft["text"] in text and draft["output_path"] in text
        assert buttons(inbox.text) == ["Sign out", "Approve", "Reject"]
        assert f"/ui/approvals/{approval.id}/decision" in post_forms(inbox.text)
        for path in ("/ui/runs", f"/ui/instances/{waiting}", "/ui/definitions", "/ui/reports"):
            assert approver.get(path).status_code == 403, path
        before = snapshot(engine)
        for path, fields in actions[:4]:
            assert approver.post(path, fields).status_code == 403, path
        assert snapshot(engine) == before
        # Someone this approval does not list finds nothing to decide.
        with browser(api_server, "approver", "someone@example.com") as stranger:
            assert "No pending approvals list you." in stranger.get("/ui/approvals").text
            assert stranger.post(f"/ui/approvals/{approval.id}/decision", {"decision": "approve"}).status_code == 404
        assert snapshot(engine) == before

    # An operator: Cancel instance and Cancel step on a running instance, Retry on a failed step; they work.
    with browser(api_server, "operator") as operator:
        running = operator.get(f"/ui/instances/{waiting}")
        assert "Cancel instance" in buttons(running.text) and "Cancel step" in buttons(running.text)
        assert f"/ui/instances/{waiting}/steps/review/cancel" in post_forms(running.text)
        assert 'aria-label="Cancel step review"' in running.text
        assert "Retry" not in buttons(running.text)
        broken = operator.get(f"/ui/instances/{failed}")
        assert buttons(broken.text) == ["Sign out", "Retry", "Rerun from here"]  # a finished instance reruns
        assert 'aria-label="Retry step first"' in broken.text
        assert "Start" in buttons(operator.get("/ui/definitions/reviewed-report/1").text)

        retried = operator.post(f"/ui/instances/{failed}/steps/first/retry")
        assert retried.status_code == 303 and retried.headers["location"] == f"/ui/instances/{failed}?done=retried"
        assert status_of(engine, failed) == "running" and step_status(engine, failed, "first") == "ready"
        assert step_status(engine, failed, "second") == "pending"
        again = operator.post(f"/ui/instances/{failed}/steps/first/retry")  # no longer failed: refused, unchanged
        assert again.status_code == 409 and "only failed steps" in text_of(again)

        cancelled = operator.post(f"/ui/instances/{waiting}/steps/review/cancel")
        assert cancelled.status_code == 303
        assert cancelled.headers["location"] == f"/ui/instances/{waiting}?done=step-cancelled"
        assert step_status(engine, waiting, "review") == "cancelled"
        assert the_approval(engine, waiting).status == "cancelled"
        assert operator.post("/ui/instances/999999/cancel").status_code == 404


# -- 4. escaping ---------------------------------------------------------------------------------------------


def assert_escaped(page: httpx.Response, *, tag: bool = True, attr: bool = True) -> None:
    """The payloads appear only as text: never raw, and escaped where the page shows them."""
    assert page.status_code == 200, page.text
    for raw in (XSS_TAG, XSS_ATTR, "<img src=x", "onerror=alert(1)>"):
        assert raw not in page.text, (raw, page.url)
    if tag:
        assert XSS_TAG_ESCAPED in page.text, page.url
    if attr:
        assert XSS_ATTR_ESCAPED in page.text, page.url


def diagram_data(page: httpx.Response) -> dict[str, Any]:
    [data] = DIAGRAM.findall(page.text)
    assert "<" not in data and ">" not in data, data
    graph: dict[str, Any] = json.loads(data)
    return graph


@pytest.mark.slow
def test_user_data_is_shown_as_text(api_server: ApiServer) -> None:
    engine = api_server.engine
    deploy(api_server, XSS_PROCESS, ECHOES)
    # Through the real pipeline first: an input that an agent echoes into its output.
    echoed = start_api(api_server, "echoes", {"msg": XSS_TAG + XSS_ATTR})
    drive(engine, lambda: status_of(engine, echoed) != "running", AGENTS_FILE)
    assert status_of(engine, echoed) == "completed"
    with engine.connect() as conn:
        assert conn.execute(select(S.c.output).where(S.c.instance_id == echoed)).scalar_one() == XSS_TAG + XSS_ATTR
    with engine.begin() as conn:  # no event carries user text by itself yet: one that does
        conn.execute(insert(E).values(instance_id=echoed, type="step.note", payload={"note": XSS_TAG + XSS_ATTR},
                                      created_at=datetime.now(UTC)))
    [iid] = waiting_reviews(api_server, "xss-report", 1)
    both = {"tag": XSS_TAG, "attr": XSS_ATTR}
    with engine.begin() as conn:
        conn.execute(update(I).where(I.c.id == iid).values(inputs=both, outputs={"out": XSS_TAG},
                                                           error=f"{XSS_TAG} {XSS_ATTR}"))
        conn.execute(update(S).where(S.c.instance_id == iid, S.c.step_id == "draft").values(
            input={"message": XSS_ATTR}, output={"text": XSS_TAG, "output_path": XSS_ATTR},
            error=f"{XSS_ATTR} {XSS_TAG}"))
        conn.execute(update(A).where(A.c.instance_id == iid).values(
            title=f"Review {XSS_TAG}", instructions=XSS_ATTR, artifacts=[XSS_TAG, XSS_ATTR]))
    label = "</script>" + XSS_TAG + XSS_ATTR
    with browser(api_server, "operator", MANAGER) as b:
        for path in (f"/ui/instances/{echoed}", f"/ui/instances/{echoed}/live"):
            page = b.get(path)
            assert_escaped(page)
            timeline = page.text.split('<ol class="timeline">', 1)[1]
            assert XSS_TAG_ESCAPED in timeline and XSS_ATTR_ESCAPED in timeline  # the event written above
        page = b.get(f"/ui/instances/{iid}")
        assert_escaped(page)
        assert "</script><script>" not in page.text
        graph = diagram_data(page)
        assert graph["nodes"][0]["label"] == label  # the same text once the JSON is read
        assert_escaped(b.get(f"/ui/instances/{iid}/live"))
        graph_json = b.get(f"/ui/instances/{iid}/graph.json")
        assert graph_json.headers["content-type"] == "application/json"
        assert graph_json.headers["x-content-type-options"] == "nosniff"
        assert graph_json.json()["nodes"][0]["label"] == label

        runs = b.get("/ui/runs")
        assert_escaped(runs)
        assert f'<td class="error-text">{XSS_TAG_ESCAPED} &#34;&gt;{XSS_ATTR_ESCAPED}</td>' in runs.text

        inbox = b.get("/ui/approvals")
        assert_escaped(inbox)
        assert f"<h2 id=\"approval-{the_approval(engine, iid).id}-title\">Review {XSS_TAG_ESCAPED}</h2>" in inbox.text

        definition = b.get("/ui/definitions/xss-report/1")
        assert_escaped(definition, tag=False, attr=False)  # the YAML is Pygments' markup: its own escaping
        assert "</script><script>" not in definition.text
        assert diagram_data(definition)["nodes"][0]["label"] == label

        # What a user types into a URL comes back escaped too.
        searched = b.get("/ui/runs", params={"q": XSS_ATTR})
        assert_escaped(searched, tag=False)
        assert 'value="&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"' in searched.text
    with browser(api_server) as anonymous:
        login = anonymous.get("/ui/login", params={"next": "/ui/runs?q=" + XSS_ATTR + XSS_TAG})
        assert_escaped(login)


# -- 5. the start form ---------------------------------------------------------------------------------------


def test_start_form_types_the_inputs(api_server: ApiServer) -> None:
    engine = api_server.engine
    deploy(api_server, TYPED)
    with browser(api_server, "operator") as b:
        form = b.get("/ui/definitions/typed")
        assert form.status_code == 303 and form.headers["location"] == "/ui/definitions/typed/1"
        form = b.get("/ui/definitions/typed/1")
        for field in ("input.title", "input.count", "input.urgent", "input.meta"):
            assert f'name="{field}"' in form.text, field
        assert "(string, required)" in form.text and "(integer)" in form.text and "what it is about" in form.text

        started = b.post("/ui/definitions/typed/1/start", {"input.title": "Quarterly", "input.count": " 42 ",
                                                          "input.urgent": "true",
                                                          "input.meta": '{"owner": "ana", "tags": [1, 2]}'})
        assert started.status_code == 303, started.text
        first = int(started.headers["location"].removeprefix("/ui/instances/"))
        with engine.connect() as conn:
            row = conn.execute(select(I.c.inputs, I.c.trigger, I.c.process_name).where(I.c.id == first)).one()
        assert row.inputs == {"title": "Quarterly", "count": 42, "urgent": True,
                              "meta": {"owner": "ana", "tags": [1, 2]}}
        assert type(row.inputs["count"]) is int and row.inputs["urgent"] is True
        assert (row.trigger, row.process_name) == ("ui", "typed")
        assert b.get(started.headers["location"]).status_code == 200

        # Empty fields take their defaults (or null when not required).
        defaults = b.post("/ui/definitions/typed/1/start", {"input.title": "x", "input.count": "", "input.urgent": "",
                                                           "input.meta": "  "})
        assert defaults.status_code == 303, defaults.text
        with engine.connect() as conn:
            second = int(defaults.headers["location"].removeprefix("/ui/instances/"))
            assert conn.execute(select(I.c.inputs).where(I.c.id == second)).scalar_one() == {
                "title": "x", "count": 3, "urgent": False, "meta": None}

        instances = count(engine, I)
        for fields, names, kept in (
                ({"input.title": "x", "input.count": "4.5"}, ["'count'", "integer"], 'value="4.5"'),
                ({"input.title": "x", "input.count": "many"}, ["'count'", "integer"], 'value="many"'),
                ({"input.title": "x", "input.meta": "{not json"}, ["'meta'", "object"], "{not json"),
                ({"input.title": "x", "input.meta": "[1, 2]"}, ["'meta'", "object"], "[1, 2]"),
                ({"input.title": "x", "input.urgent": "maybe"}, ["'urgent'", "boolean"], None),
                ({"input.count": "1"}, ["missing input 'title'", "fill in"], 'value="1"'),
                ({"input.title": "   "}, ["missing input 'title'"], None)):
            refused = b.post("/ui/definitions/typed/1/start", fields)
            assert refused.status_code == 422, (fields, refused.text)
            message = text_of(refused)
            assert all(name in message for name in names), (names, message)
            assert 'id="start-error"' in refused.text
            if kept is not None:
                assert kept in refused.text, (kept, refused.text)  # what was typed is kept in the form
        assert count(engine, I) == instances
        assert b.post("/ui/definitions/nope/1/start", {}).status_code == 404
        assert b.post("/ui/definitions/typed/7/start", {"input.title": "x"}).status_code == 404
        assert count(engine, I) == instances


# -- 6. the runs page ----------------------------------------------------------------------------------------


def listed_ids(page: httpx.Response) -> list[int]:
    assert page.status_code == 200, page.text
    table = page.text.split('<table class="runs">', 1)[1]
    return [int(i) for i in re.findall(r'<td><a href="/ui/instances/(\d+)">', table)]


def status_counts(page: httpx.Response) -> dict[str, int]:
    counts = {s: int(n) for s, n in re.findall(
        r'<span class="badge status-(\w+)">\w+</span> <span class="count">(\d+)</span>', page.text)}
    counts["all"] = int(re.findall(r'all <span class="count">(\d+)</span>', page.text)[0])
    return counts


def next_link(page: httpx.Response) -> str | None:
    found = re.findall(r'<a href="([^"]+)" rel="next">Next page</a>', page.text)
    return html.unescape(found[0]) if found else None


@pytest.mark.slow
def test_runs_filters_counts_and_pages(api_server: ApiServer) -> None:
    engine = api_server.engine
    alpha = start(engine, simple("alpha"), {"topic": "zebra"}, count=3)
    beta = start(engine, simple("beta"), {"topic": "yak"}, count=55)
    with engine.begin() as conn:
        for iid, status in ((alpha[0], "completed"), (alpha[1], "failed"), (beta[0], "cancelled"),
                            (beta[1], "failed")):
            conn.execute(update(I).where(I.c.id == iid).values(status=status))
    everything = sorted(alpha + beta, reverse=True)
    today = datetime.now(UTC).date()
    with browser(api_server, "viewer") as b:
        first = b.get("/ui/runs")
        assert listed_ids(first) == everything[:50]
        assert status_counts(first) == {"all": 58, "running": 54, "completed": 1, "failed": 2, "cancelled": 1}
        assert 'aria-current="true">all' in first.text

        # Paging: the next page has the rest, nothing twice, newest first; the filters ride along.
        link = next_link(first)
        assert link is not None
        rest = b.get(link)
        assert listed_ids(rest) == everything[50:] and next_link(rest) is None
        assert "First page" in rest.text
        only_beta = b.get("/ui/runs", params={"process": "beta"})
        assert listed_ids(only_beta) == sorted(beta, reverse=True)[:50]
        link = next_link(only_beta)
        assert link is not None and parse_qs(urlsplit(link).query)["process"] == ["beta"]
        assert listed_ids(b.get(link)) == sorted(beta, reverse=True)[50:]
        for forged in ("garbage!", "aWQ6eA", "eDox", "%%%", "aWQ6LTE"):  # junk, "id:x", "x:1", "id:-1"
            refused = b.get("/ui/runs", params={"cursor": forged})
            assert refused.status_code == 422 and "not one this server made" in text_of(refused), forged

        by_status = b.get("/ui/runs", params={"status": "failed"})
        assert listed_ids(by_status) == sorted([alpha[1], beta[1]], reverse=True)
        assert status_counts(by_status)["all"] == 58  # the counts are of every status
        assert sorted(listed_ids(b.get("/ui/runs", params={"status": "running", "process": "alpha"}))) == [alpha[2]]
        by_process = b.get("/ui/runs", params={"process": "alpha"})
        assert listed_ids(by_process) == sorted(alpha, reverse=True)
        assert status_counts(by_process) == {"all": 3, "running": 1, "completed": 1, "failed": 1, "cancelled": 0}
        assert '<option value="alpha" selected>' in by_process.text
        assert listed_ids(b.get("/ui/runs", params={"process": "nope"})) == []

        assert listed_ids(b.get("/ui/runs", params={"q": "zebra"})) == sorted(alpha, reverse=True)
        assert listed_ids(b.get("/ui/runs", params={"q": " ZEBRA "})) == sorted(alpha, reverse=True)
        assert listed_ids(b.get("/ui/runs", params={"q": str(beta[7])})) == [beta[7]]
        assert listed_ids(b.get("/ui/runs", params={"q": "no such text"})) == []
        assert status_counts(b.get("/ui/runs", params={"q": "yak"}))["all"] == 55
        assert listed_ids(b.get("/ui/runs", params={"q": "%"})) == []  # a LIKE wildcard is only a character

        def window(**params: str) -> list[int]:
            return sorted(listed_ids(b.get("/ui/runs", params={"process": "alpha", **params})))

        assert window(since=str(today - timedelta(days=1))) == sorted(alpha)
        assert window(since=str(today - timedelta(days=1)), until=str(today + timedelta(days=1))) == sorted(alpha)
        assert window(since=str(today + timedelta(days=2))) == []
        assert window(until="2001-01-01") == []
        assert window(since="2001-01-01", until="2999-12-31") == sorted(alpha)
        assert status_counts(b.get("/ui/runs", params={"since": "2999-01-01"}))["all"] == 0
        for params, what in (({"since": "2024-13-45"}, "since must be a date"), ({"until": "yesterday"}, "until"),
                             ({"status": "lost"}, "status must be one of"), ({"q": "x" * 201}, "longer than 200")):
            refused = b.get("/ui/runs", params=params)
            assert refused.status_code == 422 and what in text_of(refused), (params, refused.text)


def test_runs_days_are_utc_days(api_server: ApiServer) -> None:
    engine = api_server.engine
    late, early, new = start(engine, simple("alpha"), count=3)
    with engine.begin() as conn:  # the last second of one day and the first of the next
        for iid, moment in ((late, datetime(2020, 3, 10, 23, 59, 59, tzinfo=UTC)),
                            (early, datetime(2020, 3, 11, tzinfo=UTC))):
            conn.execute(update(I).where(I.c.id == iid).values(created_at=moment, started_at=moment))
    today = datetime.now(UTC).date()
    with browser(api_server, "viewer") as b:
        def days(**params: str) -> list[int]:
            return sorted(listed_ids(b.get("/ui/runs", params=params)))

        assert days(until="2020-03-10") == [late]
        assert days(since="2020-03-11") == [early, new]
        assert days(since="2020-03-11", until="2020-03-11") == [early]
        assert days(since="2020-03-10", until="2020-03-10") == [late]
        assert days(since="2020-03-12", until="2020-03-09") == []
        page = b.get("/ui/runs")
        if datetime.now(UTC).date() == today:  # not across midnight
            assert days(since=str(today)) == [new] and days(since=str(today), until=str(today)) == [new]
            assert days(until=str(today - timedelta(days=1))) == [late, early]
            # The chart covers the last 30 days: today's one instance, not the two of 2020.
            chart = page.text.split("Instances started per day as a table", 1)[1].split("</table>", 1)[0]
            assert re.findall(r"<tr><td>([0-9-]+)</td><td class=\"num\">([^<]+)</td></tr>", chart) == [
                (str(today), "1")]


def test_runs_search_finds_non_ascii_text(api_server: ApiServer) -> None:
    engine = api_server.engine
    [zurich] = start(engine, simple("alpha"), {"topic": "Zürich"})
    [other] = start(engine, simple("alpha"), {"topic": "Bern"})
    with engine.begin() as conn:
        conn.execute(update(I).where(I.c.id == other).values(status="failed", error="Fehler in GENÈVE"))
    with browser(api_server, "viewer") as b:
        assert listed_ids(b.get("/ui/runs", params={"q": "bern"})) == [other]
        assert listed_ids(b.get("/ui/runs", params={"q": "fehler"})) == [other]
        broken = []
        for q, expected in (("Zürich", [zurich]), ("zürich", [zurich]), ("ü", [zurich]), ("genève", [other])):
            found = listed_ids(b.get("/ui/runs", params={"q": q}))
            if found != expected:
                broken.append((q, found, expected))
    none_broken(broken, "?q= finds non-ASCII text in inputs and errors, whatever its case, on both databases")


def test_out_of_range_ids_and_nul_characters_get_an_error_page(api_server: ApiServer) -> None:
    engine = api_server.engine
    deploy(api_server, simple("alpha"))
    iid = start_api(api_server, "alpha")
    huge = "99999999999999999999"  # past a BIGINT
    cursor = base64.urlsafe_b64encode(f"id:{huge}".encode()).decode().rstrip("=")
    with browser(api_server, "operator") as b:
        assert b.get(f"/ui/instances/{huge}").status_code == 404
        assert b.get(f"/ui/instances/{huge}/live").status_code == 404
        assert b.post(f"/ui/instances/{huge}/cancel").status_code == 404
        assert b.get("/ui/definitions/alpha/99999999999").status_code == 404
        instances, before = count(engine, I), snapshot(engine)
        checks: list[tuple[str, str, dict[str, str] | None, set[int]]] = [
            ("GET", "/ui/runs", {"cursor": cursor}, {422}),
            ("POST", f"/ui/approvals/{huge}/decision", {"decision": "approve"}, {404}),
            ("GET", "/ui/runs", {"process": "a\x00b"}, {200, 422}),
            ("GET", "/ui/runs", {"q": "a\x00b"}, {200, 422}),
            ("GET", "/ui/definitions/a%00b", None, {404}),
            ("GET", "/ui/definitions/a%00b/1", None, {404}),
            ("POST", f"/ui/instances/{iid}/steps/a%00b/retry", {}, {404}),
            ("POST", f"/ui/instances/{iid}/steps/a%00b/cancel", {}, {404}),
            ("POST", "/ui/definitions/a%00b/1/start", {}, {404}),
            ("POST", "/ui/definitions/alpha/1/start", {"input.topic": "a\x00b"}, {422}),
        ]
        broken = []
        for method, path, fields, expected in checks:
            fresh = {"Connection": "close"}  # after a 500 the server drops the connection: one per request
            got = (b.get(path, params=fields, headers=fresh) if method == "GET"
                   else b.post(path, fields, headers=fresh))
            if got.status_code not in expected:
                broken.append(f"{method} {path} {fields}: {got.status_code}, not {sorted(expected)}")
        assert snapshot(engine)[2:] == before[2:]  # no approval touched
        if count(engine, I) != instances:
            broken.append("an instance was started with a NUL in its input")
    none_broken(broken, "ids past a BIGINT and NUL characters get an error page, never a 500")


# -- 7. reports ----------------------------------------------------------------------------------------------


def report_rows(page: httpx.Response) -> list[list[str]]:
    assert page.status_code == 200, page.text
    body = page.text.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


@pytest.mark.slow
def test_reports_tables_and_csv(api_server: ApiServer) -> None:
    engine = api_server.engine
    ids = start(engine, simple("gamma"), {"topic": "=cmd"}, count=4)
    with engine.connect() as conn:
        columns = run_report(conn, "v_instance_summary").columns
    with browser(api_server, "viewer") as b:
        listing = b.get("/ui/reports")
        assert listing.status_code == 200
        for view in view_names():
            assert f'href="/ui/reports/{view}"' in listing.text and f'href="/ui/reports/{view}.csv"' in listing.text
            assert b.get(f"/ui/reports/{view}").status_code == 200, view  # every view renders on this database

        first = columns.index("instance_id")
        descending = report_rows(b.get("/ui/reports/v_instance_summary", params={"sort": "instance_id",
                                                                                 "dir": "desc"}))
        assert [int(r[first]) for r in descending] == sorted(ids, reverse=True)
        ascending = report_rows(b.get("/ui/reports/v_instance_summary", params={"sort": "instance_id"}))
        assert [int(r[first]) for r in ascending] == sorted(ids)
        page = b.get("/ui/reports/v_instance_summary", params={"sort": "instance_id", "dir": "desc"})
        assert 'aria-sort="descending"' in page.text
        assert 'href="/ui/reports/v_instance_summary.csv?sort=instance_id&amp;dir=desc"' in page.text
        for params, what in (({"sort": "nope"}, "nope"), ({"sort": "instance_id;drop table x"}, ""),
                             ({"dir": "sideways"}, "dir must be asc or desc")):
            refused = b.get("/ui/reports/v_instance_summary", params=params)
            assert refused.status_code == 422 and what in text_of(refused), (params, refused.text)
        assert b.get("/ui/reports/v_instance_summary.csv", params={"sort": "nope"}).status_code == 422

        download = b.get("/ui/reports/v_instance_summary.csv")
        assert download.status_code == 200
        assert download.headers["content-type"].startswith("text/csv")
        assert 'filename="v_instance_summary.csv"' in download.headers["content-disposition"]
        rows = list(csv.reader(io.StringIO(download.text)))
        assert rows[0] == columns
        assert sorted(int(r[first]) for r in rows[1:]) == sorted(ids) and len(rows) == 1 + len(ids)
        assert all(r[columns.index("process")] == "gamma" and r[columns.index("status")] == "running"
                   for r in rows[1:])
        by_desc = list(csv.reader(io.StringIO(b.get("/ui/reports/v_instance_summary.csv",
                                                    params={"sort": "instance_id", "dir": "desc"}).text)))
        assert [int(r[first]) for r in by_desc[1:]] == sorted(ids, reverse=True)

        for missing in ("/ui/reports/v_nope", "/ui/reports/v_nope.csv", "/ui/reports/process_instances",
                        "/ui/reports/api_tokens.csv"):
            gone = b.get(missing)
            assert gone.status_code == 404, (missing, gone.text)
            assert "no view" in text_of(gone)  # a table is not a report: refused, whatever its name


# -- 8. the API with a session cookie ------------------------------------------------------------------------


def test_a_session_cookie_reads_the_api_and_never_changes_it(api_server: ApiServer) -> None:
    engine = api_server.engine
    deploy(api_server, simple("delta"))
    iid = start_api(api_server, "delta", {"topic": "t"})
    with browser(api_server, "operator") as b:
        session = {"flowdb_session": b.http.cookies["flowdb_session"]}
        with httpx.Client(base_url=api_server.url, cookies=session, timeout=30) as api:
            listed = api.get("/v1/instances")
            assert listed.status_code == 200 and [i["id"] for i in listed.json()["items"]] == [iid]
            assert api.get(f"/v1/instances/{iid}").json()["status"] == "running"
            before = snapshot(engine)
            for path, body in ((f"/v1/instances/{iid}/cancel", None), (f"/v1/instances/{iid}/steps/only/cancel", None),
                               ("/v1/processes/delta/instances", {"inputs": {}})):
                refused = api.post(path, json=body, headers={"Origin": api_server.url})
                assert refused.status_code == 401, (path, refused.text)
                refused = api.post(path, data={"csrf": b.csrf})  # a CSRF token does not make a cookie a token
                assert refused.status_code == 401, (path, refused.text)
            assert snapshot(engine) == before and status_of(engine, iid) == "running"
            assert b.post("/ui/logout").status_code == 303
            assert api.get("/v1/instances").status_code == 401  # its session is gone
        with httpx.Client(base_url=api_server.url, cookies={"flowdb_session": "made-up"}) as api:
            assert api.get("/v1/instances").status_code == 401
    with browser(api_server, "viewer") as viewer, \
            httpx.Client(base_url=api_server.url, cookies=viewer.http.cookies, timeout=30) as api:
        assert api.get("/v1/instances").status_code == 200
        assert api.get("/v1/approvals").status_code == 403  # the session acts with its token's role


@pytest.mark.slow
@pytest.mark.parametrize("credential", ["session", "bearer"])
def test_an_open_event_stream_ends_when_its_token_is_revoked(api_server: ApiServer, credential: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream checks now and then that its token (or the UI session standing for it) still holds: a revoked
    token stops receiving (the diagram's page would otherwise go on showing a run to someone shut out)."""
    monkeypatch.setattr(events_route, "RECHECK_SECONDS", 0.3)  # the server runs in this process (api_for)
    token_id, token = create_token(api_server.engine, "auditor@x.com", "viewer")
    deploy(api_server, REVIEWED)
    with browser(api_server) as b:
        headers: dict[str, str] = {}
        if credential == "session":
            assert b.sign_in(token).status_code == 303
        else:
            headers = {"Authorization": f"Bearer {token}"}
        with b.http.stream("GET", "/v1/events/stream", headers=headers, timeout=30) as stream:
            assert stream.status_code == 200
            revoke_token(api_server.engine, token_id)
            started = time.monotonic()
            time.sleep(1.0)  # two checks' time: the stream has ended (or ends before it reads what follows)
            with admin(api_server) as http:  # events keep coming: none of them may reach the revoked reader
                http.post("/v1/processes/reviewed-report/instances", json={})
            received = "".join(stream.iter_text())  # returns once the server ends the stream
        assert time.monotonic() - started < 15
        assert "instance.started" not in received
