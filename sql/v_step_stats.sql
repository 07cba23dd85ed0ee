-- v_step_stats: one row per process × step id, over every instance of every version.
--
-- Run and queue times are those of each step's latest attempt, as in v_step_runs: run times count
-- the steps that completed or failed (not the cancelled ones: where a cancellation cut a step says
-- nothing of how long it takes), queue times every step whose latest attempt was claimed.
-- A p95 is nearest-rank: the smallest value that at least 95% of the values are at or below, the
-- ceil(0.95 n)-th smallest of n. Durations are seconds, in whole milliseconds (the queued_ms and
-- run_ms columns of step_instances); money is US dollars rounded to 6 places.
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
-- It reads the tables rather than v_step_runs (same rules): the counts are taken per definition
-- first. The timings never sort every time ever recorded: the indexes on (definition_id,
-- step_id, bucket, ms) give how many values fall in each bucket (a value cut to three significant
-- digits) and its smallest and largest value. That says which bucket holds the p95 and at what
-- rank inside it; unless the bucket holds a single value (always so under a second), its rows are
-- counted per value, which says which value holds that rank.
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
        SUM(p.cost_usd) AS cost_usd
    FROM per_definition p
    JOIN process_definitions d ON d.id = p.definition_id
    GROUP BY d.name, p.step_id
), buckets AS (
    -- How many values each bucket holds, their sum, smallest and largest, read in index order.
    SELECT d.name AS process, h.step_id, h.metric, h.bucket, CAST(SUM(h.n) AS BIGINT) AS n,
        SUM(h.total) AS total, MIN(h.lowest) AS lowest, MAX(h.highest) AS highest
    FROM (
        SELECT definition_id, step_id, 'run' AS metric, run_bucket AS bucket, COUNT(*) AS n,
            SUM(run_ms) AS total, MIN(run_ms) AS lowest, MAX(run_ms) AS highest
        FROM step_instances
        WHERE run_ms IS NOT NULL
        GROUP BY definition_id, step_id, run_bucket
        UNION ALL
        SELECT definition_id, step_id, 'queued' AS metric, queued_bucket AS bucket, COUNT(*) AS n,
            SUM(queued_ms) AS total, MIN(queued_ms) AS lowest, MAX(queued_ms) AS highest
        FROM step_instances
        WHERE queued_ms IS NOT NULL
        GROUP BY definition_id, step_id, queued_bucket
    ) AS h
    JOIN process_definitions d ON d.id = h.definition_id
    GROUP BY d.name, h.step_id, h.metric, h.bucket
), means AS (
    SELECT process, step_id,
        CAST(SUM(CASE WHEN metric = 'run' THEN total END) AS DOUBLE PRECISION)
            / SUM(CASE WHEN metric = 'run' THEN n END) AS run_ms,
        CAST(SUM(CASE WHEN metric = 'queued' THEN total END) AS DOUBLE PRECISION)
            / SUM(CASE WHEN metric = 'queued' THEN n END) AS queued_ms
    FROM buckets
    GROUP BY process, step_id
), cumulative AS (
    SELECT process, step_id, metric, bucket, n, lowest, highest,
        CAST(SUM(n) OVER (PARTITION BY process, step_id, metric ORDER BY bucket) AS BIGINT) AS up_to,
        -- the nearest rank, ceil(0.95 n) in integers
        (95 * CAST(SUM(n) OVER (PARTITION BY process, step_id, metric) AS BIGINT) + 99) / 100 AS p95_rank
    FROM buckets
), p95_buckets AS (
    -- The bucket holding the p95's rank, and that rank counted inside the bucket.
    SELECT process, step_id, metric, bucket, lowest, highest, p95_rank - (up_to - n) AS rank_in_bucket
    FROM cumulative
    WHERE up_to >= p95_rank AND up_to - n < p95_rank
), bucket_values AS (
    -- The values of those buckets that hold more than one, counted per value (index order
    -- again). A bucket spans under 1% of its values, so it holds few rows unless most values are
    -- nearly equal, and then few distinct values.
    SELECT b.process, b.step_id, b.metric, b.rank_in_bucket, s.run_ms AS ms, COUNT(*) AS n
    FROM p95_buckets b
    JOIN process_definitions d ON d.name = b.process
    JOIN step_instances s
        ON s.definition_id = d.id AND s.step_id = b.step_id AND s.run_bucket = b.bucket AND s.run_ms IS NOT NULL
    WHERE b.metric = 'run' AND b.lowest < b.highest
    GROUP BY b.process, b.step_id, b.metric, b.rank_in_bucket, s.run_ms
    UNION ALL
    SELECT b.process, b.step_id, b.metric, b.rank_in_bucket, s.queued_ms AS ms, COUNT(*) AS n
    FROM p95_buckets b
    JOIN process_definitions d ON d.name = b.process
    JOIN step_instances s
        ON s.definition_id = d.id AND s.step_id = b.step_id AND s.queued_bucket = b.bucket
        AND s.queued_ms IS NOT NULL
    WHERE b.metric = 'queued' AND b.lowest < b.highest
    GROUP BY b.process, b.step_id, b.metric, b.rank_in_bucket, s.queued_ms
), p95_values AS (
    -- A bucket of one value is the answer; otherwise the value whose count reaches the rank.
    SELECT process, step_id, metric, lowest AS ms
    FROM p95_buckets
    WHERE lowest = highest
    UNION ALL
    SELECT process, step_id, metric, ms
    FROM (
        SELECT process, step_id, metric, ms, n, rank_in_bucket,
            CAST(SUM(n) OVER (PARTITION BY process, step_id, metric ORDER BY ms) AS BIGINT) AS up_to
        FROM bucket_values
    ) AS counted
    WHERE up_to >= rank_in_bucket AND up_to - n < rank_in_bucket
), p95 AS (
    SELECT process, step_id,
        MAX(CASE WHEN metric = 'run' THEN ms END) AS run_ms,
        MAX(CASE WHEN metric = 'queued' THEN ms END) AS queued_ms
    FROM p95_values
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
    ROUND(m.run_ms / 1000, 3) AS mean_run_s,
    CAST(p.run_ms AS DOUBLE PRECISION) / 1000 AS p95_run_s,
    ROUND(m.queued_ms / 1000, 3) AS mean_queued_s,
    CAST(p.queued_ms AS DOUBLE PRECISION) / 1000 AS p95_queued_s,
    ROUND(CAST(t.cost_usd AS DOUBLE PRECISION), 6) AS cost_usd
FROM totals t
LEFT JOIN means m ON m.process = t.process AND m.step_id = t.step_id
LEFT JOIN p95 p ON p.process = t.process AND p.step_id = t.step_id;
