-- tasker-worker 0002: step outcomes and the fenced claim/ack/retry/dead-letter operations.
--
-- Every operation on a claimed message is *fenced*: it applies only while the message's
-- read_ct is still the one the worker claimed. A worker whose claim expired and was taken
-- over elsewhere (read_ct moved on) can no longer archive, retry or dead-letter it.

CREATE TABLE IF NOT EXISTS tasker.step_results (
    step_uuid      uuid PRIMARY KEY,
    task_uuid      uuid,
    correlation_id uuid,
    namespace      text NOT NULL,
    queue_name     text NOT NULL,
    msg_id         bigint NOT NULL,
    handler        text,
    status         text NOT NULL CHECK (status IN ('succeeded', 'failed', 'dead_lettered')),
    result         jsonb,
    error          jsonb,
    attempts       integer NOT NULL,
    worker_id      text NOT NULL,
    enqueued_at    timestamptz,
    started_at     timestamptz,
    finished_at    timestamptz NOT NULL,
    source         text CHECK (source IN ('event', 'poll')),
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS step_results_task_idx ON tasker.step_results (task_uuid);
CREATE INDEX IF NOT EXISTS step_results_finished_idx ON tasker.step_results (finished_at);

-- Claim up to p_qty ready messages with pgmq.read (FOR UPDATE SKIP LOCKED) and say for each
-- whether its step already has an outcome (dedup without running it again). The LATERAL ...
-- LIMIT 1 keeps that check an index probe per message: written as EXISTS, the planner may
-- hash all of step_results instead.
CREATE OR REPLACE FUNCTION tasker.claim_steps(p_queue text, p_vt integer, p_qty integer)
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
    SELECT r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message, r.headers,
           d.step_uuid IS NOT NULL,
           clock_timestamp()
      FROM pgmq.read(p_queue, p_vt, p_qty) AS r
      LEFT JOIN LATERAL (
          SELECT s.step_uuid FROM tasker.step_results AS s
           WHERE s.step_uuid = tasker.try_uuid(r.message ->> 'step_uuid')
           LIMIT 1) AS d ON true;
$$;

-- Record outcomes and archive their messages in one statement. A row whose read_ct no longer
-- matches is neither archived nor recorded (acked = false: a stale ack). p_statuses NULL means
-- "archive only" (the outcome was recorded before). Outcomes are inserted at most once per
-- step_uuid.
CREATE OR REPLACE FUNCTION tasker.record_outcomes(
    p_queue       text,
    p_worker_id   text,
    p_msg_ids     bigint[],
    p_read_cts    integer[],
    p_statuses    text[],
    p_results     jsonb[],
    p_errors      jsonb[],
    p_started_at  timestamptz[],
    p_finished_at timestamptz[],
    p_sources     text[]
)
RETURNS TABLE (msg_id bigint, acked boolean)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format($sql$
        WITH input AS (
            SELECT * FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::jsonb[],
                                 $5::jsonb[], $6::timestamptz[], $7::timestamptz[], $8::text[])
                AS i(msg_id, read_ct, status, result, error, started_at, finished_at, source)
        ), archived AS (
            DELETE FROM pgmq.%1$I AS q
             USING input AS i
             WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct
            RETURNING q.msg_id, q.vt, q.read_ct, q.enqueued_at, q.last_read_at, q.message,
                      q.headers, i.status, i.result, i.error, i.started_at, i.finished_at,
                      i.source
        ), kept AS (
            INSERT INTO pgmq.%2$I (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
            SELECT a.msg_id, a.vt, a.read_ct, a.enqueued_at, a.last_read_at, a.message, a.headers
              FROM archived AS a
        ), recorded AS (
            INSERT INTO tasker.step_results (
                step_uuid, task_uuid, correlation_id, namespace, queue_name, msg_id, handler,
                status, result, error, attempts, worker_id, enqueued_at, started_at,
                finished_at, source)
            SELECT tasker.try_uuid(a.message ->> 'step_uuid'),
                   tasker.try_uuid(a.message ->> 'task_uuid'),
                   tasker.try_uuid(a.message ->> 'correlation_id'),
                   %3$L, %4$L, a.msg_id, a.message ->> 'handler', a.status, a.result, a.error,
                   a.read_ct, $9, a.enqueued_at, a.started_at,
                   coalesce(a.finished_at, clock_timestamp()), a.source
              FROM archived AS a
             WHERE a.status IS NOT NULL
               AND jsonb_typeof(a.message) = 'object'
               AND tasker.try_uuid(a.message ->> 'step_uuid') IS NOT NULL
            ON CONFLICT (step_uuid) DO NOTHING
        )
        SELECT i.msg_id, (a.msg_id IS NOT NULL)
          FROM input AS i
          LEFT JOIN archived AS a ON a.msg_id = i.msg_id
        $sql$,
        pgmq.format_table_name(p_queue, 'q'), pgmq.format_table_name(p_queue, 'a'),
        tasker.queue_namespace(p_queue), p_queue)
    USING p_msg_ids, p_read_cts, p_statuses, p_results, p_errors, p_started_at,
          p_finished_at, p_sources, p_worker_id;
END;
$$;

-- Put claimed messages back with a delay (retry backoff). p_count_attempt = false also gives
-- the attempt back (read_ct - 1): used for releases at shutdown, rejections and dependency
-- outages. p_headers are merged into the message's headers (e.g. tasker_last_error).
CREATE OR REPLACE FUNCTION tasker.retry_steps(
    p_queue         text,
    p_msg_ids       bigint[],
    p_read_cts      integer[],
    p_delays_ms     integer[],
    p_headers       jsonb[],
    p_count_attempt boolean DEFAULT true
)
RETURNS TABLE (msg_id bigint, applied boolean)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format($sql$
        WITH input AS (
            SELECT * FROM unnest($1::bigint[], $2::integer[], $3::integer[], $4::jsonb[])
                AS i(msg_id, read_ct, delay_ms, patch)
        ), moved AS (
            UPDATE pgmq.%1$I AS q
               SET vt = clock_timestamp() + make_interval(secs => i.delay_ms / 1000.0),
                   read_ct = CASE WHEN $5 THEN q.read_ct ELSE greatest(q.read_ct - 1, 0) END,
                   headers = CASE WHEN i.patch IS NULL THEN q.headers
                                  ELSE coalesce(q.headers, '{}'::jsonb) || i.patch END
              FROM input AS i
             WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct
            RETURNING q.msg_id
        )
        SELECT i.msg_id, (m.msg_id IS NOT NULL)
          FROM input AS i LEFT JOIN moved AS m ON m.msg_id = i.msg_id
        $sql$, pgmq.format_table_name(p_queue, 'q'))
    USING p_msg_ids, p_read_cts, p_delays_ms, p_headers, p_count_attempt;
END;
$$;

-- Extend the visibility timeout of messages still being worked on here.
CREATE OR REPLACE FUNCTION tasker.extend_vt(
    p_queue    text,
    p_msg_ids  bigint[],
    p_read_cts integer[],
    p_vt_ms    integer
)
RETURNS TABLE (msg_id bigint, vt timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format($sql$
        UPDATE pgmq.%1$I AS q
           SET vt = clock_timestamp() + make_interval(secs => $3 / 1000.0)
          FROM unnest($1::bigint[], $2::integer[]) AS i(msg_id, read_ct)
         WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct
        RETURNING q.msg_id, q.vt
        $sql$, pgmq.format_table_name(p_queue, 'q'))
    USING p_msg_ids, p_read_cts, p_vt_ms;
END;
$$;

-- Move claimed messages to <queue>_dlq with the reason in their headers (key tasker_dlq) and
-- record their outcome, in one statement.
CREATE OR REPLACE FUNCTION tasker.dead_letter_steps(
    p_queue       text,
    p_worker_id   text,
    p_msg_ids     bigint[],
    p_read_cts    integer[],
    p_statuses    text[],
    p_errors      jsonb[],
    p_started_at  timestamptz[],
    p_finished_at timestamptz[],
    p_sources     text[]
)
RETURNS TABLE (msg_id bigint, moved boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_dlq text := p_queue || '_dlq';
BEGIN
    IF tasker.queue_table(v_dlq) IS NULL THEN
        PERFORM pgmq.create(v_dlq);
        PERFORM tasker.attach_notify_trigger(tasker.queue_table(v_dlq));
    END IF;
    RETURN QUERY EXECUTE format($sql$
        WITH input AS (
            SELECT * FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::jsonb[],
                                 $5::timestamptz[], $6::timestamptz[], $7::text[])
                AS i(msg_id, read_ct, status, error, started_at, finished_at, source)
        ), taken AS (
            DELETE FROM pgmq.%1$I AS q
             USING input AS i
             WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct
            RETURNING q.msg_id, q.read_ct, q.enqueued_at, q.message, q.headers, i.status,
                      i.error, i.started_at, i.finished_at, i.source
        ), dead AS (
            INSERT INTO pgmq.%2$I (vt, message, headers)
            SELECT clock_timestamp(), t.message,
                   coalesce(t.headers, '{}'::jsonb) || jsonb_build_object('tasker_dlq',
                       jsonb_build_object(
                           'reason', t.error ->> 'reason',
                           'error', t.error,
                           'status', t.status,
                           'source_queue', %4$L,
                           'source_msg_id', t.msg_id,
                           'attempts', t.read_ct,
                           'enqueued_at', t.enqueued_at,
                           'worker_id', $8::text,
                           'dead_lettered_at', clock_timestamp()))
              FROM taken AS t
             ORDER BY t.msg_id
        ), recorded AS (
            INSERT INTO tasker.step_results (
                step_uuid, task_uuid, correlation_id, namespace, queue_name, msg_id, handler,
                status, result, error, attempts, worker_id, enqueued_at, started_at,
                finished_at, source)
            SELECT tasker.try_uuid(t.message ->> 'step_uuid'),
                   tasker.try_uuid(t.message ->> 'task_uuid'),
                   tasker.try_uuid(t.message ->> 'correlation_id'),
                   %3$L, %4$L, t.msg_id, t.message ->> 'handler', t.status, NULL, t.error,
                   t.read_ct, $8, t.enqueued_at, t.started_at,
                   coalesce(t.finished_at, clock_timestamp()), t.source
              FROM taken AS t
             WHERE t.status IS NOT NULL
               AND jsonb_typeof(t.message) = 'object'
               AND tasker.try_uuid(t.message ->> 'step_uuid') IS NOT NULL
            ON CONFLICT (step_uuid) DO NOTHING
        )
        SELECT i.msg_id, (t.msg_id IS NOT NULL)
          FROM input AS i LEFT JOIN taken AS t ON t.msg_id = i.msg_id
        $sql$,
        pgmq.format_table_name(p_queue, 'q'), pgmq.format_table_name(v_dlq, 'q'),
        tasker.queue_namespace(p_queue), p_queue)
    USING p_msg_ids, p_read_cts, p_statuses, p_errors, p_started_at, p_finished_at, p_sources,
          p_worker_id;
END;
$$;

-- Send dead-lettered messages back to their queue (all of them, or the given DLQ msg_ids).
-- The DLQ copy is archived (kept as the record of the failure) and the failed outcome is
-- removed so that the step runs again. Returns the old and new msg_ids.
CREATE OR REPLACE FUNCTION tasker.requeue_dead_letters(p_queue text, p_msg_ids bigint[] DEFAULT NULL)
RETURNS TABLE (dlq_msg_id bigint, new_msg_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_dlq  text := p_queue || '_dlq';
    v_row  record;
    v_new  bigint;
BEGIN
    IF tasker.queue_table(p_queue) IS NULL OR tasker.queue_table(v_dlq) IS NULL THEN
        RAISE EXCEPTION 'queue % or its dead-letter queue does not exist', p_queue
            USING ERRCODE = '42P01';
    END IF;
    FOR v_row IN EXECUTE format(
        'DELETE FROM pgmq.%1$I WHERE $1 IS NULL OR msg_id = ANY($1) '
        'RETURNING msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers',
        pgmq.format_table_name(v_dlq, 'q')) USING p_msg_ids
    LOOP
        EXECUTE format(
            'INSERT INTO pgmq.%1$I (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers) '
            'VALUES ($1, $2, $3, $4, $5, $6, $7)', pgmq.format_table_name(v_dlq, 'a'))
            USING v_row.msg_id, v_row.vt, v_row.read_ct, v_row.enqueued_at, v_row.last_read_at,
                  v_row.message, v_row.headers;
        IF jsonb_typeof(v_row.message) = 'object' THEN
            DELETE FROM tasker.step_results
             WHERE step_uuid = tasker.try_uuid(v_row.message ->> 'step_uuid')
               AND status IN ('failed', 'dead_lettered');
        END IF;
        SELECT s.id INTO v_new
          FROM pgmq.send(p_queue, v_row.message,
                         (coalesce(v_row.headers, '{}'::jsonb) - 'tasker_dlq' - 'tasker_last_error' - 'tasker_rejections')
                         || jsonb_build_object('tasker_requeued_from', v_row.msg_id)) AS s(id);
        dlq_msg_id := v_row.msg_id;
        new_msg_id := v_new;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Look at messages without claiming them (read_ct and vt stay as they are).
CREATE OR REPLACE FUNCTION tasker.peek_messages(p_queue text, p_limit integer DEFAULT 100)
RETURNS SETOF pgmq.message_record
LANGUAGE plpgsql AS $$
BEGIN
    IF tasker.queue_table(p_queue) IS NULL THEN
        RAISE EXCEPTION 'queue % does not exist', p_queue USING ERRCODE = '42P01';
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers '
        'FROM pgmq.%I ORDER BY msg_id LIMIT $1', pgmq.format_table_name(p_queue, 'q'))
    USING least(greatest(p_limit, 0), 10000);
END;
$$;
