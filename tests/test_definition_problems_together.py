"""One check reports every problem it can find (issue 21, seventh point).

A step that fails its model is left out of the graph but stays known by its id; references, joins,
loops, templates and step-type checks still run for the rest. Only what needs a part that failed is
skipped (a join or a "runs after" check over a parent the graph lacks), so nothing is reported as
the consequence of another problem, and nothing twice. Problems come in file order.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from flowdb.definitions import Edge, JoinRule, parse_definition
from flowdb.errors import DefinitionError

from conftest import flowdb_cli

Want = list[tuple[int, int, str]]  # line, column and a part of the message, in file order

# A model error (research has no agent), an unknown depends_on (draft), a template that does not
# parse (review), a join over one parent (publish), an unknown input with a suggestion (publish), a
# step type checked by its type (a timer with two ways to wait) and one this flowdb cannot run yet.
MANY = """\
process:
  name: many-problems
  inputs:
    topic: {type: string}
  steps:
    - id: research
      type: agent_task
      message: "Research {{ inputs.topic }}"
    - id: draft
      type: agent_task
      agent: writer
      depends_on: [research, outline]
      message: "Draft from {{ steps.research.output }}"
    - id: review
      type: agent_task
      agent: reviewer
      depends_on: [draft]
      message: "Review {{ steps.draft.output "
    - id: publish
      type: agent_task
      agent: publisher
      depends_on: [review]
      join: any
      message: "Publish {{ inputs.topik }}"
    - id: pause
      type: timer
      depends_on: [publish]
      duration: 1h
      wait_until: "09:00"
    - id: child
      type: sub_process
      process: other
      depends_on: [research]
