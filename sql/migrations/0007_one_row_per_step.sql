-- tasker-worker 0007: one durable row per step.
--
-- A step's durable work is now its claim (pgmq's UPDATE of vt/read_ct), one fenced DELETE of
-- its message and one outcome row, where it used to be the claim, a DELETE, an archive INSERT,
-- the outcome row with three indexes and three event rows. What those rows carried is kept:
--
-- * The archive is opt-in ([queues] archive, per namespace too). The outcome row keeps what an
--   operator used it for: ids, handler, attempts, enqueued/claimed/started/finished times,
--   worker, source, status, result and error (claimed_at is new here).
-- * Step events are derived from outcome rows: StepAssigned (claimed_at), StepAssignmentAccepted
--   (started_at) and StepCompleted|Failed|DeadLettered (finished_at) are read through the view
--   tasker.event_log. tasker.events keeps what has no outcome row (retries, releases,
--   rejections, handler timeouts) and worker lifecycle. A put-back that says when its claim
--   began (data.claimed_at) yields the StepAssigned of that attempt. [events] step_events =
--   "stored" keeps every step event as a row, as before; such outcome rows say so
--   (events_stored) and are not derived a second time.
-- * step_results keeps its primary key (the dedup probe and exactly-once) and a BRIN index on
--   finished_at for retention and time ranges; the btree indexes on task_uuid and finished_at
--   cost the hot path about 10 us of server CPU per step and no documented query used them
--   (docs/operations.md shows how to add the task_uuid one back for lookups by task).
--
-- The worker itself sends direct per-queue statements (tasker_worker/db/queries.py); the
-- functions below are the same operations for SQL callers. Those store step events when the
-- session says so (SET tasker.step_events = 'stored'), or when p_store_events is true.

ALTER TABLE tasker.step_results ADD COLUMN IF NOT EXISTS claimed_at timestamptz;
-- Rows written before this migration had their events stored by the trigger dropped below.
ALTER TABLE tasker.step_results ADD COLUMN IF NOT EXISTS events_stored boolean NOT NULL DEFAULT true;
ALTER TABLE tasker.step_results ALTER COLUMN events_stored SET DEFAULT false;

DROP TRIGGER IF EXISTS tasker_log_step_outcomes ON tasker.step_results;
DROP FUNCTION IF EXISTS tasker.log_step_outcomes();

DROP INDEX IF EXISTS tasker.step_results_task_idx;
DROP INDEX IF EXISTS tasker.step_results_finished_idx;
CREATE INDEX IF NOT EXISTS step_results_finished_brin ON tasker.step_results USING brin (finished_at);

-- Whether SQL callers of this session store step events as rows ([events] step_events).
CREATE OR REPLACE FUNCTION tasker.step_events_stored()
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('tasker.step_events', true), '') = 'stored';
$$;

-- The step events an outcome row stands for: the one derivation, used by the view and by the
-- statements that store them. p_assigned = false leaves StepAssigned out (stored at the claim).
-- (Scalar arguments: a whole-row argument inside the view's UNION ALL trips PostgreSQL 18's
-- planner, "variable not found in subplan target list".)
CREATE OR REPLACE FUNCTION tasker.outcome_events(
    p_attempts integer, p_status text, p_source text, p_error jsonb,
    p_claimed_at timestamptz, p_started_at timestamptz, p_finished_at timestamptz,
    p_assigned boolean DEFAULT true)
RETURNS TABLE (event_type text, data jsonb, occurred_at timestamptz)
LANGUAGE sql IMMUTABLE AS $$
    SELECT 'StepAssigned', jsonb_build_object('read_ct', p_attempts), p_claimed_at
     WHERE p_assigned AND p_claimed_at IS NOT NULL
    UNION ALL
    SELECT 'StepAssignmentAccepted', jsonb_build_object('attempt', p_attempts), p_started_at
     WHERE p_started_at IS NOT NULL
    UNION ALL
    SELECT CASE p_status WHEN 'succeeded' THEN 'StepCompleted'
                         WHEN 'dead_lettered' THEN 'StepDeadLettered'
                         ELSE 'StepFailed' END,
           jsonb_strip_nulls(jsonb_build_object('attempts', p_attempts, 'final', true,
                                                'source', p_source, 'reason', p_error ->> 'reason')),
           p_finished_at;
$$;

-- Every event, stored or derived, in the shape of tasker.events (event_id is NULL for derived
-- ones; order by occurred_at). Queries by step_uuid, worker_id or time reach each part by its
-- own index.
CREATE OR REPLACE VIEW tasker.event_log AS
SELECT e.event_id, e.event_type, e.worker_id, e.step_uuid, e.queue_name, e.msg_id, e.data,
       e.occurred_at, false AS derived
  FROM tasker.events AS e
