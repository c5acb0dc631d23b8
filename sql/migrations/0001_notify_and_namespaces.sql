-- tasker-worker 0001: naming rules, the NOTIFY contract, and SQL helpers for producers.
--
-- Every pgmq queue table gets one statement-level AFTER INSERT trigger that sends one
-- notification per statement per queue on two channels:
--   pgmq_message_ready.<namespace>  and  pgmq_message_ready
-- The trigger only calls pg_notify (no row locks, no counters), so producers in concurrent
-- transactions never wait for each other because of it.

CREATE SCHEMA IF NOT EXISTS tasker;

-- Namespaces: [a-z][a-z0-9_]*, at most 30 characters, so that worker_<ns>_queue_dlq and the
-- tables and indexes pgmq derives from it stay within 63-byte identifiers.
CREATE OR REPLACE FUNCTION tasker.validate_namespace(p_namespace text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_namespace IS NULL OR p_namespace = '' THEN
        RAISE EXCEPTION 'namespace must be a non-empty string' USING ERRCODE = '22023';
    END IF;
    IF length(p_namespace) > 30 THEN
        RAISE EXCEPTION 'namespace is % characters; the limit is 30', length(p_namespace)
            USING ERRCODE = '22023';
    END IF;
    IF p_namespace !~ '^[a-z][a-z0-9_]*$' THEN
        RAISE EXCEPTION 'namespace % is invalid: use lowercase letters, digits and _, starting with a letter',
            quote_literal(left(p_namespace, 40))
            USING ERRCODE = '22023';
    END IF;
    RETURN p_namespace;
END;
$$;

CREATE OR REPLACE FUNCTION tasker.validate_handler(p_handler text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_handler IS NULL OR length(p_handler) NOT BETWEEN 1 AND 100
       OR p_handler !~ '^[A-Za-z_][A-Za-z0-9_.:-]*$' THEN
        RAISE EXCEPTION 'handler name % is invalid: 1..100 letters, digits, _ . : or -',
            quote_literal(left(coalesce(p_handler, ''), 40))
            USING ERRCODE = '22023';
    END IF;
    RETURN p_handler;
END;
$$;

-- The namespace of a queue: the middle of worker_<ns>_queue, else the queue name itself.
CREATE OR REPLACE FUNCTION tasker.queue_namespace(p_queue text)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_queue ~ '^worker_[a-z][a-z0-9_]*_queue$' AND length(p_queue) <= 43
            THEN substring(p_queue FROM 8 FOR length(p_queue) - 13)
        ELSE p_queue
    END;
$$;

CREATE OR REPLACE FUNCTION tasker.try_uuid(p_text text)
RETURNS uuid
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_text ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
            THEN p_text::uuid
    END;
$$;

-- The queue table of a pgmq queue, or NULL when there is none.
CREATE OR REPLACE FUNCTION tasker.queue_table(p_queue text)
RETURNS regclass
LANGUAGE sql STABLE AS $$
    SELECT to_regclass(format('pgmq.%I', pgmq.format_table_name(p_queue, 'q')));
$$;

-- One notification per statement. The payload is bounded whatever the batch or message size:
-- at most 100 ids are listed (plus message_count, min/max id), messages are never included,
-- and queue names are at most 47 characters (pgmq's limit), so it stays far below 8000 bytes.
CREATE OR REPLACE FUNCTION tasker.notify_message_ready()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_queue   text := substring(TG_TABLE_NAME FROM 3);
    v_ns      text := tasker.queue_namespace(v_queue);
    v_count   bigint;
    v_min     bigint;
    v_max     bigint;
    v_ready   timestamptz;
    v_ids     bigint[];
    v_payload text;
    v_channel text;
BEGIN
    SELECT count(*), min(msg_id), max(msg_id), min(vt)
      INTO v_count, v_min, v_max, v_ready
      FROM new_rows;
    IF v_count = 0 THEN
        RETURN NULL;
    END IF;
    IF v_count = 1 THEN
        v_payload := json_build_object(
            'event_type', 'message_ready',
            'queue_name', v_queue,
            'namespace', v_ns,
            'msg_id', v_min,
            'message_count', 1,
            'ready_at', v_ready)::text;
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
            'ready_at', v_ready)::text;
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

CREATE OR REPLACE FUNCTION tasker.attach_notify_trigger(p_table regclass)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_table IS NULL THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger
               WHERE tgrelid = p_table AND tgname = 'tasker_notify_message_ready') THEN
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TRIGGER tasker_notify_message_ready AFTER INSERT ON %s '
        'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT '
        'EXECUTE FUNCTION tasker.notify_message_ready()', p_table);
    RETURN true;
END;
$$;

