-- tasker-worker 0013: what the dashboard reads and does, bounded and on the record.
--
-- * tasker.queue_glance: every queue's depth, visible count and oldest message, each count
--   stopping at p_cap rows. pgmq.metrics counts the whole queue table on every call; a page that
--   refreshes itself every few seconds for every operator cannot afford that on a queue holding
--   millions, so the glance counts at most p_cap + 1 rows (the page says "10000+") and finds the
--   oldest message through the msg_id index (the lowest msg_id was sent first).
-- * tasker.requeue_dead_letters takes an actor and a limit: a requeue is recorded, per message,
--   as a DeadLetterRequeued event (step_uuid, queue, new msg_id, the DLQ msg_id, who asked and
--   the reason it had been dead-lettered for) in the same transaction, and a requeue of "all"
--   can be taken in bounded slices (oldest first). Without p_limit it moves every dead letter,
--   as before.

CREATE OR REPLACE FUNCTION tasker.queue_glance(p_cap integer DEFAULT 10000)
RETURNS TABLE (queue_name text, depth bigint, visible bigint, capped boolean, oldest_enqueued_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_cap   integer := least(greatest(coalesce(p_cap, 10000), 1), 1000000);
    v_queue text;
    v_total bigint;
    v_ready bigint;
BEGIN
    FOR v_queue IN SELECT m.queue_name FROM pgmq.meta AS m ORDER BY m.queue_name LIMIT 1000 LOOP
        EXECUTE format(
            'SELECT (SELECT count(*) FROM (SELECT 1 FROM pgmq.%1$I LIMIT $1 + 1) AS a), '
            '       (SELECT count(*) FROM (SELECT 1 FROM pgmq.%1$I WHERE vt <= clock_timestamp() LIMIT $1 + 1) AS v), '
            '       (SELECT q.enqueued_at FROM pgmq.%1$I AS q ORDER BY q.msg_id LIMIT 1)',
            pgmq.format_table_name(v_queue, 'q'))
        INTO v_total, v_ready, oldest_enqueued_at USING v_cap;
        queue_name := v_queue;
        capped := v_total > v_cap;
        depth := least(v_total, v_cap);
        visible := least(v_ready, v_cap);
        RETURN NEXT;
    END LOOP;
END;
$$;

DROP FUNCTION IF EXISTS tasker.requeue_dead_letters(text, bigint[]);

-- A requeued dead letter starts afresh: no claim of its former life is taken for a lapse, and
-- its failed outcome row goes, so that the outcome of its next run is recorded.
CREATE FUNCTION tasker.requeue_dead_letters(
    p_queue   text,
    p_msg_ids bigint[] DEFAULT NULL,
    p_actor   text DEFAULT NULL,
    p_limit   integer DEFAULT NULL
)
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
    IF p_limit IS NOT NULL AND p_limit < 1 THEN
        RAISE EXCEPTION 'limit must be at least 1, got %', p_limit USING ERRCODE = '22023';
    END IF;
    FOR v_row IN EXECUTE format(
        'DELETE FROM pgmq.%1$I WHERE msg_id IN ('
        '    SELECT msg_id FROM pgmq.%1$I WHERE $1 IS NULL OR msg_id = ANY($1) ORDER BY msg_id LIMIT $2) '
        'RETURNING msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers',
        pgmq.format_table_name(v_dlq, 'q')) USING p_msg_ids, p_limit
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
                         (coalesce(v_row.headers, '{}'::jsonb) - 'tasker_dlq' - 'tasker_last_error' - 'tasker_rejections' - 'tasker_claim')
                         || jsonb_build_object('tasker_requeued_from', v_row.msg_id)) AS s(id);
        INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data)
        VALUES ('DeadLetterRequeued', NULL,
                CASE WHEN jsonb_typeof(v_row.message) = 'object'
                     THEN tasker.try_uuid(v_row.message ->> 'step_uuid') END,
                p_queue, v_new,
                jsonb_build_object('dlq_msg_id', v_row.msg_id, 'by', coalesce(p_actor, 'sql'),
                                   'role', session_user::text,
                                   'reason', v_row.headers -> 'tasker_dlq' ->> 'reason'));
        dlq_msg_id := v_row.msg_id;
        new_msg_id := v_new;
        RETURN NEXT;
    END LOOP;
END;
$$;

REVOKE EXECUTE ON FUNCTION tasker.queue_glance(integer),
                           tasker.requeue_dead_letters(text, bigint[], text, integer)
    FROM PUBLIC;

DO $$
BEGIN
    IF tasker.role_exists('tasker_worker') THEN
        GRANT EXECUTE ON FUNCTION tasker.queue_glance(integer) TO tasker_worker;
    END IF;
    IF tasker.role_exists('tasker_operator') THEN
        GRANT EXECUTE ON FUNCTION tasker.queue_glance(integer),
                                  tasker.requeue_dead_letters(text, bigint[], text, integer)
            TO tasker_operator;
    END IF;
END;
$$;

-- Creating a namespace's queue (every worker start does, for its namespaces) and re-checking
-- every queue's trigger and grants (every start on an up-to-date database does) GRANT on the
-- queue tables; two of them at once on one table failed with "tuple concurrently updated" (an
-- API process and a worker started together). Both now hold the migration lock (a transaction
-- advisory lock, the one migrations take) while they do it.
CREATE OR REPLACE FUNCTION tasker.create_namespace_queue(p_namespace text)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_queue text := 'worker_' || tasker.validate_namespace(p_namespace) || '_queue';
BEGIN
    PERFORM pg_advisory_xact_lock(127961897067890);
    PERFORM pgmq.create(v_queue);
    PERFORM pgmq.create(v_queue || '_dlq');
    PERFORM tasker.attach_notify_trigger(tasker.queue_table(v_queue));
    PERFORM tasker.attach_notify_trigger(tasker.queue_table(v_queue || '_dlq'));
    RETURN v_queue;
END;
$$;

CREATE OR REPLACE FUNCTION tasker.ensure_notify_triggers()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_attached integer := 0;
    v_table regclass;
BEGIN
    PERFORM pg_advisory_xact_lock(127961897067890);
    FOR v_table IN
        SELECT c.oid::regclass
          FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'pgmq'
           AND c.relname LIKE 'q\_%'
           AND c.relkind IN ('r', 'p')
           AND NOT c.relispartition
    LOOP
        IF tasker.attach_notify_trigger(v_table) THEN
            v_attached := v_attached + 1;
        END IF;
    END LOOP;
    RETURN v_attached;
END;
$$;
