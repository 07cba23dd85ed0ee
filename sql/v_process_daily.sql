-- v_process_daily: one row per process × version × UTC day on which instances of it started.
--
-- Instances count on the day they started, whatever day they finished. Durations are seconds
-- rounded to milliseconds; the p95 is nearest-rank: the smallest duration that at least 95% of
-- the completed instances' durations are at or below (CUME_DIST() >= 0.95). Money is US dollars
-- rounded to 6 places.
--
-- Columns
--   process          process name
--   version          definition version
--   day              UTC day the instances started, 'YYYY-MM-DD'
--   started          instances started that day
--   running          of those, still running
--   completed        of those, completed
--   failed           of those, failed
--   cancelled        of those, cancelled
--   success_rate     completed / (completed + failed + cancelled), 4 places (NULL if none finished)
--   mean_duration_s  mean duration of the completed instances
--   p95_duration_s   95th percentile duration of the completed instances (nearest rank)
--   cost_usd         what all of those instances cost
CREATE VIEW v_process_daily AS
WITH instances AS (
    SELECT
        process_name AS process,
        version,
        strftime('%Y-%m-%d', COALESCE(started_at, created_at)) AS day,
        status,
        cost_usd,
        CASE WHEN status = 'completed'
            THEN (julianday(finished_at) - julianday(COALESCE(started_at, created_at))) * 86400.0 END AS duration_s
    FROM process_instances
), totals AS (
    SELECT
        process, version, day,
        COUNT(*) AS started,
        SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END) AS running,
        SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END) AS completed,
        SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed,
        SUM(CASE WHEN status = 'cancelled' THEN 1 ELSE 0 END) AS cancelled,
        AVG(duration_s) AS mean_duration_s,
        SUM(cost_usd) AS cost_usd
    FROM instances
    GROUP BY process, version, day
), p95 AS (
    SELECT process, version, day, MIN(duration_s) AS duration_s
    FROM (
        SELECT process, version, day, duration_s,
            CUME_DIST() OVER (PARTITION BY process, version, day ORDER BY duration_s) AS share
        FROM instances
        WHERE duration_s IS NOT NULL
    ) AS ranked
    WHERE share >= 0.95
    GROUP BY process, version, day
)
SELECT
    t.process,
    t.version,
    t.day,
    t.started,
    t.running,
    t.completed,
    t.failed,
    t.cancelled,
    ROUND(CAST(t.completed AS DOUBLE PRECISION) / NULLIF(t.started - t.running, 0), 4) AS success_rate,
    ROUND(t.mean_duration_s, 3) AS mean_duration_s,
    ROUND(p.duration_s, 3) AS p95_duration_s,
    ROUND(CAST(t.cost_usd AS DOUBLE PRECISION), 6) AS cost_usd
FROM totals t
LEFT JOIN p95 p ON p.process = t.process AND p.version = t.version AND p.day = t.day;