-- Attach the trigger to every pgmq queue that lacks it; returns how many were attached.
CREATE OR REPLACE FUNCTION tasker.ensure_notify_triggers()
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_attached integer := 0;
    v_table regclass;
BEGIN
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

-- Queues created later, by anyone (pgmq.create from psql, any pgmq client, our CLI), get the
-- trigger from this event trigger. Creating event triggers needs a superuser; without one,
-- workers attach the trigger to their own queues at startup (ensure_notify_triggers).
CREATE OR REPLACE FUNCTION tasker.on_queue_table_created()
RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_cmd record;
BEGIN
    FOR v_cmd IN
        SELECT objid FROM pg_event_trigger_ddl_commands()
         WHERE command_tag = 'CREATE TABLE' AND schema_name = 'pgmq' AND object_type = 'table'
    LOOP
        PERFORM tasker.attach_notify_trigger(c.oid::regclass)
           FROM pg_class c
          WHERE c.oid = v_cmd.objid
            AND c.relname LIKE 'q\_%'
            AND c.relkind IN ('r', 'p')
            AND NOT c.relispartition;
    END LOOP;
END;
$$;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        DROP EVENT TRIGGER IF EXISTS tasker_attach_notify;
        CREATE EVENT TRIGGER tasker_attach_notify ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE')
            EXECUTE FUNCTION tasker.on_queue_table_created();
    ELSE
        RAISE NOTICE 'not a superuser: queues created outside tasker-worker get their notify '
                     'trigger when a worker starts or tasker.ensure_notify_triggers() runs';
    END IF;
END;
$$;

-- Create the queue and dead-letter queue of a namespace; returns the queue name.
CREATE OR REPLACE FUNCTION tasker.create_namespace_queue(p_namespace text)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_queue text := 'worker_' || tasker.validate_namespace(p_namespace) || '_queue';
BEGIN
    PERFORM pgmq.create(v_queue);
    PERFORM pgmq.create(v_queue || '_dlq');
    PERFORM tasker.attach_notify_trigger(tasker.queue_table(v_queue));
    PERFORM tasker.attach_notify_trigger(tasker.queue_table(v_queue || '_dlq'));
    RETURN v_queue;
END;
$$;

-- Enqueue one valid step message with fresh ids; returns its msg_id.
CREATE OR REPLACE FUNCTION tasker.send_step(
    p_namespace      text,
    p_handler        text,
    p_inputs         jsonb DEFAULT '{}'::jsonb,
    p_delay          integer DEFAULT 0,
    p_task_uuid      uuid DEFAULT NULL,
    p_correlation_id uuid DEFAULT NULL,
    p_attempt_limit  integer DEFAULT NULL,
    p_timeout        double precision DEFAULT NULL
)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_queue text := 'worker_' || tasker.validate_namespace(p_namespace) || '_queue';
    v_msg   jsonb;
    v_id    bigint;
BEGIN
    PERFORM tasker.validate_handler(p_handler);
    IF p_inputs IS NULL OR jsonb_typeof(p_inputs) <> 'object' THEN
        RAISE EXCEPTION 'inputs must be a JSON object' USING ERRCODE = '22023';
    END IF;
    IF p_delay IS NULL OR p_delay < 0 THEN
        RAISE EXCEPTION 'delay must be zero or more seconds' USING ERRCODE = '22023';
    END IF;
    IF p_attempt_limit IS NOT NULL AND p_attempt_limit NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'attempt_limit must be between 1 and 100' USING ERRCODE = '22023';
    END IF;
    IF p_timeout IS NOT NULL AND NOT (p_timeout > 0 AND p_timeout <= 86400) THEN
        RAISE EXCEPTION 'timeout must be between 0 and 86400 seconds' USING ERRCODE = '22023';
    END IF;
    IF tasker.queue_table(v_queue) IS NULL THEN
        RAISE EXCEPTION 'queue % does not exist', v_queue
            USING ERRCODE = '42P01',
                  HINT = format('create it with SELECT tasker.create_namespace_queue(%L)', p_namespace);
    END IF;
    v_msg := jsonb_strip_nulls(jsonb_build_object(
        'step_uuid', gen_random_uuid(),
        'task_uuid', coalesce(p_task_uuid, gen_random_uuid()),
        'correlation_id', coalesce(p_correlation_id, gen_random_uuid()),
        'namespace', p_namespace,
        'handler', p_handler,
        'attempt_limit', p_attempt_limit,
        'timeout', p_timeout)) || jsonb_build_object('inputs', p_inputs);
    SELECT s.id INTO v_id FROM pgmq.send(v_queue, v_msg, p_delay) AS s(id);
    RETURN v_id;
END;
$$;
