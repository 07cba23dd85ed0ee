-- v_dead_letters: one row per run of a step (a round, a for_each item) that failed for good: its
-- last attempt failed, or its error was of a type it does not retry. `caught` says whether the step's
-- error boundary (on_error) took the error (the instance went on) or the failure failed the instance.
--
-- Times are UTC timestamps.
--
-- Columns
--   step_instance_id  step_instances.id
--   instance_id       the instance it belongs to
--   process           process name
--   version           definition version
--   instance_status   the instance's status now
--   step_id           the step's id in the definition
--   round             the loop round of the run
--   item              the for_each item's index, NULL for a step's own row
--   agent             the agent of an agent_task (NULL for other types)
--   error_type        what kind of error: an agent's exception class, StepTimeout, AgentRefused...
--                     (StepFailed when none was recorded)
--   error             the error message
--   attempts          handler runs it had
--   caught            1 when an error boundary took the error, else 0
--   day               UTC day it failed, 'YYYY-MM-DD'
--   finished_at       when it failed
CREATE VIEW v_dead_letters AS
SELECT
    s.id AS step_instance_id,
    s.instance_id,
    i.process_name AS process,
    i.version,
    i.status AS instance_status,
    s.step_id,
    s.round,
    s.item,
    s.agent,
    COALESCE(s.error_type, 'StepFailed') AS error_type,
    s.error,
    s.attempt AS attempts,
    CASE WHEN EXISTS (  -- the event is on the step's own row (an item's failure fails its step)
        SELECT 1 FROM events e JOIN step_instances o ON o.id = e.step_instance_id
        WHERE e.instance_id = s.instance_id AND e.type = 'step.error_caught'
          AND o.step_id = s.step_id AND o.round = s.round
    ) THEN 1 ELSE 0 END AS caught,
    strftime('%Y-%m-%d', s.finished_at) AS day,
    s.finished_at
FROM step_instances s
JOIN process_instances i ON i.id = s.instance_id
WHERE s.status = 'failed'
