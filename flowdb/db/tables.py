"""The schema as SQLAlchemy Core tables: a public interface, since people write SQL against it.

Times are UTC timestamps set from the database's clock; money is numeric; JSON columns hold
payloads only (reports never need JSON functions). Migrations in migrations/ create exactly this.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from flowdb.engine.status import CLAIMABLE_STEP, sql_list

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Json = JSON().with_variant(JSONB(), "postgresql")
# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid (autoincrementing), so ids are
# BIGINT on PostgreSQL and INTEGER on SQLite.
Id = BigInteger().with_variant(Integer(), "sqlite")
Money = Numeric(18, 6, asdecimal=False)
Timestamp = DateTime(timezone=True)

# Statuses in which a step can be claimed once claimable_at has passed (see db/claims.py).
CLAIMABLE = sql_list(CLAIMABLE_STEP)
# The claimable index's condition: a paused instance's rows (`paused`) are out of it (flowdb/engine/pause.py).
CLAIMABLE_ROWS = f"status IN {CLAIMABLE} AND NOT paused"

process_definitions = Table(
    "process_definitions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("source", Text, nullable=False),
    Column("parsed", Json, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    UniqueConstraint("name", "version"),
)

process_instances = Table(
    "process_instances",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("definition_id", Id, ForeignKey("process_definitions.id"), nullable=False),
    Column("process_name", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("inputs", Json, nullable=False),
    Column("outputs", Json),
    Column("error", Text),
    Column("trigger", String(32), nullable=False, server_default="cli"),
    Column("idempotency_key", String(200), unique=True),
    Column("parent_step_instance_id", Id),
    Column("cost_usd", Money, nullable=False, server_default="0"),
    Column("budget_usd", Money),
    # Paused (flowdb pause, or a step's retry.on_exhausted: pause): when and by whom; NULL: not paused.
    Column("paused_at", Timestamp),
    Column("paused_by", String(200)),
    # Steps not yet in a final state; the step that brings it to 0 finishes the instance.
    Column("open_steps", Integer, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("started_at", Timestamp),
    Column("finished_at", Timestamp),
    Index("ix_process_instances_status_process", "status", "process_name"),
    Index("ix_process_instances_created_at", "created_at"),
)

step_instances = Table(
    "step_instances",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("instance_id", Id, ForeignKey("process_instances.id"), nullable=False),
    Column("definition_id", Id, nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("type", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False, server_default="1"),
    # Join countdown: parents not yet settled, and how many of the settled ones completed.
    Column("pending_parents", Integer, nullable=False, server_default="0"),
    Column("completed_parents", Integer, nullable=False, server_default="0"),
    Column("ready_at", Timestamp),
    # When the claim query may take the row: ready_at for a ready step, the lease expiry for a
    # running one, the wake-up time for a waiting one (NULL: woken only by a row update).
    Column("claimable_at", Timestamp),
    Column("lease_owner", String(200)),
    Column("lease_token", String(64)),
    Column("lease_expires_at", Timestamp),
    Column("heartbeat_at", Timestamp),
    Column("agent", String(100)),
    Column("input", Json),
    Column("output", Json),
    Column("error", Text),
    Column("error_type", String(100)),  # what kind of error failed it (StepTimeout, an agent's exception...)
    Column("cost_usd", Money, nullable=False, server_default="0"),
    Column("tokens_in", BigInteger, nullable=False, server_default="0"),
    Column("tokens_out", BigInteger, nullable=False, server_default="0"),
    Column("created_at", Timestamp, nullable=False),
    Column("started_at", Timestamp),
    Column("finished_at", Timestamp),
    # How long the latest attempt waited for a worker and ran, in ms, with their buckets: written
    # by the statements that move the timestamps (db/timings.py).
    Column("queued_ms", BigInteger),
    Column("queued_bucket", BigInteger),
    Column("run_ms", BigInteger),
    Column("run_bucket", BigInteger),
    # Crash accounting (db/claims.py, "Poison steps"): a step taken over from a worker whose lease
    # expired is a suspect and runs alone on its next worker (ready again if handed back before it
    # started); `isolated` says its current run is alone, so the loss of that run is charged to it.
    # `reclaims` counts the take-overs, `releases` the times a stopping worker gave the step back unfinished.
    Column("suspect", Boolean, nullable=False, server_default=false()),
    Column("isolated", Boolean, nullable=False, server_default=false()),
    Column("reclaims", Integer, nullable=False, server_default="0"),
    Column("releases", Integer, nullable=False, server_default="0"),
    # Its instance is paused: out of the claimable index until it resumes (its claimable_at kept).
    Column("paused", Boolean, nullable=False, server_default=false()),
    CheckConstraint("reclaims >= 0 AND releases >= 0", name="ck_step_instances_crash_counts"),
    CheckConstraint("(status IN ('running', 'ready') OR NOT suspect) "
                    "AND (NOT isolated OR (suspect AND status = 'running'))", name="ck_step_instances_suspect_running"),
    # Loop rounds and for_each items (migration 0008): one row per run of a step. `item` is NULL for
    # a step's own row; a for_each step's items are rows beside it. `woken`: the row waited before.
    Column("round", Integer, nullable=False, server_default="1"),
    Column("item", Integer),
    Column("item_value", Json),
    # A for_each step's own row counts its items down (of items_total): the last one wakes it.
    Column("items_total", Integer),
    Column("items_left", Integer),
    Column("woken", Boolean, nullable=False, server_default=false()),
    # Cancelled because its instance stopped (a failure), not for its own sake: `flowdb retry` gives it back.
    Column("halted", Boolean, nullable=False, server_default=false()),
    # Agent state binding (migration 0010): the backend (python, http, mcp) that ran an agent task, and
    # the agent platform's execution and chat session. A waiting agent task with an execution polls it.
    Column("agent_backend", String(16)),
    Column("agent_execution", String(200)),
    Column("agent_session", String(200)),
    CheckConstraint("round >= 1", name="ck_step_instances_round"),
    CheckConstraint("item IS NULL OR item >= 0", name="ck_step_instances_item"),
    CheckConstraint("items_left IS NULL OR (items_left >= 0 AND items_left <= items_total)",
                    name="ck_step_instances_items"),
    Index("uq_step_instances_run", "instance_id", "step_id", "round", func.coalesce(text("item"), -1), unique=True),
    # Only claimable rows are in this index, so the claim costs the same with a million finished rows.
    Index(
        "ix_step_instances_claimable",
        "claimable_at",
        "id",
        sqlite_where=text(CLAIMABLE_ROWS),
        postgresql_where=text(CLAIMABLE_ROWS),
    ),
    # The steps to take over after their worker died (db/claims.py): few, so the look-up costs nothing.
    Index("ix_step_instances_suspects", "claimable_at", "id", sqlite_where=text("suspect"),
          postgresql_where=text("suspect")),
    # Percentiles of the timings by index order, a step of a definition at a time (v_step_stats).
    *(Index(None, "definition_id", "step_id", f"{timing}_bucket", f"{timing}_ms",
            sqlite_where=text(f"{timing}_ms IS NOT NULL"), postgresql_where=text(f"{timing}_ms IS NOT NULL"))
      for timing in ("queued", "run")),
)

step_edges = Table(
    "step_edges",
    metadata,
    Column("instance_id", Id, ForeignKey("process_instances.id"), primary_key=True),
    Column("from_step", String(100), primary_key=True),
    Column("to_step", String(100), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("state", String(16), nullable=False, server_default="pending"),
)

events = Table(
    "events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("instance_id", Id, nullable=False),
    Column("step_instance_id", Id),
    Column("type", String(48), nullable=False),
    Column("payload", Json),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_events_instance_id_id", "instance_id", "id"),
)

# One row per approval a human_approval step opened. The approvers are a snapshot taken when it
# opened; `status` is pending → approved | rejected | expired (nobody decided in time; `decision`
# then holds what on_timeout decided, if anything) | cancelled (the instance stopped).
approvals = Table(
    "approvals",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("instance_id", Id, ForeignKey("process_instances.id"), nullable=False),
    Column("step_instance_id", Id, ForeignKey("step_instances.id"), nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("approvers", Json, nullable=False),
    Column("quorum", Integer, nullable=False, server_default="1"),
    Column("status", String(16), nullable=False),
    Column("decision", String(16)),
    Column("decided_by", String(200)),
    Column("comment", Text),
    Column("title", Text, nullable=False),
    Column("instructions", Text),
    Column("artifacts", Json, nullable=False),
    Column("on_timeout", String(16), nullable=False),
    Column("timeout_s", Numeric(18, 3, asdecimal=False)),
    Column("due_at", Timestamp),
    Column("reminders", Integer, nullable=False, server_default="0"),
    Column("created_at", Timestamp, nullable=False),
    Column("notified_at", Timestamp),
    Column("decided_at", Timestamp),
    Index("ix_approvals_status_created_at", "status", "created_at"),
    Index("ix_approvals_step_instance_id", "step_instance_id"),
    Index("ix_approvals_instance_id", "instance_id"),
)

# One row per approver of an approval (the inbox reads it by approver); `decision` is set when that
# approver decides. `approver` is the identity as listed, trimmed and lower-cased.
approval_approvers = Table(
    "approval_approvers",
    metadata,
    Column("approval_id", Id, ForeignKey("approvals.id"), primary_key=True),
    Column("approver", String(200), primary_key=True),
    Column("decision", String(16)),
    Column("comment", Text),
    Column("decided_at", Timestamp),
    Index("ix_approval_approvers_approver", "approver", "approval_id"),
)

# Bearer tokens of the HTTP API: only a hash of each token is kept (the token is shown once).
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("identity", String(200), nullable=False),
    Column("role", String(16), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Timestamp, nullable=False),
    Column("revoked_at", Timestamp),
)

# Signed-in sessions of the web UI (api/ui/sessions.py): the cookie holds a random secret, the table its
# hash; a session acts as its API token, so revoking the token ends the session.
ui_sessions = Table(
    "ui_sessions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("session_hash", String(64), nullable=False, unique=True),
    Column("token_id", Id, ForeignKey("api_tokens.id", ondelete="CASCADE"), nullable=False),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp, nullable=False),
    Index("ix_ui_sessions_expires_at", "expires_at"),
)

# The workers running now, and what each can serve (db/workers.py): a worker registers when it starts
# and keeps `expires_at` ahead of the clock with its heartbeat, so a row whose time has passed is a
# worker that died. The claim does not read these tables (each worker filters by what it serves);
# they tell which ready steps no running worker can serve (v_unservable_steps) and which agents a
# deploy names that nobody serves.
workers = Table(
    "workers",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("instance_id", Id),  # a `flowdb run` works this one instance only
    Column("started_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp, nullable=False),
    Column("stopped_at", Timestamp),
)

# One row per agent (kind 'agent') and step type (kind 'step_type') a worker can serve.
worker_serves = Table(
    "worker_serves",
    metadata,
    Column("worker", String(200), ForeignKey("workers.name", ondelete="CASCADE"), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("name", String(100), primary_key=True),
    CheckConstraint("kind IN ('agent', 'step_type')", name="ck_worker_serves_kind"),
    Index("ix_worker_serves_kind_name", "kind", "name"),
)

# The budgets of each instance (db/budgets.py): one row for the process's budget (step_id NULL) and one per
# agent task with a budget of its own, copied from the definition when the instance starts. `flowdb
# budget raise` and an approved `on_exceed: ask` raise the limits here (`raises` counts them).
instance_budgets = Table(
    "instance_budgets",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("instance_id", Id, ForeignKey("process_instances.id"), nullable=False),
    Column("step_id", String(100)),
    Column("max_cost_usd", Money),
    Column("max_tokens", BigInteger),
    Column("on_exceed", String(8), nullable=False),
    Column("approver", String(200)),
    Column("raises", Integer, nullable=False, server_default="0"),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint("on_exceed IN ('fail', 'pause', 'ask')", name="ck_instance_budgets_on_exceed"),
    Index("uq_instance_budgets_scope", "instance_id", func.coalesce(text("step_id"), text("''")), unique=True),
)

# Tokens each rate-limited agent reported, per 10-second bucket (db/agent_usage.py): the claim sums the
# last minute's against the agent's `tokens_per_minute`. `bucket` is a Unix time in seconds.
agent_token_usage = Table(
    "agent_token_usage",
    metadata,
    Column("agent", String(100), primary_key=True),
    Column("bucket", BigInteger, primary_key=True),
    Column("tokens", BigInteger, nullable=False),
)

# Notices to the agents subscribed to a step (`subscribers:`), written when it completes and delivered
# at least once by the workers (db/subscriptions.py): pending → delivered, or failed after its tries.
agent_notices = Table(
    "agent_notices",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("instance_id", Id, ForeignKey("process_instances.id"), nullable=False),
    Column("step_instance_id", Id, nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("agent", String(100), nullable=False),
    Column("message", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("tries", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("created_at", Timestamp, nullable=False),
    Column("next_at", Timestamp, nullable=False),
    Column("delivered_at", Timestamp),
    CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="ck_agent_notices_status"),
    Index("ix_agent_notices_pending", "next_at", "id", sqlite_where=text("status = 'pending'"),
          postgresql_where=text("status = 'pending'")),
)

# Contexts saved by agent tasks (`context: {save: NAME}`) for later ones (`restore: NAME`): one row per
# name and instance, the latest save (db/contexts.py).
agent_contexts = Table(
    "agent_contexts",
    metadata,
    Column("instance_id", Id, ForeignKey("process_instances.id"), primary_key=True),
    Column("name", String(100), primary_key=True),
    Column("step_id", String(100), nullable=False),
    Column("round", Integer, nullable=False),
    Column("agent", String(100), nullable=False),
    Column("session_id", String(200)),
    Column("context", Json),
    Column("saved_at", Timestamp, nullable=False),
)

# What approvers said about an agent task's output (a human_approval with `reviews: STEP`): one row per
# vote, given to the agent when the step runs again (db/feedback.py).
step_feedback = Table(
    "step_feedback",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("instance_id", Id, ForeignKey("process_instances.id"), nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("round", Integer, nullable=False),
    Column("agent", String(100)),
    Column("verdict", String(16), nullable=False),
    Column("comment", Text),
    Column("given_by", String(200), nullable=False),
    Column("approval_id", Id, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_step_feedback_instance_id_step_id", "instance_id", "step_id"),
)
