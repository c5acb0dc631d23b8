-- tasker-worker 0006: the control channel (deployment mode changes at runtime) and claims that
-- skip the handlers whose circuit is open and the steps this worker gave back to capable ones.

-- A mode requested for a running worker; the worker applies it, records DeploymentModeChanged
-- and clears the request. Kept in the row (not only sent as a notification) so that a worker
-- without a listener (PollingOnly, behind PgBouncer) finds it at its next control check.
ALTER TABLE tasker.workers ADD COLUMN IF NOT EXISTS requested_mode text
    CHECK (requested_mode IN ('PollingOnly', 'Hybrid', 'EventDrivenOnly'));

-- Ask live workers (one by id, those serving a namespace, or all) to switch mode; returns the
-- ids asked. Listening workers hear about it at once on tasker_worker_control.
CREATE OR REPLACE FUNCTION tasker.request_mode(p_mode text, p_worker_id text DEFAULT NULL,
                                               p_namespace text DEFAULT NULL)
RETURNS TABLE (worker_id text) LANGUAGE plpgsql AS $$
BEGIN
    IF p_mode IS NULL OR p_mode NOT IN ('PollingOnly', 'Hybrid', 'EventDrivenOnly') THEN
        RAISE EXCEPTION 'unknown deployment mode %: use PollingOnly, Hybrid or EventDrivenOnly', p_mode
              USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    WITH asked AS (
        UPDATE tasker.workers AS w
           SET requested_mode = p_mode
         WHERE w.status IN ('pending', 'active')
           AND (p_worker_id IS NULL OR w.worker_id = p_worker_id)
           AND (p_namespace IS NULL OR p_namespace = ANY (w.namespaces))
        RETURNING w.worker_id
    )
    SELECT a.worker_id FROM asked AS a ORDER BY a.worker_id;
    PERFORM pg_notify('tasker_worker_control',
                      json_build_object('command', 'set_mode', 'mode', p_mode,
                                        'worker_id', p_worker_id, 'namespace', p_namespace)::text);
END;
$$;

-- pgmq.read without the messages of some handlers and some ids. A handler whose circuit is open
-- is not claimed at all, so its steps stay untouched in the queue (read_ct unchanged) while the
-- other handlers of the namespace go on. A step the worker gave back for lack of a capability is
-- left for a capable worker for a while: without that, a lacking worker whose poll ticks line up
-- with its own releases wins it back again and again, up to max_rejections while a capable
-- worker runs. Same locking as pgmq.read (SKIP LOCKED, oldest first).
CREATE OR REPLACE FUNCTION tasker.read_skipping(p_queue text, p_vt integer, p_qty integer, p_skip text[],
                                                p_skip_msgs bigint[])
RETURNS TABLE (msg_id bigint, read_ct integer, enqueued_at timestamptz, vt timestamptz,
               message jsonb, headers jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format($sql$
        WITH cte AS (
            SELECT q.msg_id FROM pgmq.%1$I AS q
             WHERE q.vt <= clock_timestamp()
               AND q.msg_id <> ALL ($4)
               AND NOT (jsonb_typeof(q.message) = 'object'
                        AND coalesce(q.message ->> 'handler' = ANY ($2), false))
             ORDER BY q.msg_id
             LIMIT $1
               FOR UPDATE SKIP LOCKED
        )
        UPDATE pgmq.%1$I AS m
           SET last_read_at = clock_timestamp(),
               vt = clock_timestamp() + make_interval(secs => $3),
               read_ct = m.read_ct + 1
          FROM cte
         WHERE m.msg_id = cte.msg_id
        RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.message, m.headers
        $sql$, pgmq.format_table_name(p_queue, 'q'))
    USING p_qty, coalesce(p_skip, '{}'), p_vt, coalesce(p_skip_msgs, '{}');
END;
$$;

-- tasker.claim_steps (dedup flag, StepAssigned events, asynchronous commit) over read_skipping.
CREATE OR REPLACE FUNCTION tasker.claim_steps(p_queue text, p_vt integer, p_qty integer,
                                              p_worker_id text, p_skip_handlers text[],
                                              p_skip_msgs bigint[])
RETURNS TABLE (
    msg_id       bigint,
    read_ct      integer,
    enqueued_at  timestamptz,
    vt           timestamptz,
    message      jsonb,
    headers      jsonb,
    already_done boolean,
    claimed_at   timestamptz
)
LANGUAGE plpgsql ROWS 100 AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    WITH claimed AS (
        SELECT r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message, r.headers,
               d.step_uuid IS NOT NULL AS already_done,
               clock_timestamp() AS claimed_at
          FROM tasker.read_skipping(p_queue, p_vt, p_qty, p_skip_handlers, p_skip_msgs) AS r
          LEFT JOIN LATERAL (
              SELECT s.step_uuid FROM tasker.step_results AS s
               WHERE s.step_uuid = tasker.try_uuid(r.message ->> 'step_uuid')
               LIMIT 1) AS d ON true
    ), logged AS (
        INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
        SELECT 'StepAssigned', p_worker_id,
               CASE WHEN jsonb_typeof(c.message) = 'object'
                    THEN tasker.try_uuid(c.message ->> 'step_uuid') END,
               p_queue, c.msg_id, jsonb_build_object('read_ct', c.read_ct), c.claimed_at
          FROM claimed AS c
         WHERE p_worker_id IS NOT NULL AND tasker.step_events_enabled()
    )
    SELECT * FROM claimed;
END;
$$;
