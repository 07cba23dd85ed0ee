-- v_agent_runs: one row per run of an agent task (a step row: a loop round or a for_each item has its
-- own), with what ran it: agent state binding.
--
-- Columns
--   step_instance_id  step_instances.id
--   instance_id       the instance it belongs to
--   process           process name
--   step_id           the step's id in the definition
--   round             the loop round (1: the first visit)
--   item              the for_each item's index, NULL for a step's own row
--   agent             the agent's name as the process definition spells it
--   backend           python | http | mcp: how the worker reached the agent (NULL until it ran)
--   execution_id      the agent platform's execution that ran it (or still runs it, while status
--                     is waiting); NULL for backends without executions
--   session_id        the agent platform's chat session it ran in (sequential MCP agents)
--   status            pending | ready | running | waiting | completed | failed | skipped | cancelled
--   attempts          calls begun (a call the agent refused as busy is not counted)
--   cost_usd          what its attempts cost (US dollars, 6 places)
--   tokens_in         tokens sent, all attempts
--   tokens_out        tokens received, all attempts
--   started_at        when its latest attempt was claimed (UTC)
--   finished_at       when it reached a final status (UTC)
CREATE VIEW v_agent_runs AS
SELECT
    s.id AS step_instance_id,
    s.instance_id,
    i.process_name AS process,
    s.step_id,
    s.round,
    s.item,
    s.agent,
    s.agent_backend AS backend,
    s.agent_execution AS execution_id,
    s.agent_session AS session_id,
    s.status,
    s.attempt AS attempts,
    ROUND(CAST(s.cost_usd AS DOUBLE PRECISION), 6) AS cost_usd,
    s.tokens_in,
    s.tokens_out,
    s.started_at,
    s.finished_at
FROM step_instances AS s
JOIN process_instances AS i ON i.id = s.instance_id
WHERE s.type = 'agent_task';
