"""The HTTP API says what it will not take, in the HTTP caller's words, and agrees with the command line
(issue 21, sixth point), on both databases: unknown body fields are refused by name and write nothing;
an error that tells what to do says it for the front end that was used; decisions take the same words on
both; a number input keeps its JSON type whichever way it came."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from flowdb.db.tables import approvals, events, process_instances, step_instances

from apiserver import ApiServer, assert_problem, client
from conftest import EXAMPLES, Database, flowdb_cli
from helpers import approval_rows, drive, work

MANAGER = "manager@company.com"  # reviewed-report's approver
REVIEWED = (EXAMPLES / "reviewed-report.yaml").read_text()
PRICED = """
process:
  name: priced
  inputs:
    amount: {type: number}
    rate: {type: number}
  steps:
    - {id: quote, type: agent_task, agent: echo, message: "{{inputs.amount}} at {{inputs.rate}}"}
"""


def _counts(engine: Any) -> tuple[int, ...]:
    with engine.connect() as conn:
        return tuple(int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                     for t in (process_instances, step_instances, events, approvals))


def assert_raw_numbers(text: str) -> None:
    """The body's JSON text holds amount 500 (not 500.0) and rate 0.5, in whichever key order."""
    inputs = re.search(r'"inputs":(\{[^{}]*\})', text.replace(" ", ""))
    assert inputs is not None, text
    assert re.fullmatch(r'\{("amount":500,"rate":0\.5|"rate":0\.5,"amount":500)\}', inputs.group(1)), inputs.group(1)


def _deploy(http: httpx.Client, text: str = REVIEWED) -> None:
    deployed = http.post("/v1/definitions", content=text, headers={"content-type": "application/yaml"})
    assert deployed.status_code in (200, 201), deployed.text


def _until_every_approval_waits(server: ApiServer) -> None:
    def parked() -> bool:
        rows = approval_rows(server.engine)
        return bool(rows) and all(r.notified_at is not None for r in rows)

    drive(server.engine, parked, EXAMPLES / "agents.yaml")


@pytest.mark.slow
def test_unknown_body_fields_are_named_and_nothing_is_written(api_server: ApiServer) -> None:
    with client(api_server) as http:
        _deploy(http)
        before = _counts(api_server.engine)
        url = "/v1/processes/reviewed-report/instances"
        typo = assert_problem(http.post(url, json={"inpts": {}}), 422)
        assert typo["type"].endswith("/invalid-body")
        assert typo["detail"] == ("unknown body field(s) 'inpts' (did you mean 'inputs'?); "
                                  "the body takes inputs, version")
        assert typo["errors"] == [{"location": "inpts", "message": "unknown field (did you mean 'inputs'?)"}]
        several = assert_problem(http.post(url, json={"inputs": {}, "verison": 2, "priority": 1}), 422)
        assert "'verison' (did you mean 'version'?), 'priority'" in several["detail"]
        # Unknown fields come first, then whatever else does not fit.
        mixed = assert_problem(http.post(url, json={"inputs": [], "extra": 1}), 422)
        assert [e["location"] for e in mixed["errors"]] == ["extra", "inputs"]
        assert_problem(http.post(url, json=[{"inputs": {}}]), 422, "the body must be a JSON object, not an array")
        assert_problem(http.post(url, content=b'{"inputs": {"x": NaN}}', headers={"content-type": "application/json"}),
                       400, "NaN is not a JSON value")
        assert _counts(api_server.engine) == before  # nothing started

        iid = http.post(url, json={}).json()["id"]
        for path in (f"/v1/instances/{iid}/cancel", f"/v1/instances/{iid}/steps/draft/cancel",
                     f"/v1/instances/{iid}/steps/draft/retry"):
            refused = assert_problem(http.post(path, json={"reason": "duplicate"}), 422, "takes no body fields")
            assert "unknown field(s) 'reason'" in refused["detail"] and refused["errors"][0]["location"] == "reason"
            assert_problem(http.post(path, content=b"please", headers={"content-type": "text/plain"}), 422,
                           "takes no body; send none (or {})")
        assert_problem(http.post(f"/v1/instances/{iid}/cancel", json=["x"]), 422, "not an array")
        assert http.get(f"/v1/instances/{iid}").json()["status"] == "running"  # none of them did anything
        assert http.post(f"/v1/instances/{iid}/cancel", json={}).status_code == 200  # an empty object is no field

        other = http.post(url, json={}).json()["id"]
    _until_every_approval_waits(api_server)
    [approval] = [a for a in approval_rows(api_server.engine) if a.instance_id == other]
    before = _counts(api_server.engine)
    with client(api_server, "approver", MANAGER) as manager:
        decision = f"/v1/approvals/{approval.id}/decision"
        refused = assert_problem(manager.post(decision, json={"decision": "approve", "decided_by": "eve"}), 422,
                                 "unknown body field(s) 'decided_by'")
        assert "the body takes comment, decision" in refused["detail"]
        assert_problem(manager.post(decision, json={"decison": "approve"}), 422, "'decison' (did you mean 'decision'?)")
    assert _counts(api_server.engine) == before  # no vote, no refusal event
    assert [a.status for a in approval_rows(api_server.engine) if a.id == approval.id] == ["pending"]