UNION ALL
SELECT NULL::bigint, 'StepAssigned', e.worker_id, e.step_uuid, e.queue_name, e.msg_id,
       jsonb_build_object('read_ct', (e.data ->> 'attempt')::integer),
       (e.data ->> 'claimed_at')::timestamptz, true
  FROM tasker.events AS e
 WHERE e.step_uuid IS NOT NULL AND e.data ? 'claimed_at'
UNION ALL
SELECT NULL::bigint, o.event_type, r.worker_id, r.step_uuid, r.queue_name, r.msg_id, o.data,
       o.occurred_at, true
  FROM tasker.step_results AS r
 CROSS JOIN LATERAL tasker.outcome_events(r.attempts, r.status, r.source, r.error, r.claimed_at,
                                          r.started_at, r.finished_at) AS o
 WHERE NOT r.events_stored;

-- Claims from SQL: StepAssigned is a row only in stored mode (else the outcome row implies it).
CREATE OR REPLACE FUNCTION tasker.claim_steps(p_queue text, p_vt integer, p_qty integer, p_worker_id text)
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
    RETURN QUERY
    WITH claimed AS (
        SELECT * FROM tasker.claim_steps(p_queue, p_vt, p_qty)
    ), logged AS (
        INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
        SELECT 'StepAssigned', p_worker_id,
               CASE WHEN jsonb_typeof(c.message) = 'object'
                    THEN tasker.try_uuid(c.message ->> 'step_uuid') END,
               p_queue, c.msg_id, jsonb_build_object('read_ct', c.read_ct), c.claimed_at
          FROM claimed AS c
         WHERE p_worker_id IS NOT NULL AND tasker.step_events_stored()
    )
    SELECT * FROM claimed;
END;
$$;

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
         WHERE p_worker_id IS NOT NULL AND tasker.step_events_stored()
    )
    SELECT * FROM claimed;
END;
$$;

