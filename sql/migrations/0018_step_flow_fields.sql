-- tasker-worker 0018: the producers' functions take the step message's flow-control fields.
--
-- tasker.send_step and tasker.enqueue_step gain p_priority (0-9, 0 first), p_group and
-- p_concurrency_key (1-128 characters), last and optional, so every call written before keeps
-- working, by position or by name; tasker.step_message checks them as the worker's decoder does.
-- A priority of 0 (the default) is left out of the body, as a step without one has it.

DROP FUNCTION tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision, jsonb);
DROP FUNCTION tasker.enqueue_step(text, text, jsonb, uuid, integer, uuid, uuid, integer, double precision, jsonb, boolean);
DROP FUNCTION tasker.step_message(text, text, jsonb, uuid, uuid, uuid, integer, double precision, jsonb);

CREATE FUNCTION tasker.step_message(
    p_namespace       text,
    p_handler         text,
    p_inputs          jsonb,
    p_step_uuid       uuid,
    p_task_uuid       uuid,
    p_correlation_id  uuid,
    p_attempt_limit   integer,
    p_timeout         double precision,
    p_headers         jsonb,
    p_priority        integer DEFAULT NULL,
    p_group           text DEFAULT NULL,
    p_concurrency_key text DEFAULT NULL
) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM tasker.validate_namespace(p_namespace);
    PERFORM tasker.validate_handler(p_handler);
    IF p_inputs IS NULL OR jsonb_typeof(p_inputs) <> 'object' THEN
        RAISE EXCEPTION 'inputs must be a JSON object' USING ERRCODE = '22023';
    END IF;
    IF p_attempt_limit IS NOT NULL AND p_attempt_limit NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'attempt_limit must be between 1 and 100' USING ERRCODE = '22023';
    END IF;
    IF p_timeout IS NOT NULL AND NOT (p_timeout > 0 AND p_timeout <= 86400) THEN
        RAISE EXCEPTION 'timeout must be between 0 and 86400 seconds' USING ERRCODE = '22023';
    END IF;
    IF p_priority IS NOT NULL AND p_priority NOT BETWEEN 0 AND 9 THEN
        RAISE EXCEPTION 'priority must be between 0 (first) and 9' USING ERRCODE = '22023';
    END IF;
    IF p_group IS NOT NULL AND char_length(p_group) NOT BETWEEN 1 AND 128 THEN
        RAISE EXCEPTION 'group must be 1 to 128 characters' USING ERRCODE = '22023';
    END IF;
    IF p_concurrency_key IS NOT NULL AND char_length(p_concurrency_key) NOT BETWEEN 1 AND 128 THEN
        RAISE EXCEPTION 'concurrency_key must be 1 to 128 characters' USING ERRCODE = '22023';
    END IF;
    IF p_headers IS NOT NULL THEN
        IF jsonb_typeof(p_headers) <> 'object' THEN
            RAISE EXCEPTION 'headers must be a JSON object' USING ERRCODE = '22023';
        END IF;
        IF octet_length(p_headers::text) > 8192 THEN
            RAISE EXCEPTION 'headers must be at most 8192 bytes of JSON' USING ERRCODE = '22023';
        END IF;
        IF EXISTS (SELECT 1 FROM jsonb_object_keys(p_headers) AS k WHERE k LIKE 'tasker\_%') THEN
            RAISE EXCEPTION 'header keys beginning with tasker_ are reserved for the runtime'
                USING ERRCODE = '22023';
        END IF;
    END IF;
    RETURN jsonb_strip_nulls(jsonb_build_object(
        'step_uuid', coalesce(p_step_uuid, gen_random_uuid()),
        'task_uuid', coalesce(p_task_uuid, gen_random_uuid()),
        'correlation_id', coalesce(p_correlation_id, gen_random_uuid()),
        'namespace', p_namespace,
        'handler', p_handler,
        'attempt_limit', p_attempt_limit,
        'timeout', p_timeout,
        'priority', nullif(p_priority, 0),
        'group', p_group,
        'concurrency_key', p_concurrency_key)) || jsonb_build_object('inputs', p_inputs);
END;
$$;

