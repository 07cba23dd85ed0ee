"""Error boundaries (on_error) and retry.non_retryable, on SQLite and PostgreSQL (issue 15, part 1)."""

from __future__ import annotations

import csv
import io

import pytest
from sqlalchemy import func, select

from flowdb.db.tables import events
from flowdb.errors import DefinitionError
from flowdb.reports import run_report

from conftest import Database, flowdb_cli
from helpers import definition_from, event_types, instance, start, steps, work

FAST = "retry: {max_attempts: 3, initial_interval: 0.01}"

CAUGHT = f"""
process:
  name: caught
  steps:
    - id: fetch
      type: agent_task
      agent: broken
      message: "go"
      {FAST}
      on_error: recover
    - id: use
      type: agent_task
      agent: noop
      message: "use it"
      depends_on: [fetch]
    - id: recover
      type: agent_task
      agent: echo
      message: "{{{{ steps.fetch.error.type }}}}: {{{{ steps.fetch.error.message }}}} / {{{{ steps.fetch.error }}}}"
    - id: after
      type: agent_task
      agent: noop
      message: "after"
      depends_on: [use, recover]
      join: any
"""


def test_a_caught_error_goes_to_its_handler_and_the_instance_goes_on(db: Database) -> None:
    [iid] = start(db.engine, CAUGHT)
    work(db.engine)
    got = steps(db.engine, iid)
    assert instance(db.engine, iid).status == "completed"
    assert (got["fetch"].status, got["fetch"].attempt, got["fetch"].error_type) == ("failed", 3, "RuntimeError")
    assert got["use"].status == "skipped"  # the failed step counts as skipped for its other successors
    assert got["recover"].status == "completed"
    error = "agent 'broken' raised RuntimeError: this agent always fails"
    assert got["recover"].output == f"RuntimeError: {error} / {error}"  # type, message, and the text alone
    assert got["after"].status == "completed"
    kinds = event_types(db.engine, iid)
    assert kinds.count("step.error_caught") == 1 and "instance.failed" not in kinds
    assert kinds[-1] == "instance.completed"
    # The dead letters say it failed, what kind of error, and that the boundary caught it.
    report = flowdb_cli("report", "dead-letters", "--format", "csv", env=db.cli_env())
    assert report.returncode == 0, report.stderr
    [header, row] = list(csv.reader(io.StringIO(report.stdout)))
    letter = dict(zip(header, row, strict=True))
    assert (letter["step_id"], letter["error_type"], letter["attempts"], letter["caught"]) == (
        "fetch", "RuntimeError", "3", "1")


def test_a_handler_is_passed_by_when_nothing_fails(db: Database) -> None:
    [iid] = start(db.engine, CAUGHT.replace("agent: broken", "agent: noop"))
    work(db.engine)
    got = steps(db.engine, iid)
    assert instance(db.engine, iid).status == "completed"
    assert (got["fetch"].status, got["use"].status, got["recover"].status, got["after"].status) == (
        "completed", "completed", "skipped", "completed")


TYPED = f"""
process:
  name: typed
  output:
    on_failure:
      - {{type: log, message: "failed: {{{{ error.type }}}}"}}
  steps:
    - id: ask
      type: agent_task
      agent: AGENT
      message: "go"
      {FAST}
      on_error:
        - {{error: NonRetryableError, next: refused}}
        - {{error: ConnectionError, next: offline}}
    - {{id: refused, type: agent_task, agent: noop, message: "refused"}}
    - {{id: offline, type: agent_task, agent: noop, message: "offline"}}
"""


@pytest.mark.parametrize(("agent", "handler"), [("refuses", "refused"), ("broken", None)])
def test_errors_go_by_type_and_an_uncaught_one_fails_the_instance(db: Database, agent: str,
                                                                   handler: str | None) -> None:
    """`refuses` raises NonRetryableError (the first entry); `broken` a RuntimeError, which no entry takes."""
    [iid] = start(db.engine, TYPED.replace("AGENT", agent))
    work(db.engine)
    got = steps(db.engine, iid)
    kinds = event_types(db.engine, iid)
    if handler == "refused":
        assert instance(db.engine, iid).status == "completed"
        assert (got["refused"].status, got["offline"].status) == ("completed", "skipped")
        assert got["ask"].attempt == 1  # NonRetryableError: no second attempt
    else:
        assert instance(db.engine, iid).status == "failed"
        assert got["ask"].attempt == 3
        assert (got["refused"].status, got["offline"].status) == ("cancelled", "cancelled")
        assert kinds.count("instance.failed") == 1 and "step.error_caught" not in kinds
        with db.engine.connect() as conn:
            letters = run_report(conn, "v_dead_letters")
        assert [(r[letters.columns.index("step_id")], r[letters.columns.index("caught")]) for r in letters.rows] \
            == [("ask", 0)]


