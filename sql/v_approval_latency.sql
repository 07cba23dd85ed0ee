-- v_approval_latency: one row per approval a human_approval step opened.
--
-- Times are UTC timestamps; latency is seconds rounded to milliseconds.
--
-- Columns
--   approval_id      approvals.id
--   instance_id      the instance it belongs to
--   process          process name
--   version          definition version
--   step_id          the human_approval step that opened it
--   status           pending | approved | rejected | expired | cancelled
--   decision         approved | rejected; for an expired one, what on_timeout decided (NULL if nothing)
--   decided_by       the approver whose vote decided it (NULL while pending, and when on_timeout decided)
--   timed_out        1 if nobody decided before it was due (status expired), else 0
--   quorum           approvals needed
--   reminders        reminders sent while it waited
--   day              UTC day it was requested, 'YYYY-MM-DD'
--   requested_at     when it was opened
--   due_at           when it times out (NULL: never)
--   decided_at       when it was decided, expired or cancelled (NULL while pending)
--   latency_s        decided_at - requested_at in seconds (NULL while pending)
CREATE VIEW v_approval_latency AS
SELECT
    a.id AS approval_id,
    a.instance_id,
    i.process_name AS process,
    i.version,
    a.step_id,
    a.status,
    a.decision,
    a.decided_by,
    CASE WHEN a.status = 'expired' THEN 1 ELSE 0 END AS timed_out,
    a.quorum,
    a.reminders,
    strftime('%Y-%m-%d', a.created_at) AS day,
    a.created_at AS requested_at,
    a.due_at,
    a.decided_at,
    ROUND((julianday(a.decided_at) - julianday(a.created_at)) * 86400.0, 3) AS latency_s
FROM approvals a
JOIN process_instances i ON i.id = a.instance_id;
