-- v_step_stats: one row per process × step id, over every instance of every version.
--
-- Run and queue times are those of each step's latest attempt, as in v_step_runs: run times count
-- the steps that completed or failed, queue times every step whose latest attempt was claimed.
-- A p95 is nearest-rank: the smallest value that at least 95% of the values are at or below
-- (CUME_DIST() >= 0.95). Durations are seconds rounded to milliseconds; money is US dollars
-- rounded to 6 places.
--
-- Columns
--   process          process name
--   step_id          the step's id in the definition
--   type             its step type
--   steps            step rows (one per instance that has this step)
--   runs             steps that ran at least once
--   attempts         handler runs, all attempts of all steps
--   retries          attempts beyond the first of each step
--   completed        steps that completed
--   failures         steps that failed (after their last attempt)
--   skipped          steps that were skipped
--   mean_run_s       mean run time of the completed and failed steps
--   p95_run_s        95th percentile of the same
--   mean_queued_s    mean time a claimed step waited for a worker after it became ready
--   p95_queued_s     95th percentile of the same
--   cost_usd         what all of those steps cost
--
-- It reads the tables rather than v_step_runs (same rules): the sums are taken per definition
-- first, and only the two timings are sorted, in one window, for the percentiles.
CREATE VIEW v_step_stats AS
WITH per_definition AS (
    SELECT
        s.definition_id, s.step_id, MAX(s.type) AS type, COUNT(*) AS steps,
        SUM(CASE WHEN s.attempt > 0 THEN 1 ELSE 0 END) AS runs,
        SUM(s.attempt) AS attempts,
        SUM(CASE WHEN s.attempt > 1 THEN s.attempt - 1 ELSE 0 END) AS retries,
        SUM(CASE WHEN s.status = 'completed' THEN 1 ELSE 0 END) AS completed,
        SUM(CASE WHEN s.status = 'failed' THEN 1 ELSE 0 END) AS failures,
        SUM(CASE WHEN s.status = 'skipped' THEN 1 ELSE 0 END) AS skipped,
        SUM(CASE WHEN s.status IN ('completed', 'failed') AND s.started_at >= s.ready_at
            THEN (julianday(s.finished_at) - julianday(s.started_at)) * 86400.0 END) AS run_total,
        SUM(CASE WHEN s.status IN ('completed', 'failed') AND s.started_at >= s.ready_at
            THEN 1 ELSE 0 END) AS run_count,
        SUM(CASE WHEN s.status NOT IN ('pending', 'ready') AND s.started_at >= s.ready_at
            THEN (julianday(s.started_at) - julianday(s.ready_at)) * 86400.0 END) AS queued_total,
        SUM(CASE WHEN s.status NOT IN ('pending', 'ready') AND s.started_at >= s.ready_at
            THEN 1 ELSE 0 END) AS queued_count,
        SUM(s.cost_usd) AS cost_usd
    FROM step_instances s
    GROUP BY s.definition_id, s.step_id
), totals AS (
    SELECT
        d.name AS process, p.step_id, MAX(p.type) AS type,
        -- (PostgreSQL sums bigints as numeric: back to integers)
        CAST(SUM(p.steps) AS BIGINT) AS steps, CAST(SUM(p.runs) AS BIGINT) AS runs,
        CAST(SUM(p.attempts) AS BIGINT) AS attempts, CAST(SUM(p.retries) AS BIGINT) AS retries,
        CAST(SUM(p.completed) AS BIGINT) AS completed, CAST(SUM(p.failures) AS BIGINT) AS failures,
        CAST(SUM(p.skipped) AS BIGINT) AS skipped,
        SUM(p.run_total) / NULLIF(SUM(p.run_count), 0) AS mean_run_s,
        SUM(p.queued_total) / NULLIF(SUM(p.queued_count), 0) AS mean_queued_s,
        SUM(p.cost_usd) AS cost_usd
    FROM per_definition p
    JOIN process_definitions d ON d.id = p.definition_id
    GROUP BY d.name, p.step_id
), timings AS (
    SELECT d.name AS process, s.step_id, 1 AS metric,
        (julianday(s.finished_at) - julianday(s.started_at)) * 86400.0 AS seconds
    FROM step_instances s
    JOIN process_definitions d ON d.id = s.definition_id
    WHERE s.status IN ('completed', 'failed') AND s.started_at >= s.ready_at
    UNION ALL
    SELECT d.name AS process, s.step_id, 2 AS metric,
        (julianday(s.started_at) - julianday(s.ready_at)) * 86400.0 AS seconds
    FROM step_instances s
    JOIN process_definitions d ON d.id = s.definition_id
    WHERE s.status NOT IN ('pending', 'ready') AND s.started_at >= s.ready_at
), p95 AS (
    SELECT
        process, step_id,
        MIN(CASE WHEN metric = 1 THEN seconds END) AS run_s,
        MIN(CASE WHEN metric = 2 THEN seconds END) AS queued_s
    FROM (
        SELECT process, step_id, metric, seconds,
            CUME_DIST() OVER (PARTITION BY process, step_id, metric ORDER BY seconds) AS share
        FROM timings
    ) AS ranked
    WHERE share >= 0.95
    GROUP BY process, step_id
)
SELECT
    t.process,
    t.step_id,
    t.type,
    t.steps,
    t.runs,
    t.attempts,
    t.retries,
    t.completed,
    t.failures,
    t.skipped,
    ROUND(t.mean_run_s, 3) AS mean_run_s,
    ROUND(p.run_s, 3) AS p95_run_s,
    ROUND(t.mean_queued_s, 3) AS mean_queued_s,
    ROUND(p.queued_s, 3) AS p95_queued_s,
    ROUND(CAST(t.cost_usd AS DOUBLE PRECISION), 6) AS cost_usd
FROM totals t
LEFT JOIN p95 p ON p.process = t.process AND p.step_id = t.step_id;
