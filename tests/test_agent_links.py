"""What ties agent tasks to each other and to people, on both databases: context checkpoints (save and
restore), reviewers' feedback given to a step when it runs again, and notices to subscribed agents
(at least once, never holding the process up)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from flowdb.approvals import decide
from flowdb.db.tables import agent_contexts, agent_notices, step_feedback
from flowdb.errors import DefinitionError

import agents_for_tests
from conftest import Database
from helpers import approval_rows, definition_from, drive, instance, runs, start, steps, waiting_for_decision, work


def agents_file(tmp_path: Path) -> Path:
    path = tmp_path / "agents.yaml"
    path.write_text('agents:\n'
                    '  memo: {python: "agents_for_tests:remembers"}\n'
                    '  echo: {python: "agents_for_tests:echo"}\n'
                    '  listener: {python: "agents_for_tests:listener"}\n'
                    '  deaf: {python: "agents_for_tests:broken"}\n')
    return path


CONTEXTS = """\
process:
  name: contexts
  steps:
    - {id: research, type: agent_task, agent: memo, message: "suppliers", context: {save: findings}}
    - {id: write, type: agent_task, agent: memo, message: "memo", depends_on: [research],
       context: {restore: findings}}
"""


def test_a_saved_context_is_given_to_the_step_that_restores_it(db: Database, tmp_path: Path) -> None:
    [iid] = start(db.engine, CONTEXTS)
    work(db.engine, agents_file(tmp_path))
    rows = steps(db.engine, iid)
    assert rows["write"].output == "memo | context: facts about suppliers from research"
    with db.engine.connect() as conn:
        saved = conn.execute(select(agent_contexts).where(agent_contexts.c.instance_id == iid)).one()
    assert (saved.name, saved.step_id, saved.agent, saved.session_id) == ("findings", "research", "memo", "sess-9")
    assert saved.context == {"response": "facts about suppliers", "blob": [1, 2]}


REVIEWED = """\
process:
  name: reviewed
  steps:
    - {id: draft, type: agent_task, agent: echo, message: "DRAFT"}
    - {id: review, type: human_approval, approvers: [ed@example.com], reviews: draft, depends_on: [draft],
       title: "Review the draft"}
    - id: check
      type: gateway
      gateway_type: exclusive
      depends_on: [review]
      routes:
        - {condition: "{{ steps.review.output.decision == 'rejected' }}", next: draft}
        - {default: true, next: done}
    - {id: done, type: agent_task, agent: echo, message: "{{ feedback | length }} notes"}
"""
QUOTED = "write it{% for f in feedback %} (round {{ f.round }}: {{ f.comment }}){% endfor %}"


@pytest.mark.parametrize("draft", ["write it", QUOTED])
def test_reviewers_feedback_is_given_to_the_step_when_it_runs_again(db: Database, tmp_path: Path, draft: str) -> None:
    agents = agents_file(tmp_path)
    [iid] = start(db.engine, REVIEWED.replace('"DRAFT"', repr(draft)))
    drive(db.engine, waiting_for_decision(db.engine, 1), agents)
    decide(db.engine, approval_rows(db.engine)[0].id, "reject", "ed@example.com", "add the numbers")
    drive(db.engine, waiting_for_decision(db.engine, 2), agents)
    decide(db.engine, approval_rows(db.engine)[1].id, "approve", "ed@example.com", "good now")
    work(db.engine, agents)
    assert instance(db.engine, iid).status == "completed", instance(db.engine, iid).error
    drafts = runs(db.engine, iid, "draft")
    assert len(drafts) == 2
    assert drafts[0].input["message"] == "write it"
    if draft == QUOTED:
        assert drafts[1].input["message"] == "write it (round 1: add the numbers)"
    else:  # appended by default: the template does not quote {{ feedback }}
        assert drafts[1].input["message"] == ("write it\n\nFeedback from reviewers on your earlier output:\n"
                                              "- round 1: rejected by ed@example.com: add the numbers")
    assert steps(db.engine, iid)["done"].output == "0 notes"  # feedback is about the step itself
    with db.engine.connect() as conn:
        given = conn.execute(select(step_feedback.c.step_id, step_feedback.c.round, step_feedback.c.agent,
                                    step_feedback.c.verdict, step_feedback.c.comment, step_feedback.c.given_by)
                             .where(step_feedback.c.instance_id == iid).order_by(step_feedback.c.id)).all()
    assert [tuple(g) for g in given] == [("draft", 1, "echo", "rejected", "add the numbers", "ed@example.com"),
                                         ("draft", 2, "echo", "approved", "good now", "ed@example.com")]


def test_subscribers_are_sent_a_notice_at_least_once_and_never_hold_the_process(db: Database,
                                                                                 tmp_path: Path) -> None:
    agents_for_tests.HEARD.clear()
    [iid] = start(db.engine, """
process:
  name: subscribed
  steps:
    - {id: price, type: agent_task, agent: echo, message: "quote 42", subscribers: [listener, deaf]}
    - {id: after, type: agent_task, agent: echo, message: "next", depends_on: [price]}
""")
    work(db.engine, agents_file(tmp_path))
    assert instance(db.engine, iid).status == "completed"
    [heard] = [r for r in agents_for_tests.HEARD if r.instance_id == iid]
    assert heard.agent == "listener" and heard.step_id == "price"
    assert "step 'price' of process 'subscribed'" in heard.message and "quote 42" in heard.message
    with db.engine.connect() as conn:
        notices = {n.agent: n for n in conn.execute(select(agent_notices).where(agent_notices.c.instance_id == iid))}
    assert (notices["listener"].status, notices["listener"].tries) == ("delivered", 1)
    assert notices["deaf"].status == "pending" and "this agent always fails" in notices["deaf"].error
    assert heard.idempotency_key == f"notice:{notices['listener'].id}"


@pytest.mark.parametrize(("step", "message"), [
    ('{id: b, type: agent_task, agent: echo, message: x, context: {restore: nothing}}',
     "restores context 'nothing', which no step saves"),
    ('{id: b, type: agent_task, agent: echo, message: x, context: {}}', "context needs save: NAME, restore: NAME"),
    ('{id: b, type: human_approval, approvers: [a@b.c], reviews: drafft}', "reviews unknown step 'drafft'"),
    ('{id: b, type: human_approval, approvers: [a@b.c], reviews: t}', "reviews step 't', which is a timer"),
    ('{id: b, type: agent_task, agent: echo, message: "{{ feedbak }}"}', "unknown name 'feedbak'"),
])
def test_malformed_links_are_refused(step: str, message: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        definition_from("process:\n  name: bad\n  steps:\n"
                        "    - {id: draft, type: agent_task, agent: echo, message: x}\n"
                        "    - {id: t, type: timer, duration: 1s}\n"
                        f"    - {step}\n")
    assert message in str(caught.value)