-- Settle from SQL: a fenced DELETE of each message and its outcome row (p_archive: the message
-- is also kept in pgmq's archive). Same input and semantics as 0005's version, which this
-- replaces: at most one outcome per step_uuid, a null status meaning "settle only".
DROP FUNCTION IF EXISTS tasker.record_outcomes(text, text, jsonb);

CREATE OR REPLACE FUNCTION tasker.record_outcomes(p_queue text, p_worker_id text, p_outcomes jsonb,
                                                  p_archive boolean DEFAULT false,
                                                  p_store_events boolean DEFAULT NULL)
RETURNS TABLE (msg_id bigint, acked boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_stored boolean := coalesce(p_store_events, tasker.step_events_stored());
BEGIN
    IF jsonb_typeof(p_outcomes) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'tasker.record_outcomes: p_outcomes must be a JSON array'
              USING ERRCODE = '22023';
    END IF;
    RETURN QUERY EXECUTE format($sql$
        WITH input AS (
            SELECT * FROM jsonb_to_recordset($1)
                AS i(msg_id bigint, read_ct integer, status text, result jsonb, error jsonb,
                     started_at timestamptz, finished_at timestamptz, source text,
                     step_uuid uuid, task_uuid uuid, correlation_id uuid, handler text)
        ), settled AS (
            DELETE FROM pgmq.%1$I AS q
             USING input AS i
             WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct
            RETURNING q.msg_id, q.vt, q.read_ct, q.enqueued_at, q.last_read_at, q.message,
                      q.headers, i.status, i.result, i.error, i.started_at, i.finished_at,
                      i.source,
                      coalesce(i.step_uuid, tasker.try_uuid(q.message ->> 'step_uuid')) AS step_uuid,
                      coalesce(i.task_uuid, tasker.try_uuid(q.message ->> 'task_uuid')) AS task_uuid,
                      coalesce(i.correlation_id,
                               tasker.try_uuid(q.message ->> 'correlation_id')) AS correlation_id,
                      coalesce(i.handler, q.message ->> 'handler') AS handler
        ), kept AS (
            INSERT INTO pgmq.%2$I (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
            SELECT a.msg_id, a.vt, a.read_ct, a.enqueued_at, a.last_read_at, a.message, a.headers
              FROM settled AS a
             WHERE $4
        ), recorded AS (
            INSERT INTO tasker.step_results (
                step_uuid, task_uuid, correlation_id, namespace, queue_name, msg_id, handler,
                status, result, error, attempts, worker_id, enqueued_at, claimed_at, started_at,
                finished_at, source, events_stored)
            SELECT a.step_uuid, a.task_uuid, a.correlation_id,
                   %3$L, %4$L, a.msg_id, a.handler, a.status, a.result, a.error,
                   a.read_ct, $2, a.enqueued_at, a.last_read_at, a.started_at,
                   coalesce(a.finished_at, clock_timestamp()), a.source, $3
              FROM settled AS a
             WHERE a.status IS NOT NULL
               AND jsonb_typeof(a.message) = 'object'
               AND a.step_uuid IS NOT NULL
            ON CONFLICT (step_uuid) DO NOTHING
            RETURNING step_uuid, worker_id, queue_name, msg_id, attempts, status, source, error,
                      started_at, finished_at
        ), logged AS (
            INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
            SELECT o.event_type, r.worker_id, r.step_uuid, r.queue_name, r.msg_id, o.data, o.occurred_at
              FROM recorded AS r
             CROSS JOIN LATERAL tasker.outcome_events(r.attempts, r.status, r.source, r.error, NULL,
                                                      r.started_at, r.finished_at, false) AS o
             WHERE $3
        )
        SELECT i.msg_id, (a.msg_id IS NOT NULL)
          FROM input AS i
          LEFT JOIN settled AS a ON a.msg_id = i.msg_id
        $sql$,
        pgmq.format_table_name(p_queue, 'q'), pgmq.format_table_name(p_queue, 'a'),
        tasker.queue_namespace(p_queue), p_queue)
    USING p_outcomes, p_worker_id, v_stored, p_archive;
END;
$$;

-- Dead-letter from SQL and from the worker (a rare path): as 0002's version, plus claimed_at
-- on the outcome row and the step events stored when asked.
DROP FUNCTION IF EXISTS tasker.dead_letter_steps(
    text, text, bigint[], integer[], text[], jsonb[], timestamptz[], timestamptz[], text[]);

CREATE OR REPLACE FUNCTION tasker.dead_letter_steps(
    p_queue        text,
    p_worker_id    text,
    p_msg_ids      bigint[],
    p_read_cts     integer[],
    p_statuses     text[],
    p_errors       jsonb[],
    p_started_at   timestamptz[],
    p_finished_at  timestamptz[],
    p_sources      text[],
    p_store_events boolean DEFAULT NULL
)
RETURNS TABLE (msg_id bigint, moved boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_dlq    text := p_queue || '_dlq';
    v_stored boolean := coalesce(p_store_events, tasker.step_events_stored());
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
            RETURNING q.msg_id, q.read_ct, q.enqueued_at, q.last_read_at, q.message, q.headers,
                      i.status, i.error, i.started_at, i.finished_at, i.source
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
                status, result, error, attempts, worker_id, enqueued_at, claimed_at, started_at,
                finished_at, source, events_stored)
            SELECT tasker.try_uuid(t.message ->> 'step_uuid'),
                   tasker.try_uuid(t.message ->> 'task_uuid'),
                   tasker.try_uuid(t.message ->> 'correlation_id'),
                   %3$L, %4$L, t.msg_id, t.message ->> 'handler', t.status, NULL, t.error,
                   t.read_ct, $8, t.enqueued_at, t.last_read_at, t.started_at,
                   coalesce(t.finished_at, clock_timestamp()), t.source, $9
              FROM taken AS t
             WHERE t.status IS NOT NULL
               AND jsonb_typeof(t.message) = 'object'
               AND tasker.try_uuid(t.message ->> 'step_uuid') IS NOT NULL
            ON CONFLICT (step_uuid) DO NOTHING
            RETURNING step_uuid, worker_id, queue_name, msg_id, attempts, status, source, error,
                      started_at, finished_at
        ), logged AS (
            INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
            SELECT o.event_type, r.worker_id, r.step_uuid, r.queue_name, r.msg_id, o.data, o.occurred_at
              FROM recorded AS r
             CROSS JOIN LATERAL tasker.outcome_events(r.attempts, r.status, r.source, r.error, NULL,
                                                      r.started_at, r.finished_at, false) AS o
             WHERE $9
        )
        SELECT i.msg_id, (t.msg_id IS NOT NULL)
          FROM input AS i LEFT JOIN taken AS t ON t.msg_id = i.msg_id
        $sql$,
        pgmq.format_table_name(p_queue, 'q'), pgmq.format_table_name(v_dlq, 'q'),
        tasker.queue_namespace(p_queue), p_queue)
    USING p_msg_ids, p_read_cts, p_statuses, p_errors, p_started_at, p_finished_at, p_sources,
          p_worker_id, v_stored;
END;
$$;

-- Events of messages put back without an outcome (a retry after a failed attempt, a timeout, a
-- rejection, a release at shutdown): these have no outcome row, so they are always stored.
CREATE OR REPLACE FUNCTION tasker.log_step_events(
    p_queue     text,
    p_worker_id text,
    p_types     text[],
    p_msg_ids   bigint[],
    p_steps     text[],
    p_data      jsonb[]
)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data)
    SELECT i.event_type, p_worker_id, tasker.try_uuid(i.step), p_queue, i.msg_id,
           coalesce(i.data, '{}'::jsonb)
      FROM unnest(p_types, p_msg_ids, p_steps, p_data) AS i(event_type, msg_id, step, data);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

-- Replaced by tasker.step_events_stored() (step events are no longer on unless switched off).
DROP FUNCTION IF EXISTS tasker.step_events_enabled();