def test_the_openapi_document_allows_no_unknown_body_fields(api_server: ApiServer) -> None:
    document = httpx.get(f"{api_server.url}/openapi.json").json()
    schemas = document["components"]["schemas"]
    bodies = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if schema is None:
                continue
            bodies += 1
            resolved = schemas[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema
            assert resolved["additionalProperties"] is False, (method, path)
            assert "422" in operation["responses"], (method, path)
            if "$ref" not in schema:  # a route without a body of its own: none, or {}
                assert operation["requestBody"]["required"] is False and resolved["properties"] == {}
    # start, decision, cancel, cancel a step, retry a step, set a budget, rerun, pause and resume (an instance,
    # a process)
    assert bodies == 11
    decision = schemas["DecisionIn"]["properties"]["decision"]
    assert decision["enum"] == ["approve", "approved", "reject", "rejected"]


@pytest.mark.slow
def test_errors_tell_each_front_end_what_to_do_in_its_own_terms(db: Database, api_server: ApiServer) -> None:
    env = db.cli_env()
    with client(api_server) as http:
        nothing = assert_problem(http.post("/v1/processes/priced/instances", json={}), 404, "nothing is deployed")
        assert "POST /v1/definitions" in nothing["detail"] and "flowdb" not in nothing["detail"]
        cli_nothing = flowdb_cli("start", "priced", env=env)
        assert cli_nothing.returncode == 1 and "run flowdb deploy FILE" in cli_nothing.stderr

        _deploy(http, PRICED)
        missing = assert_problem(http.post("/v1/processes/priced/instances", json={"inputs": {"rate": 0.5}}), 422)
        assert missing["type"].endswith("/invalid-inputs")
        assert missing["detail"] == ("missing input 'amount' (number); give it in the body's inputs object: "
                                     '{"inputs": {"amount": ...}}')
        assert "--" not in missing["detail"]
        # Problems that are not about how to give a value read the same on both.
        unknown = assert_problem(http.post("/v1/processes/priced/instances",
                                           json={"inputs": {"amount": 1, "rate": 1, "amont": 2}}), 422)
        assert unknown["detail"] == "unknown input(s) amont (did you mean 'amount'?) (declared inputs: amount, rate)"
        assert_problem(http.post("/v1/processes/prised/instances", json={}), 404, "did you mean 'priced'?")

    cli_missing = flowdb_cli("start", "priced", "-i", "rate=0.5", env=env)
    assert cli_missing.returncode == 1
    assert cli_missing.stderr.strip() == "error: missing input 'amount' (number); give it with --input amount=VALUE"
    cli_unknown = flowdb_cli("start", "priced", "-i", "amount=1", "-i", "rate=1", "-i", "amont=2", env=env)
    assert cli_unknown.stderr.strip() == f"error: {unknown['detail']}"
    assert _counts(db.engine)[0] == 0


@pytest.mark.slow
def test_decisions_take_the_same_words_on_the_command_line_and_the_api(db: Database, api_server: ApiServer) -> None:
    env = db.cli_env()
    words = ["approve", "approved", "Reject", " rejected "]
    with client(api_server) as http:
        _deploy(http)
        for _ in range(2 * len(words)):
            assert http.post("/v1/processes/reviewed-report/instances", json={}).status_code == 201
    _until_every_approval_waits(api_server)
    rows = approval_rows(api_server.engine)
    assert len(rows) == 2 * len(words)
    by_cli, by_api = rows[:len(words)], rows[len(words):]
    with client(api_server, "approver", MANAGER) as manager:
        for word, on_cli, on_api in zip(words, by_cli, by_api, strict=True):
            cli = flowdb_cli("approvals", "decide", str(on_cli.id), word, "--as", MANAGER, env=env)
            assert cli.returncode == 0, cli.stderr
            api = manager.post(f"/v1/approvals/{on_api.id}/decision", json={"decision": word})
            assert api.status_code == 200, api.text
            assert api.json()["decided"] is True
        after = {a.id: (a.status, a.decision, a.decided_by) for a in approval_rows(api_server.engine)}
        for word, on_cli, on_api in zip(words, by_cli, by_api, strict=True):
            expected = ("approved",) * 2 if word.strip().lower().startswith("approve") else ("rejected",) * 2
            assert after[on_cli.id] == after[on_api.id] == (*expected, MANAGER), word

        # A word neither takes: the same refusal on both, listing the words, and nothing written.
        start = approval_rows(api_server.engine)[0].id
        before = _counts(db.engine)
        refused = assert_problem(manager.post(f"/v1/approvals/{start}/decision", json={"decision": "aprove"}), 422)
        assert refused["type"].endswith("/bad-decision")
        cli = flowdb_cli("approvals", "decide", str(start), "aprove", "--as", MANAGER, env=env)
        assert cli.returncode == 1 and cli.stderr.strip() == f"error: {refused['detail']}"
        assert refused["detail"] == ("decision must be one of approve, approved, reject, rejected, not 'aprove' "
                                     "(did you mean 'approve'?)")
        assert _counts(db.engine) == before


@pytest.mark.slow
def test_number_inputs_keep_their_json_type_on_both_front_ends(db: Database, api_server: ApiServer) -> None:
    env = db.cli_env()
    with client(api_server) as http:
        _deploy(http, PRICED)
        started = http.post("/v1/processes/priced/instances", json={"inputs": {"amount": 500, "rate": 0.5}})
        assert started.status_code == 201, started.text
        api_id = started.json()["id"]
        assert_raw_numbers(started.text)
        cli = flowdb_cli("start", "priced", "-i", "amount=500", "-i", "rate=0.5", env=env)
        assert cli.returncode == 0, cli.stderr
        cli_id = int(cli.stdout)
        exponent = flowdb_cli("start", "priced", "-i", "amount=5e2", "-i", "rate=-1", env=env)
        assert exponent.returncode == 0, exponent.stderr
        exp_id = int(exponent.stdout)
        for word in ("nan", "inf", "five"):
            bad = flowdb_cli("start", "priced", "-i", f"amount={word}", "-i", "rate=1", env=env)
            assert bad.returncode == 1 and f"input 'amount' must be a number, got '{word}'" in bad.stderr

        work(db.engine)
        with db.engine.connect() as conn:
            stored = dict(conn.execute(select(process_instances.c.id, process_instances.c.inputs)).all())
        assert set(stored) == {api_id, cli_id, exp_id}
        for iid in (api_id, cli_id):
            assert stored[iid] == {"amount": 500, "rate": 0.5}
            assert type(stored[iid]["amount"]) is int and type(stored[iid]["rate"]) is float
            shown = http.get(f"/v1/instances/{iid}")
            assert_raw_numbers(shown.text)
            body = shown.json()
            assert body["status"] == "completed"
            assert [s["output"] for s in body["steps"]] == ["500 at 0.5"]  # rendered from {{inputs.amount}}
            status = json.loads(flowdb_cli("status", str(iid), "--json", env=env).stdout)
            assert status["inputs"] == {"amount": 500, "rate": 0.5}
        # An exponent is a JSON float as it would be in a body; a whole number stays whole.
        assert stored[exp_id] == {"amount": 500.0, "rate": -1} and type(stored[exp_id]["rate"]) is int


def test_the_reviewed_example_still_starts_with_an_empty_body(api_server: ApiServer) -> None:
    """Bodies that were fine stay fine: no body, {} and {"inputs": {}} all start an instance."""
    with client(api_server) as http:
        _deploy(http, REVIEWED)
        url = "/v1/processes/reviewed-report/instances"
        assert http.post(url).status_code == 201
        assert http.post(url, json={}).status_code == 201
        assert http.post(url, json={"inputs": {}, "version": 1}).status_code == 201
