-- v_step_runs: one row per run of a step in every instance (a step row, with all its attempts): a
-- step in a loop has a row per round, a for_each step a row per item beside its own row.
--
-- A step's row keeps its latest attempt: started_at is when a worker claimed that attempt (for a
-- timer or an approval, the first claim: the wait is part of the run), ready_at when that attempt
-- became claimable (after a retry: when its backoff ended). Times are UTC timestamps; durations are
-- seconds rounded to milliseconds; money is US dollars rounded to 6 places.
--
-- Columns
--   step_instance_id  step_instances.id
--   instance_id       the instance it belongs to
--   process           process name
--   version           definition version
--   step_id           the step's id in the definition
--   round             the loop round this row ran (1: the first visit; later rounds only in loops)
--   item              the for_each item's index (from 0), NULL for a step's own row (a for_each
--                     step's own row has the list of its items' outputs as output, no cost)
--   type              agent_task | human_approval | gateway | timer | sub_process | notification | end
--   agent             the agent of an agent_task (NULL for other types)
--   status            pending | ready | running | waiting | completed | failed | skipped | cancelled
--   attempts          handler runs so far (0: never claimed)
--   max_attempts      attempts its retry policy allows
--   retries           attempts beyond the first (attempts - 1, never below 0)
--   day               UTC day its latest attempt was claimed, 'YYYY-MM-DD' (NULL if never claimed)
--   ready_at          when the latest attempt became claimable (for a step taken over from a
--                     worker that died, when that worker's lease expired)
--   started_at        when the latest attempt was claimed
--   finished_at       when it reached a final status
--   queued_s          started_at - ready_at: how long the latest attempt waited for a worker
--                     (step_instances.queued_ms / 1000; NULL unless that attempt was claimed)
--   run_s             finished_at - started_at: how long the latest attempt ran, waits included
--                     (step_instances.run_ms / 1000; for a step cancelled, or skipped by its
--                     condition, after it was claimed: until then; NULL until it finished,
--                     unless that attempt was claimed, and when the clock went backwards)
--   cost_usd          cost of all its attempts
--   tokens_in         tokens sent to the agent, all attempts
--   tokens_out        tokens received from the agent, all attempts
--   error             why it failed; for a step waiting out a retry backoff (ready), why its last
--                     attempt failed (a new attempt clears it: the events table keeps every one)
CREATE VIEW v_step_runs AS
SELECT
    s.id AS step_instance_id,
    s.instance_id,
    d.name AS process,
    d.version,
    s.step_id,
    s.round,
    s.item,
    s.type,
    s.agent,
    s.status,
    s.attempt AS attempts,
    s.max_attempts,
    CASE WHEN s.attempt > 1 THEN s.attempt - 1 ELSE 0 END AS retries,
    strftime('%Y-%m-%d', s.started_at) AS day,
    s.ready_at,
    s.started_at,
    s.finished_at,
    CAST(s.queued_ms AS DOUBLE PRECISION) / 1000 AS queued_s,
    CASE WHEN s.status IN ('cancelled', 'skipped') AND s.started_at >= s.ready_at
            AND s.finished_at >= s.started_at
        THEN ROUND((julianday(s.finished_at) - julianday(s.started_at)) * 86400.0, 3)
        ELSE CAST(s.run_ms AS DOUBLE PRECISION) / 1000 END AS run_s,
    ROUND(CAST(s.cost_usd AS DOUBLE PRECISION), 6) AS cost_usd,
    s.tokens_in,
    s.tokens_out,
    s.error
FROM step_instances s
JOIN process_definitions d ON d.id = s.definition_id;
