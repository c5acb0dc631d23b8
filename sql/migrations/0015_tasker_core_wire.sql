-- tasker-worker 0015: tasker-core's wire (docs/tasker-core.md).
--
-- 1. Our step wakeups say how long their messages were delayed: `delay_seconds` (whole seconds,
--    rounded; 0 for a message visible at once) on message_ready and batch_ready. Additive: every
--    field of before stays. tasker-core's listener requires it on batch_ready and dropped ours.
--
-- 2. tasker-core's producer functions, for its producers and for scripts written against its SQL:
--      tasker.pgmq_send_with_notify(queue_name text, message jsonb, delay_seconds integer DEFAULT 0)
--          RETURNS bigint
--      tasker.pgmq_send_batch_with_notify(queue_name text, messages jsonb[], delay_seconds integer DEFAULT 0)
--          RETURNS SETOF bigint
--      tasker.pgmq_read_specific_message(queue_name text, target_msg_id bigint, vt_seconds integer DEFAULT 30)
--          RETURNS TABLE (msg_id bigint, read_ct integer, enqueued_at timestamptz, vt timestamptz, message jsonb)
--    created only where absent: a database that ran tasker-core's migrations keeps its own. tasker-core
--    calls them unqualified, so its roles need `tasker` on their search_path (docs/tasker-core.md).
--    Each send is announced once, in tasker-core's shape (message_with_payload when the message is
--    under 7,000 bytes, else message_ready with payload_omitted; batch_ready for a batch), on
--    pgmq_message_ready.<namespace> and pgmq_message_ready; the notify trigger stays quiet for that
--    statement. What tasker-core's own do differently, on purpose:
--      * the 7,000 threshold is measured in bytes (tasker-core counts characters: a message of
--        multi-byte text under 7,000 characters can exceed pg_notify's 8,000 bytes and fail the send);
--      * a payload is never cut: one that would not fit is sent without the message (tasker-core cuts
--        an oversized batch_ready into invalid JSON that no listener can read);
--      * batch_ready lists the first 100 ids (tasker-core lists all, which is what overflows), with
--        message_count, min_msg_id/max_msg_id and truncated as our trigger sends them;
--      * ready_at is when the messages become visible (tasker-core sends the time of the send even
--        for a delayed message), and a NULL delay is no delay (not a message that never shows);
--      * pgmq_read_specific_message skips a message another session holds locked (SKIP LOCKED)
--        instead of waiting for it, and stamps last_read_at as pgmq.read does.
--    The namespace and channel of a send follow tasker-core's rule (tasker.tasker_core_namespace),
--    so that its listeners (orchestration included) hear them; for worker_<ns>_queue it is <ns>,
--    as ours.

-- A producer function announces its own statement: while it inserts, this is 'on' (transaction-
-- local, reset at once) and the trigger sends nothing.
CREATE OR REPLACE FUNCTION tasker.notify_message_ready()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_queue   text := substring(TG_TABLE_NAME FROM 3);
    v_ns      text := tasker.queue_namespace(v_queue);
    v_count   bigint;
    v_min     bigint;
    v_max     bigint;
    v_ready   timestamptz;
    v_delay   integer;
    v_ids     bigint[];
    v_payload text;
    v_channel text;
BEGIN
    IF current_setting('tasker.announced_by_caller', true) = 'on' THEN
        RETURN NULL;
    END IF;
    SELECT count(*), min(msg_id), max(msg_id), min(vt)
      INTO v_count, v_min, v_max, v_ready
      FROM new_rows;
    IF v_count = 0 THEN
        RETURN NULL;
    END IF;
    v_delay := least(greatest(round(extract(epoch FROM v_ready - clock_timestamp())), 0), 2147483647)::integer;
    IF v_count = 1 THEN
        v_payload := json_build_object(
            'event_type', 'message_ready',
            'queue_name', v_queue,
            'namespace', v_ns,
            'msg_id', v_min,
            'message_count', 1,
            'ready_at', v_ready,
            'delay_seconds', v_delay)::text;
    ELSE
        SELECT array_agg(msg_id ORDER BY msg_id) INTO v_ids
          FROM (SELECT msg_id FROM new_rows ORDER BY msg_id LIMIT 100) AS first_ids;
        v_payload := json_build_object(
            'event_type', 'batch_ready',
            'queue_name', v_queue,
            'namespace', v_ns,
            'msg_ids', v_ids,
            'message_count', v_count,
            'min_msg_id', v_min,
            'max_msg_id', v_max,
            'truncated', v_count > 100,
            'ready_at', v_ready,
            'delay_seconds', v_delay)::text;
    END IF;
    v_channel := 'pgmq_message_ready.' || v_ns;
    -- Channel names longer than 63 bytes are an error in pg_notify: such queues (only
    -- possible for non-worker queues) are announced on the global channel alone.
    IF octet_length(v_channel) <= 63 THEN
        PERFORM pg_notify(v_channel, v_payload);
    END IF;
    PERFORM pg_notify('pgmq_message_ready', v_payload);
    RETURN NULL;
END;
$$;

-- tasker-core's namespace of a queue: orchestration queues -> 'orchestration', worker_<ns>_queue
-- -> <ns>, <name>_queue -> <name>, anything else -> 'default'.
CREATE OR REPLACE FUNCTION tasker.tasker_core_namespace(p_queue text)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_queue ~ '^orchestration' THEN 'orchestration'
        WHEN p_queue ~ '^worker_.+_queue$' THEN substring(p_queue FROM '^worker_(.+)_queue$')
        WHEN p_queue ~ '^[A-Za-z][A-Za-z0-9_]*_queue$' THEN left(p_queue, length(p_queue) - 6)
        ELSE 'default'
    END;
$$;

-- One announcement on a namespace's channel and the global one (the namespaced one only when
-- its name fits pg_notify's 63 bytes, as the trigger does).
CREATE OR REPLACE FUNCTION tasker.announce_send(p_namespace text, p_payload text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_channel text := 'pgmq_message_ready.' || p_namespace;
BEGIN
    IF octet_length(v_channel) <= 63 THEN
        PERFORM pg_notify(v_channel, p_payload);
    END IF;
    PERFORM pg_notify('pgmq_message_ready', p_payload);
END;
$$;

DO $do$
BEGIN
    IF to_regprocedure('tasker.pgmq_send_with_notify(text, jsonb, integer)') IS NULL THEN
        CREATE FUNCTION tasker.pgmq_send_with_notify(queue_name text, message jsonb, delay_seconds integer DEFAULT 0)
        RETURNS bigint
        LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_delay   integer := greatest(coalesce(delay_seconds, 0), 0);
    v_ns      text := tasker.tasker_core_namespace(queue_name);
    v_id      bigint;
    v_ready   timestamptz;
    v_payload text;
BEGIN
    PERFORM set_config('tasker.announced_by_caller', 'on', true);
    SELECT s.id INTO v_id FROM pgmq.send(queue_name, message, v_delay) AS s(id);
    PERFORM set_config('tasker.announced_by_caller', '', true);
    v_ready := clock_timestamp() + make_interval(secs => v_delay);
    IF octet_length(message::text) < 7000 THEN
        v_payload := json_build_object(
            'event_type', 'message_with_payload',
            'msg_id', v_id,
            'queue_name', queue_name,
            'namespace', v_ns,
            'message', message,
            'ready_at', v_ready,
            'delay_seconds', v_delay)::text;
    END IF;
    IF v_payload IS NULL OR octet_length(v_payload) >= 8000 THEN
        v_payload := json_build_object(
            'event_type', 'message_ready',
            'msg_id', v_id,
            'queue_name', queue_name,
            'namespace', v_ns,
            'message_count', 1,
            'ready_at', v_ready,
            'delay_seconds', v_delay,
            'payload_omitted', true)::text;
    END IF;
    PERFORM tasker.announce_send(v_ns, v_payload);
    RETURN v_id;
END;
$fn$;
        REVOKE EXECUTE ON FUNCTION tasker.pgmq_send_with_notify(text, jsonb, integer) FROM PUBLIC;
    END IF;

    IF to_regprocedure('tasker.pgmq_send_batch_with_notify(text, jsonb[], integer)') IS NULL THEN
        CREATE FUNCTION tasker.pgmq_send_batch_with_notify(queue_name text, messages jsonb[],
                                                           delay_seconds integer DEFAULT 0)
        RETURNS SETOF bigint
        LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_delay integer := greatest(coalesce(delay_seconds, 0), 0);
    v_ns    text := tasker.tasker_core_namespace(queue_name);
    v_ids   bigint[];
    v_count integer;
BEGIN
    PERFORM set_config('tasker.announced_by_caller', 'on', true);
    SELECT array_agg(s.id ORDER BY s.id) INTO v_ids
      FROM pgmq.send_batch(queue_name, messages, v_delay) AS s(id);
    PERFORM set_config('tasker.announced_by_caller', '', true);
    v_count := coalesce(cardinality(v_ids), 0);
    IF v_count = 0 THEN
        RETURN;
    END IF;
    PERFORM tasker.announce_send(v_ns, json_build_object(
        'event_type', 'batch_ready',
        'msg_ids', v_ids[1:100],
        'queue_name', queue_name,
        'namespace', v_ns,
        'message_count', v_count,
        'min_msg_id', v_ids[1],
        'max_msg_id', v_ids[v_count],
        'truncated', v_count > 100,
        'ready_at', clock_timestamp() + make_interval(secs => v_delay),
        'delay_seconds', v_delay)::text);
    RETURN QUERY SELECT unnest(v_ids);
END;
$fn$;
        REVOKE EXECUTE ON FUNCTION tasker.pgmq_send_batch_with_notify(text, jsonb[], integer) FROM PUBLIC;
    END IF;

    IF to_regprocedure('tasker.pgmq_read_specific_message(text, bigint, integer)') IS NULL THEN
        CREATE FUNCTION tasker.pgmq_read_specific_message(queue_name text, target_msg_id bigint,
                                                          vt_seconds integer DEFAULT 30)
        RETURNS TABLE (msg_id bigint, read_ct integer, enqueued_at timestamptz, vt timestamptz, message jsonb)
        LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_table regclass := tasker.queue_table(queue_name);
BEGIN
    IF v_table IS NULL THEN
        RAISE EXCEPTION 'queue % does not exist', queue_name USING ERRCODE = '42P01';
    END IF;
    RETURN QUERY EXECUTE format($sql$
        WITH target AS (
            SELECT q.msg_id FROM %1$s AS q
             WHERE q.msg_id = $1 AND q.vt <= clock_timestamp()
               FOR UPDATE SKIP LOCKED
        )
        UPDATE %1$s AS m
           SET vt = clock_timestamp() + make_interval(secs => $2),
               read_ct = m.read_ct + 1,
               last_read_at = clock_timestamp()
          FROM target
         WHERE m.msg_id = target.msg_id
        RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.message
        $sql$, v_table)
    USING target_msg_id, coalesce(vt_seconds, 30);
END;
$fn$;
        REVOKE EXECUTE ON FUNCTION tasker.pgmq_read_specific_message(text, bigint, integer) FROM PUBLIC;
    END IF;
END;
$do$;

REVOKE EXECUTE ON FUNCTION tasker.tasker_core_namespace(text), tasker.announce_send(text, text) FROM PUBLIC;

-- Producers send; workers and operators also read one message (pgmq_read_specific_message claims:
-- it needs the UPDATE on queue tables that producers do not have).
DO $$
BEGIN
    IF tasker.role_exists('tasker_producer') THEN
        GRANT EXECUTE ON FUNCTION tasker.pgmq_send_with_notify(text, jsonb, integer),
                                  tasker.pgmq_send_batch_with_notify(text, jsonb[], integer),
                                  tasker.tasker_core_namespace(text), tasker.announce_send(text, text)
            TO tasker_producer;
    END IF;
    IF tasker.role_exists('tasker_worker') THEN
        GRANT EXECUTE ON FUNCTION tasker.pgmq_send_with_notify(text, jsonb, integer),
                                  tasker.pgmq_send_batch_with_notify(text, jsonb[], integer),
                                  tasker.pgmq_read_specific_message(text, bigint, integer),
                                  tasker.tasker_core_namespace(text), tasker.announce_send(text, text)
            TO tasker_worker;
    END IF;
    IF tasker.role_exists('tasker_operator') THEN
        GRANT EXECUTE ON FUNCTION tasker.pgmq_send_with_notify(text, jsonb, integer),
                                  tasker.pgmq_send_batch_with_notify(text, jsonb[], integer),
                                  tasker.pgmq_read_specific_message(text, bigint, integer),
                                  tasker.tasker_core_namespace(text), tasker.announce_send(text, text)
            TO tasker_operator;
    END IF;
END;
$$;