"""
MANY_WANT: Want = [
    (6, 7, "missing required field 'agent' in step 'research'"),
    (12, 30, "step 'draft' depends on unknown step 'outline'; known steps: research, draft, review"),
    (18, 16, "template does not parse"),
    (23, 7, "step 'publish' has 1 parent(s): a join needs two or more; remove `join`"),
    (24, 16, "template uses unknown input 'topik' (did you mean 'topic'?)"),
    (29, 7, "timer 'pause' needs exactly one of duration, wait_until, until (got duration, wait_until)"),
]
UNRUNNABLE = (30, 7, "step 'child' has type 'sub_process', which this version of flowdb cannot run yet")


def problems(text: str, *, runnable: bool = False) -> list[tuple[int, int, str]]:
    with pytest.raises(DefinitionError) as caught:
        parse_definition(textwrap.dedent(text), "f.yaml", runnable=runnable)
    found = caught.value.problems
    assert all(p.file == "f.yaml" for p in found)
    return [(p.line, p.col, p.message) for p in found]


def assert_problems(found: list[tuple[int, int, str]], want: Want) -> None:
    shown = "\n".join(f"{line}:{col}: {message}" for line, col, message in found)
    assert len(found) == len(want), shown
    for (line, col, message), (want_line, want_col, part) in zip(found, want, strict=True):
        assert (line, col) == (want_line, want_col) and part in message, f"expected {want_line}:{want_col} " \
            f"{part!r} in:\n{shown}"


def test_parse_definition_reports_the_problems_of_every_phase_at_once() -> None:
    assert_problems(problems(MANY), MANY_WANT)
    assert_problems(problems(MANY, runnable=True), [*MANY_WANT, UNRUNNABLE])


def test_validate_prints_every_problem_in_file_order_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(MANY, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDB_")}
    result = flowdb_cli("validate", str(path), env=env)
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    found = []
    for line in result.stderr.splitlines():
        assert line.startswith(f"{path}:"), line
        number, col, message = line.removeprefix(f"{path}:").split(":", 2)
        found.append((int(number), int(col), message.strip()))
    assert_problems(found, [*MANY_WANT, UNRUNNABLE])


def test_a_step_that_fails_its_model_stays_known_by_its_id() -> None:
    text = """\
    process:
      name: known
      steps:
        - id: fetch
          type: agent_tsk
          routes: [{next: merge}]
        - id: use
          type: agent_task
          agent: writer
          depends_on: [fetch, fetch]
          join: any
          message: "{{ steps.fetch.output }} {{ steps.fecth.output }}"
        - id: fetch
          type: agent_task
          agent: writer
          message: again
        - id: merge
          type: agent_task
          agent: writer
          depends_on: [use]
          join: any
          message: "{{ steps.fetch.output }}"
        - type: agent_task
          agent: writer
          message: no id
        - id: last
          type: agent_task
          agent: writer
          depends_on: [nameless]
          message: x
    """
    assert_problems(problems(text), [
        (5, 13, "unknown step type 'agent_tsk' (did you mean 'agent_task'?)"),
        (10, 27, "step 'use' lists 'fetch' twice in depends_on"),
        # use's join: its parents are not all known (fetch failed): not checked.
        (12, 16, "template uses unknown step 'fecth' (did you mean 'fetch'?)"),
        (13, 11, "duplicate step id 'fetch' (first used at line 4)"),
        # merge's join: the failed fetch may route to it, so it may have two parents: not checked.
        (23, 7, "missing required field 'id' in step #5"),
        (29, 20, "step 'last' depends on unknown step 'nameless'"),
    ])


def test_a_step_whose_config_is_not_a_mapping_is_known_and_its_fields_are_not_guessed() -> None:
    text = """\
    process:
      name: config
      steps:
        - id: wait
          type: timer
          config: 5m
        - id: after
          type: agent_task
          agent: writer
          depends_on: [wait]
          config:
            message: "{{ steps.wait.output }} {{ steps.nope.output }}"
            depends_on: [wait]
            id: other
    """
    # The timer's duration may be in its config: no "needs one of duration ..." for it.
    assert_problems(problems(text), [
        (6, 15, "'config' must be a mapping of the step type's fields, got '5m'"),
        (12, 18, "template uses unknown step 'nope'"),
        (13, 9, "'depends_on' belongs on the step itself, not under 'config:'"),
        (14, 9, "'id' belongs on the step itself, not under 'config:'"),
    ])


def test_process_fields_inputs_and_output_actions_that_fail_hide_nothing_else() -> None:
    text = """\
    process:
      name: Bad_Name
      extra: 1
      inputs:
        topic: {type: strng}
        count: {type: integer, default: "x"}
      steps:
        - id: write
          type: agent_task
          agent: writer
          message: "{{ inputs.topic }} {{ inputs.nope }}"
      output:
        on_success:
          - type: log
            message: "{{ steps.write.output"
          - type: nope
            message: x
        on_failure:
          - type: log
            message: "{{ steps.gone.output }}"
    top: 1
    """
    assert_problems(problems(text), [
        (2, 9, "process.name: 'Bad_Name' is not allowed"),
        (3, 3, "unknown field 'extra' in 'process'"),
        (5, 19, "type 'strng' is not allowed in 'process.inputs.topic'"),
        (6, 37, "default of input 'count' must be an integer"),
        (11, 16, "template uses unknown input 'nope'"),  # topic failed its model, but is declared
        (15, 18, "template does not parse"),
        (16, 15, "unknown action type 'nope'"),
        (20, 18, "template uses unknown step 'gone'"),
        (21, 1, "unknown field 'top' at the top level"),
    ])


def test_a_cycle_hides_no_template_join_or_step_type_problem() -> None:
    text = """\
    process:
      name: cycle
      steps:
        - id: a
          type: agent_task
          agent: writer
          depends_on: [b]
          message: "{{ steps.b.output }}"
        - id: b
          type: agent_task
          agent: writer
          depends_on: [a]
          message: "{{ steps.c.output }} {{ oops }}"
        - id: c
          type: agent_task
          agent: writer
          join: any
          message: "{{ steps.d.output }}"
        - id: d
          type: timer
          depends_on: [c]
          timezone: Europe/Pari
          duration: 1m
    """
    # Which step runs after which is not known around a cycle: b reading c is not checked.
    assert_problems(problems(text), [
        (7, 20, "steps form a cycle: a -> b -> a"),
        (13, 16, "unknown name 'oops' in template"),
        (17, 7, "step 'c' has 0 parent(s): a join needs two or more"),
        (22, 17, "unknown time zone 'Europe/Pari'"),
    ])


def test_what_follows_from_a_missing_parent_is_not_reported() -> None:
    text = """\
    process:
      name: consequences
      steps:
        - id: start
          type: agent_task
          agent: writer
          message: x
        - id: next
          type: agent_task
          agent: writer
          depends_on: [start, strat]
          join: any
          message: "{{ steps.start.output }}"
        - id: after
          type: agent_task
          agent: writer
          message: "{{ steps.next.output }} {{ steps.start.output }}"
          depends_on: [start]
        - id: check
          type: gateway
          gateway_type: exclusive
          depends_on: [after]
          routes:
            - {next: after, condition: "false"}
            - {next: finish, default: true}
    """
    # next has a parent the graph lacks: its join (any, of what may well be two parents) is not checked,
    # nor is what it and its successors read. check's loop back to after has an exit: the unknown step.
    assert_problems(problems(text), [
        (11, 27, "step 'next' depends on unknown step 'strat' (did you mean 'start'?)"),
        (17, 16, "step 'after' uses steps.next but does not run after it"),  # after's parents are known
        (25, 18, "gateway 'check' routes to unknown step 'finish'"),
    ])


def test_a_failed_gateway_hides_only_what_it_leads_to() -> None:
    text = """\
    process:
      name: failed-gateway
      steps:
        - id: a
          type: agent_task
          agent: writer
          message: x
        - id: pick
          type: gateway
          gateway_type: exclusiv
          depends_on: [a]
          routes:
            - {next: c, condition: "true"}
            - {next: d, default: true}
        - id: c
          type: agent_task
          agent: writer
          depends_on: [a]
          join: any
          message: "{{ steps.a.output }}"
        - id: d
          type: agent_task
          agent: writer
          message: "{{ steps.c.output }}"
        - id: e
          type: agent_task
          agent: writer
          message: "{{ steps.a.output }}"
          join: any
    """
    assert_problems(problems(text), [
        (10, 21, "gateway_type 'exclusiv' is not allowed in step 'pick'"),
        # c and d are routes of pick: their joins and what they read are not checked; e's are.
        (28, 16, "step 'e' uses steps.a but does not run after it; add 'a' to its depends_on"),
        (29, 7, "step 'e' has 0 parent(s): a join needs two or more"),
    ])


def test_a_valid_definition_compiles_as_it_did() -> None:
    text = """\
    process:
      name: valid
      inputs:
        topic: {type: string}
      steps:
        - id: draft
          type: agent_task
          agent: writer
          message: "Write about {{ inputs.topic }}"
        - id: second
          type: agent_task
          agent: writer
          message: "Another view"
        - id: review
          type: gateway
          gateway_type: exclusive
          depends_on: [draft, second]
          join: any
          routes:
            - {next: draft, condition: "steps.draft.output == 'bad'"}
            - {next: publish, default: true}
        - id: publish
          type: notification
          channel: log
          for_each: [a, b]
          message: "{{ item }}: {{ steps.draft.output }}"
      output:
        on_success:
          - {type: log, message: "Done: {{ steps.publish.output }}"}
    """
    definition = parse_definition(textwrap.dedent(text), "f.yaml", runnable=True)
    assert list(definition.steps) == ["draft", "second", "review", "publish"]
    assert definition.edges == [Edge("draft", "review", "dependency"), Edge("second", "review", "dependency"),
                                Edge("review", "draft", "loop"), Edge("review", "publish", "route")]
    review = definition.steps["review"]
    assert review.parents == ["draft", "second"] and review.join == JoinRule(1, False, False)
    assert review.loops["draft"].body == ("draft", "review")
    assert definition.loop_bodies["draft"] == {"draft", "review"}
    assert [step.position for step in definition.steps.values()] == [(6, 7), (10, 7), (14, 7), (22, 7)]
    assert definition.steps["publish"].message is not None and len(definition.on_success) == 1
    # The same text gives the same content hash, whatever the filename.
    assert parse_definition(textwrap.dedent(text)).content_hash == definition.content_hash
