"""Starts with an Idempotency-Key: identical concurrent starts all get the one instance (one 201, the
rest 200) on both databases; other inputs, another process or another asked version under the key get
409 idempotency-conflict; a key whose instance cannot be seen yet gets 409 idempotency-in-progress."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from flowdb.db.instances import StartRequest, deploy, find_definition, start_instances
from flowdb.db.tables import events, process_instances
from flowdb.definitions import parse_definition
from flowdb.errors import IdempotencyConflict, IdempotencyInProgress
from flowdb_api.problems import from_flowdb_error

from apiserver import ApiServer
from conftest import Database

ORDER = """\
process:
  name: order
  inputs: {item: {type: string}, count: {type: integer, default: 1}}
  steps:
    - {id: pack, type: agent_task, agent: noop, message: "pack {{inputs.item}}"}
    - {id: ship, type: agent_task, agent: noop, message: "ship", depends_on: [pack]}
"""
BURST = 50
PROBLEMS = "https://flowdb.dev/problems/"


def _instances_with_key(engine: Any, key: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(process_instances.c.id, process_instances.c.inputs)
                                 .where(process_instances.c.idempotency_key == key)))


@pytest.mark.slow
def test_identical_concurrent_starts_all_get_the_one_instance(api_server: ApiServer) -> None:
    headers = api_server.auth("admin")
    deployed = httpx.post(f"{api_server.url}/v1/definitions", content=ORDER,
                          headers={**headers, "content-type": "application/yaml"}, timeout=30)
    assert deployed.status_code == 201, deployed.text
    url = f"{api_server.url}/v1/processes/order/instances"
    keyed = {**headers, "Idempotency-Key": "burst-1"}
    gate = threading.Barrier(BURST)

    def one_start(_: int) -> httpx.Response:
        with httpx.Client(timeout=60) as http:
            gate.wait(30)  # every client connected and ready: the requests leave together
            return http.post(url, json={"inputs": {"item": "book"}}, headers=keyed)

    with ThreadPoolExecutor(BURST) as pool:
        responses = list(pool.map(one_start, range(BURST)))

    assert Counter(r.status_code for r in responses) == {201: 1, 200: BURST - 1}, \
        [r.text for r in responses if r.status_code not in (200, 201)][:3]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    [iid] = ids
    assert [(row.id, row.inputs) for row in _instances_with_key(api_server.engine, "burst-1")] == [
        (iid, {"item": "book", "count": 1})]
    with api_server.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(process_instances)).scalar_one() == 1
        started = conn.execute(select(func.count()).where(events.c.type == "instance.started")).scalar_one()
    assert started == 1

    other = httpx.post(url, json={"inputs": {"item": "pen"}}, headers=keyed, timeout=30)
    assert other.status_code == 409
    assert other.json()["type"] == PROBLEMS + "idempotency-conflict"
    assert other.json()["detail"] == (f"idempotency key 'burst-1' already started instance {iid} of order with "
                                      "other inputs; use a new key to start another instance")
    assert "retry-after" not in other.headers
    same = httpx.post(url, json={"inputs": {"item": "book", "count": 1}}, headers=keyed, timeout=30)
    assert (same.status_code, same.json()["id"]) == (200, iid)  # the default filled in: the same inputs

    # A second version: asking for it by number under the key is another request; not naming one is a replay.
    changed = ORDER.replace('"ship"', '"ship it"')
    assert httpx.post(f"{api_server.url}/v1/definitions", content=changed,
                      headers={**headers, "content-type": "application/yaml"}, timeout=30).status_code == 201
    replay = httpx.post(url, json={"inputs": {"item": "book"}}, headers=keyed, timeout=30)
    assert (replay.status_code, replay.json()["id"], replay.json()["version"]) == (200, iid, 1)
    pinned = httpx.post(url, json={"inputs": {"item": "book"}, "version": 2}, headers=keyed, timeout=30)
    assert pinned.status_code == 409 and pinned.json()["type"] == PROBLEMS + "idempotency-conflict"
    assert pinned.json()["detail"] == (f"idempotency key 'burst-1' already started instance {iid} of order "
                                       "version 1, not version 2; use a new key to start another instance")
    assert len(_instances_with_key(api_server.engine, "burst-1")) == 1


def test_a_key_taken_by_a_start_not_yet_visible_is_in_progress_not_a_conflict(db: Database) -> None:
    if db.kind == "sqlite":
        pytest.skip("SQLite serializes writers: a writer always sees the keys committed before it")
    definition = parse_definition(ORDER, "order.yaml")
    with db.engine.begin() as conn:
        deploy(conn, definition)
        definition_id, version = find_definition(conn, "order")
    request = StartRequest({"item": "book"}, "late-1")
    # A REPEATABLE READ transaction keeps the snapshot it took before the other start committed: the
    # key's row stays invisible to it however often it looks, while the unique index refuses a second one.
    with db.engine.connect() as late:
        late.execution_options(isolation_level="REPEATABLE READ")
        with late.begin():
            late.execute(text("SELECT 1"))  # the snapshot
            with db.engine.begin() as conn:
                [(iid, created)] = start_instances(conn, definition_id, version, definition, [request])
            assert created
            with pytest.raises(IdempotencyInProgress) as caught:
                start_instances(late, definition_id, version, definition, [request])
            assert str(caught.value) == ("idempotency key 'late-1' is being used by a start that has not committed "
                                         "yet; retry in a moment to get its instance")
    with db.engine.begin() as conn:  # once visible: the instance, or a conflict for other inputs
        assert start_instances(conn, definition_id, version, definition, [request]) == [(iid, False)]
        with pytest.raises(IdempotencyConflict):
            start_instances(conn, definition_id, version, definition, [StartRequest({"item": "pen"}, "late-1")])
    assert len(_instances_with_key(db.engine, "late-1")) == 1

    response = from_flowdb_error(caught.value)
    assert (response.status_code, response.headers["retry-after"]) == (409, "1")
    assert response.body.startswith(b'{"type":"' + PROBLEMS.encode() + b'idempotency-in-progress"')
