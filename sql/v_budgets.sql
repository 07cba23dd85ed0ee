-- v_budgets: one row per budget of an instance: the process's (step_id NULL) and each agent task's own,
-- with what was spent against it. Limits start as the definition gives them; `flowdb budget set` and
-- an approved `on_exceed: ask` change them for that instance.
--
-- Columns
--   instance_id      the instance
--   process          process name
--   instance_status  running | completed | failed | cancelled
--   scope            process | step
--   step_id          the step a step budget limits (NULL for the process's budget)
--   max_cost_usd     the limit in US dollars (NULL: no cost limit)
--   max_tokens       the limit in tokens, in and out together (NULL: no token limit)
--   on_exceed        fail | pause | ask: what happens to a step that would pass the limit
--   approver         who is asked to raise it (on_exceed ask)
--   raises           how many times it was raised (approved asks)
--   spent_usd        cost of the steps it covers, all attempts (US dollars, 6 places)
--   spent_tokens     tokens in and out of those steps
--   running_steps    of those steps, how many run now
--   updated_at       when the limit was last set (UTC)
CREATE VIEW v_budgets AS
SELECT
    b.instance_id,
    i.process_name AS process,
    i.status AS instance_status,
    CASE WHEN b.step_id IS NULL THEN 'process' ELSE 'step' END AS scope,
    b.step_id,
    ROUND(CAST(b.max_cost_usd AS DOUBLE PRECISION), 6) AS max_cost_usd,
    b.max_tokens,
    b.on_exceed,
    b.approver,
    b.raises,
    ROUND(CAST(COALESCE(SUM(s.cost_usd), 0) AS DOUBLE PRECISION), 6) AS spent_usd,
    CAST(COALESCE(SUM(s.tokens_in + s.tokens_out), 0) AS BIGINT) AS spent_tokens,
    SUM(CASE WHEN s.status = 'running' THEN 1 ELSE 0 END) AS running_steps,
    b.updated_at
FROM instance_budgets AS b
JOIN process_instances AS i ON i.id = b.instance_id
LEFT JOIN step_instances AS s ON s.instance_id = b.instance_id AND (b.step_id IS NULL OR s.step_id = b.step_id)
GROUP BY b.id, b.instance_id, i.process_name, i.status, b.step_id, b.max_cost_usd, b.max_tokens, b.on_exceed,
    b.approver, b.raises, b.updated_at;