NON_RETRYABLE = """
process:
  name: non-retryable
  steps:
    - id: ask
      type: agent_task
      agent: broken
      message: "go"
      retry: {max_attempts: 5, initial_interval: 0.01, non_retryable: [RuntimeError]}
"""


def test_a_non_retryable_error_type_fails_at_the_first_attempt(db: Database) -> None:
    [iid] = start(db.engine, NON_RETRYABLE)
    work(db.engine)
    got = steps(db.engine, iid)["ask"]
    assert (got.status, got.attempt, got.error_type) == ("failed", 1, "RuntimeError")
    assert instance(db.engine, iid).status == "failed"
    with db.engine.connect() as conn:
        retries = conn.execute(select(func.count()).select_from(events).where(
            events.c.instance_id == iid, events.c.type == "step.retry_scheduled")).scalar_one()
    assert retries == 0
    # Another type still retries.
    [other] = start(db.engine, NON_RETRYABLE.replace("[RuntimeError]", "[ValueError]"))
    work(db.engine)
    assert steps(db.engine, other)["ask"].attempt == 5


FOR_EACH = """
process:
  name: each-caught
  steps:
    - id: each
      type: agent_task
      agent: broken
      message: "{{ item }}"
      for_each: [1, 2, 3]
      retry: {max_attempts: 1}
      on_error: cleanup
    - {id: cleanup, type: agent_task, agent: noop, message: "clean"}
"""


def test_a_for_each_step_whose_item_fails_is_caught_too(db: Database) -> None:
    [iid] = start(db.engine, FOR_EACH)
    work(db.engine)
    got = steps(db.engine, iid)
    assert instance(db.engine, iid).status == "completed"
    assert (got["each"].status, got["cleanup"].status) == ("failed", "completed")
    assert instance(db.engine, iid).open_steps == 0  # the items still open were cancelled and counted
    with db.engine.connect() as conn:
        letters = run_report(conn, "v_dead_letters")
    caught = {(r[letters.columns.index("item")], r[letters.columns.index("caught")]) for r in letters.rows}
    assert (None, 1) in caught and all(flag == 1 for _, flag in caught)  # the step and its failed item: caught


@pytest.mark.parametrize(("yaml", "message"), [
    ("on_error: nowhere", "sends its errors to unknown step 'nowhere'"),
    ("on_error: a", "sends its errors to itself"),
    ("on_error: b\n    - {id: b, type: agent_task, agent: noop, message: x, depends_on: [c]}\n"
     "    - {id: c, type: agent_task, agent: noop, message: x}",
     "handles the errors of 'a' (on_error): it starts from an error, so it has no depends_on"),
])
def test_a_bad_error_boundary_is_refused_with_a_clear_error(yaml: str, message: str) -> None:
    text = f"""
process:
  name: bad
  steps:
    - id: a
      type: agent_task
      agent: noop
      message: x
      {yaml}
"""
    if "id: b" not in yaml and "nowhere" not in yaml and "itself" not in message:
        text += "    - {id: b, type: agent_task, agent: noop, message: x}\n"
    with pytest.raises(DefinitionError) as caught:
        definition_from(text)
    assert message in str(caught.value)


def test_an_error_boundary_inside_a_loop_to_a_handler_outside_it_is_refused() -> None:
    """It would take the first round's error only (its edge settles then): refused until rounds carry it."""
    text = """
process:
  name: loop-boundary
  steps:
    - {id: a, type: agent_task, agent: noop, message: a, on_error: h}
    - {id: g, type: gateway, gateway_type: exclusive, depends_on: [a],
       routes: [{condition: "{{ steps.a.visit }} < 3", next: a}, {default: true, next: done}]}
    - {id: done, type: agent_task, agent: noop, message: done}
    - {id: h, type: agent_task, agent: noop, message: h}
"""
    with pytest.raises(DefinitionError, match="step 'a' runs in a loop, and its errors go to 'h' outside it"):
        definition_from(text)


def test_retrying_a_caught_failure_is_refused(db: Database) -> None:
    from flowdb.control import StepNotRetryable, retry_step

    [iid] = start(db.engine, CAUGHT)
    work(db.engine)
    with pytest.raises(StepNotRetryable, match="its error went to 'recover' \\(on_error\\)"):
        retry_step(db.engine, iid, "fetch")
