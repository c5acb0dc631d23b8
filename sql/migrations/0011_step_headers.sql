-- tasker-worker 0011: tasker.send_step takes message headers.
--
-- A producer that traces its work hands the step its W3C trace context ({"traceparent": ...,
-- "tracestate": ...}); the worker continues that trace in the step's span (the otel extra).
-- Headers are pgmq's own column, so pgmq.send callers could always set them; this gives SQL
-- producers the same. Keys beginning with tasker_ are the runtime's (tasker_claim,
-- tasker_last_error, tasker_dlq, ...) and are refused. The function gains a last parameter, so
-- the old one is dropped and its grants given again; every existing call still resolves.
-- tasker.step_message is the one validation and shape of a step message (tasker.enqueue_step,
-- 0012, uses it too); tasker.namespace_queue names a namespace's queue or says how to create it.

DROP FUNCTION IF EXISTS tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision);

CREATE OR REPLACE FUNCTION tasker.step_message(
    p_namespace      text,
    p_handler        text,
    p_inputs         jsonb,
    p_step_uuid      uuid,
    p_task_uuid      uuid,
    p_correlation_id uuid,
    p_attempt_limit  integer,
    p_timeout        double precision,
    p_headers        jsonb
)
RETURNS jsonb
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
        'timeout', p_timeout)) || jsonb_build_object('inputs', p_inputs);
END;
$$;

-- The queue of a namespace, or an error that says how to create it.
CREATE OR REPLACE FUNCTION tasker.namespace_queue(p_namespace text)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_queue text := 'worker_' || tasker.validate_namespace(p_namespace) || '_queue';
BEGIN
    IF tasker.queue_table(v_queue) IS NULL THEN
        RAISE EXCEPTION 'queue % does not exist', v_queue
            USING ERRCODE = '42P01',
                  HINT = format('create it with SELECT tasker.create_namespace_queue(%L)', p_namespace);
    END IF;
    RETURN v_queue;
END;
$$;

CREATE FUNCTION tasker.send_step(
    p_namespace      text,
    p_handler        text,
    p_inputs         jsonb DEFAULT '{}'::jsonb,
    p_delay          integer DEFAULT 0,
    p_task_uuid      uuid DEFAULT NULL,
    p_correlation_id uuid DEFAULT NULL,
    p_attempt_limit  integer DEFAULT NULL,
    p_timeout        double precision DEFAULT NULL,
    p_headers        jsonb DEFAULT NULL
)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_msg jsonb := tasker.step_message(p_namespace, p_handler, p_inputs, NULL, p_task_uuid,
                                       p_correlation_id, p_attempt_limit, p_timeout, p_headers);
BEGIN
    IF p_delay IS NULL OR p_delay < 0 THEN
        RAISE EXCEPTION 'delay must be zero or more seconds' USING ERRCODE = '22023';
    END IF;
    RETURN (SELECT s.id FROM pgmq.send(tasker.namespace_queue(p_namespace), v_msg, p_headers, p_delay) AS s(id));
END;
$$;

REVOKE EXECUTE ON FUNCTION tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision, jsonb),
                           tasker.step_message(text, text, jsonb, uuid, uuid, uuid, integer, double precision, jsonb),
                           tasker.namespace_queue(text)
    FROM PUBLIC;

DO $$
BEGIN
    IF tasker.role_exists('tasker_producer') THEN
        GRANT EXECUTE ON FUNCTION tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision, jsonb),
                                  tasker.step_message(text, text, jsonb, uuid, uuid, uuid, integer, double precision, jsonb),
                                  tasker.namespace_queue(text)
            TO tasker_producer;
    END IF;
    IF tasker.role_exists('tasker_worker') THEN
        GRANT EXECUTE ON FUNCTION tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision, jsonb),
                                  tasker.step_message(text, text, jsonb, uuid, uuid, uuid, integer, double precision, jsonb),
                                  tasker.namespace_queue(text)
            TO tasker_worker;
    END IF;
    IF tasker.role_exists('tasker_operator') THEN
        GRANT EXECUTE ON FUNCTION tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision, jsonb),
                                  tasker.step_message(text, text, jsonb, uuid, uuid, uuid, integer, double precision, jsonb),
                                  tasker.namespace_queue(text)
            TO tasker_operator;
    END IF;
END;
$$;
