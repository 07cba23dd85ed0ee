"""Feedback on agent tasks' output: a human_approval with `reviews: STEP` records each vote (decision and
comment) as a row about that step's latest round when the approval step completes; the reviewed step's
later runs (a loop round, a retry) read the rows in the claim's transaction and give them to the agent
with the message (`{{ feedback }}` in the template, or appended to it when the template does not use it).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, insert, select

from flowdb.db.clock import Clock
from flowdb.db.tables import approval_approvers, approvals, step_feedback, step_instances

F, A, AA, S = step_feedback, approvals, approval_approvers, step_instances


class FeedbackStatements:
    def __init__(self, dialect_name: str) -> None:
        self.clock = Clock(dialect_name)
        self.votes = (select(A.c.approvers, AA.c.approver, AA.c.decision, AA.c.comment)
                      .join(AA, AA.c.approval_id == A.c.id)
                      .where(A.c.id == bindparam("aid"), AA.c.decision.is_not(None)).order_by(AA.c.decided_at))
        self.reviewed = (select(S.c.round, S.c.agent)
                         .where(S.c.instance_id == bindparam("iid"), S.c.step_id == bindparam("sid"),
                                S.c.item.is_(None), S.c.status == "completed")
                         .order_by(S.c.round.desc()).limit(1))
        self.add = insert(F).values(created_at=self.clock.now)
        self.given = (select(F.c.round, F.c.verdict, F.c.comment, F.c.given_by)
                      .where(F.c.instance_id == bindparam("iid"), F.c.step_id == bindparam("sid"))
                      .order_by(F.c.id))

    def record(self, conn: Connection, instance_id: int, reviewed_step: str, approval_id: int) -> int:
        """The votes of a decided approval, as feedback on the reviewed step's latest completed round."""
        target = conn.execute(self.reviewed, {"iid": instance_id, "sid": reviewed_step}).first()
        votes = conn.execute(self.votes, {"aid": approval_id}).all()
        if target is None or not votes:
            return 0
        rows = []
        for vote in votes:
            listed = next((a for a in vote.approvers if a.strip().lower() == vote.approver), vote.approver)
            rows.append({"instance_id": instance_id, "step_id": reviewed_step, "round": target.round,
                         "agent": target.agent, "verdict": vote.decision, "comment": vote.comment,
                         "given_by": listed, "approval_id": approval_id})
        conn.execute(self.add, rows)
        return len(rows)

    def for_step(self, conn: Connection, instance_id: int, step_id: str) -> list[dict[str, Any]]:
        """What reviewers said about the step's earlier output, oldest first."""
        return [{"round": row.round, "verdict": row.verdict, "comment": row.comment, "by": row.given_by}
                for row in conn.execute(self.given, {"iid": instance_id, "sid": step_id})]


def feedback_text(feedback: list[dict[str, Any]]) -> str:
    """The feedback as lines appended to a message whose template does not quote it."""
    lines = [f"- round {f['round']}: {f['verdict']} by {f['by']}" + (f": {f['comment']}" if f["comment"] else "")
             for f in feedback]
    return "Feedback from reviewers on your earlier output:\n" + "\n".join(lines)
