-- tasker-worker 0007: claims that also skip given messages. A worker that gave a step back
-- because it lacks the capability the step needs leaves that message alone for a while, so a
-- capable worker gets it instead of losing a coin toss at every release (a lacking worker whose
-- poll ticks line up with its own releases would otherwise win it again and again, and the
-- step would reach max_rejections while a capable worker is running).

-- read_skipping of 0006 plus p_skip_msgs: messages with these ids are not claimed.
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

-- The 0006 signature stays for workers of the previous release during an upgrade.
CREATE OR REPLACE FUNCTION tasker.read_skipping(p_queue text, p_vt integer, p_qty integer, p_skip text[])
RETURNS TABLE (msg_id bigint, read_ct integer, enqueued_at timestamptz, vt timestamptz,
               message jsonb, headers jsonb)
LANGUAGE sql AS $$
    SELECT * FROM tasker.read_skipping(p_queue, p_vt, p_qty, p_skip, '{}'::bigint[]);
$$;

-- claim_steps of 0006 plus p_skip_msgs.
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

CREATE OR REPLACE FUNCTION tasker.claim_steps(p_queue text, p_vt integer, p_qty integer,
                                              p_worker_id text, p_skip_handlers text[])
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
LANGUAGE sql ROWS 100 AS $$
    SELECT * FROM tasker.claim_steps(p_queue, p_vt, p_qty, p_worker_id, p_skip_handlers, '{}'::bigint[]);
$$;
