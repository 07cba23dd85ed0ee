-- v_instance_summary: one row per process instance, with the totals of its steps.
--
-- Times are UTC timestamps; durations are seconds rounded to milliseconds; money is US dollars
-- rounded to 6 places. Nothing here needs JSON functions; the same text runs on SQLite and
-- PostgreSQL (where migration 0005 adds julianday, strftime and round as SQLite has them).
--
-- Columns
--   instance_id      process_instances.id
--   process          process name
--   version          definition version the instance runs on
--   status           running | completed | failed | cancelled
--   trigger          how it was started: cli, api, bulk, webhook, sub_process, ...
--   day              UTC day it started, 'YYYY-MM-DD' (what `flowdb report --since` compares)
--   started_at       when it started
--   finished_at      when it reached a final status (NULL while running)
--   duration_s       finished_at - started_at in seconds (NULL while running)
--   steps_total      step rows of the instance (every step of its definition)
--   steps_completed  steps that completed
--   steps_failed     steps that failed (after their last attempt)
--   steps_skipped    steps skipped (condition false, route not taken, or every parent skipped)
--   attempts         handler runs over all steps (a step's attempt counter, summed)
--   retries          attempts beyond the first one of each step (attempts - 1 per step that ran)
--   cost_usd         what the instance's agent calls cost
--   error            why it failed or was cancelled (NULL otherwise)
CREATE VIEW v_instance_summary AS
SELECT
    i.id AS instance_id,
    i.process_name AS process,
    i.version,
    i.status,
    i."trigger" AS "trigger",
    strftime('%Y-%m-%d', COALESCE(i.started_at, i.created_at)) AS day,
    COALESCE(i.started_at, i.created_at) AS started_at,
    i.finished_at,
    ROUND((julianday(i.finished_at) - julianday(COALESCE(i.started_at, i.created_at))) * 86400.0, 3) AS duration_s,
    COUNT(s.id) AS steps_total,
    COALESCE(SUM(CASE WHEN s.status = 'completed' THEN 1 ELSE 0 END), 0) AS steps_completed,
    COALESCE(SUM(CASE WHEN s.status = 'failed' THEN 1 ELSE 0 END), 0) AS steps_failed,
    COALESCE(SUM(CASE WHEN s.status = 'skipped' THEN 1 ELSE 0 END), 0) AS steps_skipped,
    COALESCE(SUM(s.attempt), 0) AS attempts,
    COALESCE(SUM(CASE WHEN s.attempt > 1 THEN s.attempt - 1 ELSE 0 END), 0) AS retries,
    ROUND(CAST(i.cost_usd AS DOUBLE PRECISION), 6) AS cost_usd,
    i.error
FROM process_instances i
LEFT JOIN step_instances s ON s.instance_id = i.id
GROUP BY i.id;
