-- v_unservable_steps: one row per ready step that no running worker can serve. A worker claims only
-- steps of the agents in its agents file (and of the step types it knows), so a step whose agent no
-- running worker has waits here, ready, until a worker that has it starts (nothing fails meanwhile).
--
-- A worker is running while its registration has not expired (workers.expires_at, kept ahead of the
-- clock by its heartbeat) and it has not stopped; a `flowdb run` serves only its own instance.
--
-- Columns
--   step_instance_id  step_instances.id
--   instance_id       the instance it belongs to
--   process           process name
--   version           definition version
--   step_id           the step's id in the definition
--   round             the loop round (1: the first visit)
--   item              the for_each item's index, NULL for a step's own row
--   type              the step type
--   agent             the agent it needs (NULL for steps that are not agent tasks)
--   needs             what it waits for, in words: 'agent NAME' or 'step type NAME'
--   ready_at          when it became ready
--   running_workers   workers running now, not counting `flowdb run`s (0: the step waits for any
--                     worker at all)
CREATE VIEW v_unservable_steps AS
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
    CASE WHEN s.agent IS NULL THEN 'step type ' || s.type ELSE 'agent ' || s.agent END AS needs,
    s.ready_at,
    (SELECT COUNT(*) FROM workers r
     WHERE r.stopped_at IS NULL AND r.instance_id IS NULL
       AND julianday(r.expires_at) > julianday(CURRENT_TIMESTAMP)) AS running_workers
FROM step_instances s
JOIN process_definitions d ON d.id = s.definition_id
-- The first condition is the claim index's own (so a database of finished steps is not scanned).
WHERE s.status IN ('ready', 'running', 'waiting') AND NOT s.paused
  AND s.status = 'ready'
  AND NOT EXISTS (
      SELECT 1
      FROM workers w
      JOIN worker_serves c ON c.worker = w.name
      WHERE w.stopped_at IS NULL
        AND julianday(w.expires_at) > julianday(CURRENT_TIMESTAMP)
        AND (w.instance_id IS NULL OR w.instance_id = s.instance_id)
        AND c.kind = CASE WHEN s.agent IS NULL THEN 'step_type' ELSE 'agent' END
        AND c.name = COALESCE(s.agent, s.type)
  );