CREATE FUNCTION tasker.send_step(
    p_namespace       text,
    p_handler         text,
    p_inputs          jsonb DEFAULT '{}',
    p_delay           integer DEFAULT 0,
    p_task_uuid       uuid DEFAULT NULL,
    p_correlation_id  uuid DEFAULT NULL,
    p_attempt_limit   integer DEFAULT NULL,
    p_timeout         double precision DEFAULT NULL,
    p_headers         jsonb DEFAULT NULL,
    p_priority        integer DEFAULT NULL,
    p_group           text DEFAULT NULL,
    p_concurrency_key text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_msg jsonb := tasker.step_message(p_namespace, p_handler, p_inputs, NULL, p_task_uuid,
                                       p_correlation_id, p_attempt_limit, p_timeout, p_headers,
                                       p_priority, p_group, p_concurrency_key);
BEGIN
    IF p_delay IS NULL OR p_delay < 0 THEN
        RAISE EXCEPTION 'delay must be zero or more seconds' USING ERRCODE = '22023';
    END IF;
    RETURN (SELECT s.id FROM pgmq.send(tasker.namespace_queue(p_namespace), v_msg, p_headers, p_delay) AS s(id));
END;
$$;

CREATE FUNCTION tasker.enqueue_step(
    p_namespace       text,
    p_handler         text,
    p_inputs          jsonb DEFAULT '{}',
    p_step_uuid       uuid DEFAULT NULL,
    p_delay           integer DEFAULT 0,
    p_task_uuid       uuid DEFAULT NULL,
    p_correlation_id  uuid DEFAULT NULL,
    p_attempt_limit   integer DEFAULT NULL,
    p_timeout         double precision DEFAULT NULL,
    p_headers         jsonb DEFAULT NULL,
    p_notify          boolean DEFAULT false,
    p_priority        integer DEFAULT NULL,
    p_group           text DEFAULT NULL,
    p_concurrency_key text DEFAULT NULL
) RETURNS TABLE (step_uuid uuid, msg_id bigint, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_msg     jsonb := tasker.step_message(p_namespace, p_handler, p_inputs, p_step_uuid, p_task_uuid,
                                           p_correlation_id, p_attempt_limit, p_timeout, p_headers,
                                           p_priority, p_group, p_concurrency_key);
    v_queue   text := tasker.namespace_queue(p_namespace);
    v_uuid    uuid := (v_msg ->> 'step_uuid')::uuid;
    v_headers jsonb := p_headers;
    v_id      bigint;
BEGIN
    IF p_delay IS NULL OR p_delay < 0 THEN
        RAISE EXCEPTION 'delay must be zero or more seconds' USING ERRCODE = '22023';
    END IF;
    IF p_step_uuid IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended(p_step_uuid::text, 6134));
        SELECT r.msg_id INTO v_id FROM tasker.step_results AS r WHERE r.step_uuid = p_step_uuid;
        IF NOT FOUND THEN
            SELECT k.msg_id INTO v_id FROM tasker.step_keys AS k WHERE k.step_uuid = p_step_uuid;
        END IF;
        IF v_id IS NOT NULL THEN
            RETURN QUERY SELECT p_step_uuid, v_id, false;
            RETURN;
        END IF;
    END IF;
    IF p_notify THEN
        v_headers := coalesce(v_headers, '{}'::jsonb) || '{"tasker_notify": true}'::jsonb;
    END IF;
    SELECT s.id INTO v_id FROM pgmq.send(v_queue, v_msg, v_headers, p_delay) AS s(id);
    IF p_step_uuid IS NOT NULL THEN
        INSERT INTO tasker.step_keys (step_uuid, queue_name, msg_id) VALUES (p_step_uuid, v_queue, v_id);
    END IF;
    RETURN QUERY SELECT v_uuid, v_id, true;
END;
$$;

REVOKE EXECUTE ON FUNCTION
    tasker.step_message(text, text, jsonb, uuid, uuid, uuid, integer, double precision, jsonb, integer, text, text),
    tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision, jsonb, integer, text, text),
    tasker.enqueue_step(text, text, jsonb, uuid, integer, uuid, uuid, integer, double precision, jsonb, boolean,
                        integer, text, text)
    FROM PUBLIC;

DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['tasker_producer', 'tasker_worker', 'tasker_operator'] LOOP
        IF tasker.role_exists(v_role) THEN
            EXECUTE format(
                'GRANT EXECUTE ON FUNCTION '
                'tasker.step_message(text, text, jsonb, uuid, uuid, uuid, integer, double precision, jsonb, integer, text, text), '
                'tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision, jsonb, integer, text, text), '
                'tasker.enqueue_step(text, text, jsonb, uuid, integer, uuid, uuid, integer, double precision, jsonb, '
                'boolean, integer, text, text) TO %I', v_role);
        END IF;
    END LOOP;
END;
$$;
