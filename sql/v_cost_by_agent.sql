-- v_cost_by_agent: one row per agent × UTC day on which agent_task steps calling it were claimed.
--
-- A step counts on the day its latest attempt was claimed (its cost and tokens are those of all its
-- attempts). Money is US dollars rounded to 6 places.
--
-- Columns
--   agent            the agent's name (as the process definitions spell it)
--   day              UTC day, 'YYYY-MM-DD'
--   steps            agent_task steps that called it
--   calls            calls made: every attempt of those steps
--   failed           of those steps, how many failed (after their last attempt)
--   cost_usd         what the calls cost
--   tokens_in        tokens sent
--   tokens_out       tokens received
CREATE VIEW v_cost_by_agent AS
SELECT
    agent,
    day,
    COUNT(*) AS steps,
    SUM(attempt) AS calls,
    SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed,
    ROUND(CAST(SUM(cost_usd) AS DOUBLE PRECISION), 6) AS cost_usd,
    CAST(SUM(tokens_in) AS BIGINT) AS tokens_in,
    CAST(SUM(tokens_out) AS BIGINT) AS tokens_out
FROM (
    SELECT agent, strftime('%Y-%m-%d', started_at) AS day, attempt, status, cost_usd, tokens_in, tokens_out
    FROM step_instances
    WHERE agent IS NOT NULL AND attempt > 0
) AS claimed
GROUP BY agent, day;
