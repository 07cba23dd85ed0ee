"""Tokens per agent per minute, for `tokens_per_minute` in the agents file.

The tokens an agent reports (in and out) are added, when its step's outcome is recorded, to a row per
agent and 10-second bucket; the claim sums the last minute's buckets of a rate-limited agent and takes
none of its steps while the sum has reached the limit (they stay ready; the next poll looks again).
Buckets older than two minutes are deleted as new ones are written. Times are the workers' clocks
(db/clock.py utcnow): a limit per minute does not need the database's.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, bindparam, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from flowdb.db.clock import utcnow
from flowdb.db.tables import agent_token_usage

U = agent_token_usage
BUCKET_SECONDS = 10
WINDOW_SECONDS = 60
KEEP_SECONDS = 120


def bucket_now() -> int:
    return int(utcnow().timestamp()) // BUCKET_SECONDS * BUCKET_SECONDS


class UsageStatements:
    def __init__(self, dialect_name: str) -> None:
        dialect = postgresql if dialect_name == "postgresql" else sqlite
        insert = dialect.insert(U).values(agent=bindparam("agent"), bucket=bindparam("bucket"),
                                          tokens=bindparam("tokens"))
        self.add = insert.on_conflict_do_update(index_elements=[U.c.agent, U.c.bucket],
                                                set_={"tokens": U.c.tokens + insert.excluded.tokens})
        self.forget = delete(U).where(U.c.agent.in_(bindparam("agents", expanding=True)),
                                      U.c.bucket < bindparam("before"))
        self.used = (select(U.c.agent, func.sum(U.c.tokens))
                     .where(U.c.agent.in_(bindparam("agents", expanding=True)), U.c.bucket > bindparam("since"))
                     .group_by(U.c.agent))

    def record(self, conn: Connection, tokens: dict[str, int]) -> None:
        """Add tokens per agent to the current bucket (in the outcome's transaction)."""
        spent = {agent: n for agent, n in tokens.items() if n > 0}
        if not spent:
            return
        bucket = bucket_now()
        conn.execute(self.add, [{"agent": agent, "bucket": bucket, "tokens": n} for agent, n in sorted(spent.items())])
        conn.execute(self.forget, {"agents": sorted(spent), "before": bucket - KEEP_SECONDS})

    def last_minute(self, conn: Connection, agents: Iterable[str]) -> dict[str, int]:
        """Tokens each agent reported in the last minute (its current bucket included)."""
        names = sorted(agents)
        if not names:
            return {}
        since = bucket_now() - WINDOW_SECONDS
        return {agent: int(total) for agent, total in conn.execute(self.used, {"agents": names, "since": since})}
