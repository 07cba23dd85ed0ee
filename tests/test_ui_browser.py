"""The web UI in a real browser: Playwright driving Debian's chromium against `flowdb serve` and a
`flowdb worker`, as a person uses it.

Screenshots go to test-artifacts/ui/ (FLOWDB_TEST_ARTIFACTS overrides the folder); CI keeps them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from flowdb.db.tables import process_instances
from flowdb.tokens import create_token

from apiserver import serve_process
from conftest import IN_CI, Database, flowdb_cli
from processes import Fleet, wait_until

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
EXAMPLE = HERE.parent / "examples" / "reviewed-report.yaml"
AGENTS = HERE / "agents_ui.yaml"
ARTIFACTS = Path(os.environ.get("FLOWDB_TEST_ARTIFACTS", HERE.parent / "test-artifacts")) / "ui"
MANAGER = "manager@company.com"  # the approver reviewed-report names
WAIT_MS = 30_000

# Records every status a diagram node shows, in order, so a test can tell what it went through.
WATCH_NODES = """() => {
  window.__seen = {};
  const note = (node) => {
    const step = node.dataset.step, status = node.dataset.status;
    const seen = (window.__seen[step] = window.__seen[step] || []);
    if (seen[seen.length - 1] !== status) seen.push(status);
  };
  document.querySelectorAll('#diagram g.node').forEach(note);
  new MutationObserver((changes) => changes.forEach((c) => {
    const node = c.target.closest && c.target.closest('g.node');
    if (node) note(node);
    c.addedNodes.forEach((n) => n.querySelectorAll && n.querySelectorAll('g.node').forEach(note));
  })).observe(document.getElementById('diagram'), {subtree: true, childList: true, attributes: true,
                                                    attributeFilter: ['data-status']});
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium")
    if chromium is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


def sign_in(browser: Any, url: str, token: str) -> Any:
    """A new browser context (its own cookies) signed in with `token`; returns its page on /ui/runs."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{url}/ui/runs")
    assert "/ui/login" in page.url  # no session yet: the sign-in page, which comes back here
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/runs")
    return page


def shot(page: Any, name: str, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


def node_status(page: Any, step: str) -> str:
    return str(page.get_attribute(f'#diagram g.node[data-step="{step}"]', "data-status"))


def test_start_watch_approve_and_finish(browser: Any, db: Database, tmp_path: Path) -> None:
    env = db.cli_env()
    deployed = flowdb_cli("deploy", str(EXAMPLE), "--agents", str(AGENTS), env=env)
    assert deployed.returncode == 0, deployed.stderr
    _, operator_token = create_token(db.engine, "ops@company.com", "operator")
    _, manager_token = create_token(db.engine, MANAGER, "approver")
    worker_env = {**env, "FLOWDB_UI_AGENT_SLEEP": "1.5"}
    fleet = Fleet(worker_env, tmp_path, agents=AGENTS)
    with serve_process(env, tmp_path / "serve.log") as served:
        try:
            operator = sign_in(browser, served.url, operator_token)
            # Start it from the definition's page (reviewed-report declares no inputs: the form is one button).
            operator.goto(f"{served.url}/ui/definitions/reviewed-report/1")
            operator.click("form.start button[type=submit]")
            operator.wait_for_url("**/ui/instances/*")
            instance_id = int(operator.url.rsplit("/", 1)[1])
            operator.wait_for_selector("#diagram[data-live=open]", timeout=WAIT_MS)
            operator.evaluate(WATCH_NODES)
            operator.evaluate("window.__sameDocument = true")  # gone if the page ever reloads
            assert node_status(operator, "publish") == "pending"
            assert node_status(operator, "draft") in ("pending", "ready")

            fleet.start(1)  # the worker starts after the page is open: every change arrives live
            operator.wait_for_selector('#diagram g.node[data-step="draft"][data-status="running"]', timeout=WAIT_MS)
            operator.wait_for_selector('#diagram g.node[data-step="review"][data-status="waiting"]', timeout=WAIT_MS)
            assert node_status(operator, "draft") == "completed"
            # The steps table follows the diagram (the page swaps its live parts in after each change).
            operator.wait_for_selector('#live-details tr[data-step="review"][data-status="waiting"]', timeout=WAIT_MS)
            shot(operator, f"instance-waiting-{db.kind}")

            # The approver decides from the inbox, where the draft under review shows as text.
            manager = sign_in(browser, served.url, manager_token)
            manager.goto(f"{served.url}/ui/approvals")
            card = manager.locator("article.approval").first
            assert "Output of draft" in card.inner_text()
            assert "<script>window.__xss = 1</script>" in card.locator("pre.json").first.inner_text()
            assert "0 of 1" in card.inner_text() and "manager@company.com" not in card.locator("h2").inner_text()
            shot(manager, f"approvals-{db.kind}")
            card.locator("textarea").fill("Looks good <b>ship it</b>")
            card.locator("button[value=approve]").click()
            manager.wait_for_url("**/ui/approvals?done=approved")
            assert manager.evaluate("window.__xss") is None

            # Back on the operator's page, never reloaded: publish runs and the instance completes.
            operator.wait_for_selector('#diagram g.node[data-step="publish"][data-status="completed"]',
                                       timeout=WAIT_MS)
            operator.wait_for_selector('#instance-status[data-status="completed"]', timeout=WAIT_MS)
            operator.wait_for_selector('#live-details tr[data-step="publish"][data-status="completed"]',
                                       timeout=WAIT_MS)
            assert operator.get_by_role("button", name="Cancel instance").count() == 0  # it finished
            assert operator.evaluate("window.__sameDocument") is True
            seen = operator.evaluate("window.__seen")
            assert seen["draft"][-2:] == ["running", "completed"] and seen["draft"][0] in ("pending", "ready")
            assert seen["publish"][0] == "pending" and seen["publish"][-1] == "completed"
            assert "waiting" in seen["review"] and seen["review"][-1] == "completed"

            # The agent's markup is text on the instance page too, and ran nowhere.
            operator.locator("tr.detail summary", has_text="Input, output and error of draft").click()
            shown = operator.locator("tr.detail details[open] pre.json").nth(1).inner_text()
            assert "<script>window.__xss = 1</script>" in shown
            assert operator.evaluate("window.__xss") is None
            assert "approval.decided" in operator.locator("ol.timeline").inner_text()
            shot(operator, f"instance-{db.kind}")
            operator.evaluate("window.scrollTo(0, 0)")
            shot(operator, f"instance-top-{db.kind}", full_page=False)  # what docs/ui-instance.png shows
            with db.engine.connect() as conn:
                status = conn.execute(select(process_instances.c.status)
                                      .where(process_instances.c.id == instance_id)).scalar_one()
            assert status == "completed"
        finally:
            fleet.terminate()


def test_a_viewer_sees_no_buttons_and_posts_are_refused(browser: Any, db: Database, tmp_path: Path) -> None:
    env = db.cli_env()
    assert flowdb_cli("deploy", str(EXAMPLE), "--agents", str(AGENTS), env=env).returncode == 0
    started = flowdb_cli("start", "reviewed-report", env=env)
    assert started.returncode == 0, started.stderr
    with db.engine.connect() as conn:
        instance_id = conn.execute(select(process_instances.c.id)).scalar_one()
    _, viewer_token = create_token(db.engine, "auditor@company.com", "viewer")
    _, operator_token = create_token(db.engine, "ops@company.com", "operator")
    with serve_process(env, tmp_path / "serve.log") as served:
        viewer = sign_in(browser, served.url, viewer_token)
        for path in (f"/ui/instances/{instance_id}", "/ui/definitions/reviewed-report/1", "/ui/runs"):
            viewer.goto(served.url + path)
            # No form that changes anything (the runs page's filter form is a GET); only Sign out posts.
            assert viewer.locator("main form[method=post]").count() == 0, path
            for action in ("Cancel instance", "Cancel step", "Retry", "Start", "Approve"):
                assert viewer.get_by_role("button", name=action).count() == 0, (path, action)
        assert viewer.locator("header nav a", has_text="Approvals").count() == 0
        # A viewer that posts anyway (with its own valid CSRF token) is refused, and nothing changes.
        viewer.goto(f"{served.url}/ui/instances/{instance_id}")
        csrf = viewer.get_attribute("header form.who input[name=csrf]", "value")
        refused = viewer.request.post(f"{served.url}/ui/instances/{instance_id}/cancel", form={"csrf": csrf},
                                      max_redirects=0)
        assert refused.status == 403 and "needs the operator role" in refused.text()

        # An operator's post without the CSRF token is refused too; with it, it is done.
        operator = sign_in(browser, served.url, operator_token)
        bare = operator.request.post(f"{served.url}/ui/instances/{instance_id}/cancel", form={"reason": "x"},
                                     max_redirects=0)
        assert bare.status == 403 and "CSRF" in bare.text()
        with db.engine.connect() as conn:
            assert conn.execute(select(process_instances.c.status)).scalar_one() == "running"
        operator.goto(f"{served.url}/ui/instances/{instance_id}")
        operator.click("text=Cancel instance")
        operator.wait_for_url(f"**/ui/instances/{instance_id}?done=cancelled")
        wait_until(lambda: operator.get_attribute("#instance-status", "data-status") == "cancelled", 10,
                   "the page to show the cancelled instance")


def test_every_page_passes_axe(browser: Any, db: Database, tmp_path: Path) -> None:
    """No serious or critical accessibility violation on any page (axe-core)."""
    from axe_playwright_python.sync_playwright import Axe

    env = db.cli_env()
    assert flowdb_cli("deploy", str(EXAMPLE), "--agents", str(AGENTS), env=env).returncode == 0
    assert flowdb_cli("start", "reviewed-report", env=env).returncode == 0
    _, token = create_token(db.engine, MANAGER, "operator")
    axe = Axe()
    fleet = Fleet({**env, "FLOWDB_UI_AGENT_SLEEP": "0"}, tmp_path, agents=AGENTS)
    with serve_process(env, tmp_path / "serve.log") as served:
        try:
            fleet.start(1)
            page = sign_in(browser, served.url, token)
            wait_until(lambda: page.request.get(f"{served.url}/v1/approvals").json()["items"] != [], 60,
                       "the approval to be requested")
            pages = ["/ui/runs", "/ui/instances/1", "/ui/approvals", "/ui/definitions",
                     "/ui/definitions/reviewed-report/1", "/ui/reports", "/ui/reports/v_instance_summary"]
            problems: dict[str, list[str]] = {}
            for path in pages:
                page.goto(served.url + path)
                if path.startswith("/ui/instances") or path.startswith("/ui/definitions/"):
                    page.wait_for_selector("#diagram[data-ready=true]", timeout=WAIT_MS)
                found = axe.run(page).response["violations"]
                bad = [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
                       for v in found if v["impact"] in ("serious", "critical")]
                if bad:
                    problems[path] = bad
                shot(page, "page" + path.replace("/", "-"))
            login = browser.new_context().new_page()
            login.goto(f"{served.url}/ui/login")
            found = axe.run(login).response["violations"]
            bad = [v["id"] for v in found if v["impact"] in ("serious", "critical")]
            if bad:
                problems["/ui/login"] = bad
            assert problems == {}
        finally:
            fleet.terminate()
