"""Context checkpoints: `context: {save: NAME}` on an agent task keeps the context its agent's reply
leaves (the platform's session id and its reply, or a blob the backend returns) in `agent_contexts`,
in the completion's transaction; `context: {restore: NAME}` on a later agent task reads it in the
claim's transaction and passes it to the call (the backend gets it as AgentRequest.context; the MCP
and HTTP backends send it with the message). The latest save of a name in an instance wins.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite

from flowdb.db.clock import Clock
from flowdb.db.tables import agent_contexts

C = agent_contexts


class ContextStatements:
    def __init__(self, dialect_name: str) -> None:
        clock = Clock(dialect_name)
        dialect = postgresql if dialect_name == "postgresql" else sqlite
        values = {"step_id": bindparam("step_id"), "round": bindparam("round"), "agent": bindparam("agent"),
                  "session_id": bindparam("session_id"), "context": bindparam("context"), "saved_at": clock.now}
        insert = dialect.insert(C).values(instance_id=bindparam("iid"), name=bindparam("name"), **values)
        self.save = insert.on_conflict_do_update(index_elements=[C.c.instance_id, C.c.name], set_=values)
        self.load = select(C.c.context, C.c.step_id, C.c.agent, C.c.session_id).where(
            C.c.instance_id == bindparam("iid"), C.c.name == bindparam("name"))

    def saved(self, conn: Connection, instance_id: int, name: str) -> dict[str, Any] | None:
        row = conn.execute(self.load, {"iid": instance_id, "name": name}).first()
        if row is None:
            return None
        return {"name": name, "step_id": row.step_id, "agent": row.agent, "session_id": row.session_id,
                **(row.context or {})}
