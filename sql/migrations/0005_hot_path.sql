-- tasker-worker 0005: the hot path. Outcomes travel as one JSON array instead of ten parallel
-- arrays; try_uuid without a regex; claims commit asynchronously.
--
-- Adapting ten typed arrays cost the worker about 30 us of Python per outcome (psycopg dumps
-- array elements one by one); one json.dumps of the whole batch costs about 6 us. The
-- semantics are those of 0002's tasker.record_outcomes, which this replaces: fenced on
-- read_ct, archive + outcome row in one statement, at most one outcome per step_uuid, a
-- null status meaning "archive only".
--
-- p_outcomes: [{"msg_id": 1, "read_ct": 1, "status": "succeeded", "result": ..., "error": ...,
--               "started_at": "...", "finished_at": "...", "source": "event",
--               "step_uuid": "...", "task_uuid": "...", "correlation_id": "...", "handler": "..."}, ...]
-- The ids and handler are those the worker parsed from the message; when absent they are read
-- from the message here (what 0002 always did, at about 4 us of regex per id and row).

-- try_uuid without a regex where the server can test input validity itself (PostgreSQL 16+):
-- 0.8 instead of 3.9 us per call, and it runs once per claimed message.
DO $do$
BEGIN
    IF current_setting('server_version_num')::integer >= 160000 THEN
        EXECUTE $fn$
            CREATE OR REPLACE FUNCTION tasker.try_uuid(p_text text)
            RETURNS uuid LANGUAGE sql STABLE AS $body$
                SELECT CASE WHEN pg_input_is_valid(p_text, 'uuid') THEN p_text::uuid END;
            $body$
        $fn$;
    END IF;
END;
$do$;

DROP FUNCTION IF EXISTS tasker.record_outcomes(
    text, text, bigint[], integer[], text[], jsonb[], jsonb[], timestamptz[], timestamptz[], text[]);

CREATE OR REPLACE FUNCTION tasker.record_outcomes(p_queue text, p_worker_id text, p_outcomes jsonb)
RETURNS TABLE (msg_id bigint, acked boolean)
LANGUAGE plpgsql AS $$
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
        ), archived AS (
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
              FROM archived AS a
        ), recorded AS (
            INSERT INTO tasker.step_results (
                step_uuid, task_uuid, correlation_id, namespace, queue_name, msg_id, handler,
                status, result, error, attempts, worker_id, enqueued_at, started_at,
                finished_at, source)
            SELECT a.step_uuid, a.task_uuid, a.correlation_id,
                   %3$L, %4$L, a.msg_id, a.handler, a.status, a.result, a.error,
                   a.read_ct, $2, a.enqueued_at, a.started_at,
                   coalesce(a.finished_at, clock_timestamp()), a.source
              FROM archived AS a
             WHERE a.status IS NOT NULL
               AND jsonb_typeof(a.message) = 'object'
               AND a.step_uuid IS NOT NULL
            ON CONFLICT (step_uuid) DO NOTHING
        )
        SELECT i.msg_id, (a.msg_id IS NOT NULL)
          FROM input AS i
          LEFT JOIN archived AS a ON a.msg_id = i.msg_id
        $sql$,
        pgmq.format_table_name(p_queue, 'q'), pgmq.format_table_name(p_queue, 'a'),
        tasker.queue_namespace(p_queue), p_queue)
    USING p_outcomes, p_worker_id;
END;
$$;

-- A claim commits without waiting for its WAL flush (synchronous_commit = off for the claim's
-- own transaction only): about 0.3 ms less on every pickup. Losing a claim in a server crash
-- is harmless: the message is as it was before the claim (visible once its old vt lapses),
-- and outcomes stay exactly once through step_results' primary key, whoever runs the step.
-- Called from a caller's transaction, the setting holds for that transaction.
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
    SELECT set_config('synchronous_commit', 'off', true);
    SELECT r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message, r.headers,
           d.step_uuid IS NOT NULL,
           clock_timestamp()
      FROM pgmq.read(p_queue, p_vt, p_qty) AS r
      LEFT JOIN LATERAL (
          SELECT s.step_uuid FROM tasker.step_results AS s
           WHERE s.step_uuid = tasker.try_uuid(r.message ->> 'step_uuid')
           LIMIT 1) AS d ON true;
$$;

-- Events arrive in time order, so a BRIN index finds the compaction cutoff as well as a btree
-- did, at almost no cost per insert (three step events per step made the btree a hot spot).
DROP INDEX IF EXISTS tasker.events_occurred_idx;
CREATE INDEX IF NOT EXISTS events_occurred_brin ON tasker.events USING brin (occurred_at);
