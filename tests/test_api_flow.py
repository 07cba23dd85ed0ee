"""The reviewed-report flow driven over HTTP only, with one real `flowdb worker` process, on both databases,
polling and with Redis: deploy, start, watch the live event stream, approve from the approver's inbox,
and check that the stream delivered exactly the instance's events, in order, as the events route lists them."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowdb_api.routes import events as events_route

from apiserver import api_for
from conftest import EXAMPLES, Database
from processes import FLOWDB, wait_until

MANAGER = "manager@company.com"
REVIEWED = (EXAMPLES / "reviewed-report.yaml").read_text()
STEPS = ["draft", "review", "publish"]  # the order in which the steps first appear in the events (a chain)
# What must be in the stream, in this order (others, such as step.ready and step.waiting, come in between).
MILESTONES = [("step.started", "draft"), ("step.completed", "draft"), ("approval.requested", "review"),
              ("approval.notified", "review"), ("approval.decided", "review"), ("step.completed", "review"),
              ("step.completed", "publish"), ("instance.completed", None)]
TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def quick_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep-alive comments every 0.5 s: a reader asked to stop notices it within that.
    monkeypatch.setattr(events_route, "PING_SECONDS", 0.5)


class Stream:
    """GET /v1/events/stream with httpx.Client.stream in a thread; each SSE message lands in a queue."""

    def __init__(self, url: str, headers: dict[str, str], params: dict[str, Any]) -> None:
        self.url, self.headers, self.params = url, headers, params
        self.messages: queue.Queue[dict[str, str]] = queue.Queue()
        self.opened = threading.Event()
        self.stop = threading.Event()
        self.status: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sse-reader", daemon=True)

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(15.0)) as client, \
                    client.stream("GET", self.url, headers=self.headers, params=self.params) as response:
                self.status = response.status_code
                self.opened.set()
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith(":"):  # a ping
                        continue
                    if line == "":
                        if fields:
                            self.messages.put(fields)
                        fields = {}
                        continue
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
        except BaseException as exc:  # reported to the test by next()
            self.error = exc
        finally:
            self.opened.set()

    def next(self, timeout: float) -> dict[str, str]:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event on the stream within {timeout:g} s (reader error: {self.error!r})"
                                 ) from None


@contextmanager
def event_stream(url: str, headers: dict[str, str], **params: Any) -> Iterator[Stream]:
    stream = Stream(url, headers, params)
    stream.thread.start()
    try:
        assert stream.opened.wait(15), "the event stream did not answer"
        assert stream.status == 200, (stream.status, stream.error)
        yield stream
    finally:
        stream.stop.set()
        stream.thread.join(10)
        assert not stream.thread.is_alive(), "the stream reader did not stop"


@contextmanager
def worker_process(env: dict[str, str], folder: Path) -> Iterator[subprocess.Popen[bytes]]:
    """One real `flowdb worker`; its output goes to a file (never a pipe that can fill up)."""
    log = folder / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([FLOWDB, "worker", "--agents", str(EXAMPLES / "agents.yaml")], env=env, cwd=folder,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("wakeups", ["polling", "redis"])
def test_reviewed_report_over_http(db: Database, wakeups: str, request: pytest.FixtureRequest,
                                   tmp_path: Path) -> None:
    overrides: dict[str, Any] = {}
    env = {**db.cli_env(), "FLOWDB_POLL_SECONDS": "0.05"}
    if wakeups == "redis":
        redis_url: str = request.getfixturevalue("redis_url")
        # Streams re-read the table only every 10 minutes on their own: events arrive in time only if the
        # worker's and the API's messages on flowdb:events wake them.
        overrides = {"redis_url": redis_url, "api_stream_poll_seconds": 600.0}
        env["FLOWDB_REDIS_URL"] = redis_url
    else:
        overrides = {"api_stream_poll_seconds": 0.1}
    with api_for(db, **overrides) as api:
        admin_auth = {"Authorization": f"Bearer {api.token('admin')}"}
        manager_auth = {"Authorization": f"Bearer {api.token('approver', MANAGER)}"}
        with httpx.Client(base_url=api.url, headers=admin_auth, timeout=30) as admin, \
                httpx.Client(base_url=api.url, headers=manager_auth, timeout=30) as manager:
            deployed = admin.post("/v1/definitions", content=REVIEWED, headers={"content-type": "application/yaml"})
            assert deployed.status_code == 201, deployed.text
            started = admin.post("/v1/processes/reviewed-report/instances", json={},
                                 headers={"Idempotency-Key": f"flow-{wakeups}"})
            assert started.status_code == 201, started.text
            instance_id = started.json()["id"]

            with event_stream(f"{api.url}/v1/events/stream", admin_auth, instance=instance_id, after=0) as stream, \
                    worker_process(env, tmp_path) as worker:
                received: list[dict[str, str]] = []

                def take_until(kind: str) -> None:
                    deadline = time.monotonic() + TIMEOUT
                    while not received or received[-1]["event"] != kind:
                        assert worker.poll() is None, (worker.returncode, (tmp_path / "worker.log").read_text())
                        received.append(stream.next(max(deadline - time.monotonic(), 0.01)))

                def inbox() -> list[dict[str, Any]]:
                    answer = manager.get("/v1/approvals")
                    assert answer.status_code == 200, answer.text
                    return [a for a in answer.json()["items"] if a["notified_at"] is not None]

                [approval] = wait_until(inbox, TIMEOUT, "the approval in the manager's inbox")
                assert (approval["instance_id"], approval["step_id"], approval["status"]) == (
                    instance_id, "review", "pending")
                # Live: the stream has delivered the request and its notice before anyone decided.
                take_until("approval.notified")
                draft = {s["step_id"]: s for s in admin.get(f"/v1/instances/{instance_id}").json()["steps"]}["draft"]
                assert approval["artifacts"] == [draft["output"]["output_path"]]

                decided = manager.post(f"/v1/approvals/{approval['id']}/decision", json={"decision": "approve"})
                assert decided.status_code == 200, decided.text
                assert decided.json()["decided"] is True and decided.json()["approval"]["decided_by"] == MANAGER

                def finished() -> dict[str, Any] | None:
                    shown = admin.get(f"/v1/instances/{instance_id}").json()
                    return shown if shown["status"] != "running" else None

                final = wait_until(finished, TIMEOUT, "the instance to finish")
                take_until("instance.completed")
                assert worker.poll() is None, "the worker exited during the flow"
                worker.terminate()
                assert worker.wait(15) == 0, (tmp_path / "worker.log").read_text()

            listed: list[dict[str, Any]] = []
            page: dict[str, Any] = {"next_cursor": None}
            while True:
                params = {"cursor": page["next_cursor"]} if page["next_cursor"] else {}
                answer = admin.get(f"/v1/instances/{instance_id}/events", params=params)
                assert answer.status_code == 200, answer.text
                page = answer.json()
                listed += page["items"]
                if not page["next_cursor"]:
                    break

    assert final["status"] == "completed", final
    steps = {s["step_id"]: s for s in final["steps"]}
    assert steps["publish"]["status"] == "completed"
    assert steps["review"]["status"] == "completed" and steps["review"]["output"]["decision"] == "approved"

    events = [json.loads(message["data"]) for message in received]
    for message, event in zip(received, events, strict=True):
        assert (message["id"], message["event"]) == (str(event["id"]), event["type"])
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)), f"ids not strictly increasing: {ids}"
    assert {e["instance_id"] for e in events} == {instance_id}
    # The stream and the events route: the same events (ids, types, payloads, times), in the same order.
    assert events == listed

    first_seen = list(dict.fromkeys(e["step_instance_id"] for e in events if e["step_instance_id"] is not None))
    assert len(first_seen) == len(STEPS), first_seen
    step_of = dict(zip(first_seen, STEPS, strict=True))
    approval_events = [e for e in events if e["type"].startswith("approval.")]
    assert {step_of[e["step_instance_id"]] for e in approval_events} == {"review"}
    assert {e["payload"]["approval_id"] for e in approval_events} == {approval["id"]}
    remaining = iter((e["type"], step_of.get(e["step_instance_id"])) for e in events)
    missing = [milestone for milestone in MILESTONES if milestone not in remaining]  # in order: a subsequence
    assert not missing, (missing, [(e["id"], e["type"], step_of.get(e["step_instance_id"])) for e in events])
