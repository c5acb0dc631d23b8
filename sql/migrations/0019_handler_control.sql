-- tasker-worker 0019: handlers in control (issue 34).
--
-- * tasker.step_progress: the last progress a running step reported (ctx.progress), one row per
--   step, written in batches by its worker at most once a second; pruned with the outcomes.
-- * tasker.step_cancellations: a request to cancel a step that is running. tasker.cancel_step
--   still takes a queued step off its queue; for a running one it records who asked and tells
--   the worker that runs it (NOTIFY tasker_cancel.<ns> where it listens, else it finds the row
--   at its next look), which records the outcome 'cancelled' when the handler has stopped.
-- * tasker.unique_keys: a unique window. tasker.enqueue_step / send_step with p_unique_key and
--   p_unique_for answer a second send of the key within the window with the first step
--   (created = false), across producers, in one statement; with p_debounce the queued step's
--   inputs are replaced by the new ones instead (while no worker holds it).

CREATE TABLE tasker.step_progress (
    step_uuid   uuid PRIMARY KEY,
    namespace   text NOT NULL,
    fraction    double precision CHECK (fraction >= 0 AND fraction <= 1),
    note        text,
    data        jsonb,
    worker_id   text,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX step_progress_updated_idx ON tasker.step_progress (updated_at);

CREATE TABLE tasker.step_cancellations (
    step_uuid    uuid PRIMARY KEY,
    namespace    text NOT NULL,
    msg_id       bigint,
    requested_by text,
    requested_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE tasker.unique_keys (
    namespace   text NOT NULL,
    unique_key  text NOT NULL,
    step_uuid   uuid NOT NULL,
    msg_id      bigint NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (namespace, unique_key)
);
CREATE INDEX unique_keys_expires_idx ON tasker.unique_keys (expires_at);

-- Progress of running steps, a batch at a time: [{step_uuid, namespace, fraction, note, data}].
CREATE FUNCTION tasker.write_progress(p_rows jsonb, p_worker_id text) RETURNS integer
LANGUAGE sql AS $$
    WITH input AS (
        SELECT * FROM jsonb_to_recordset(p_rows)
            AS i(step_uuid uuid, namespace text, fraction double precision, note text, data jsonb)
    ), written AS (
        INSERT INTO tasker.step_progress AS p (step_uuid, namespace, fraction, note, data, worker_id, updated_at)
        SELECT i.step_uuid, i.namespace, least(1, greatest(0, i.fraction)), left(i.note, 1000), i.data,
               p_worker_id, clock_timestamp()
          FROM input AS i
        ON CONFLICT (step_uuid) DO UPDATE
           SET fraction = excluded.fraction, note = excluded.note, data = excluded.data,
               worker_id = excluded.worker_id, updated_at = excluded.updated_at
        RETURNING 1
    )
    SELECT count(*)::integer FROM written
$$;

DROP FUNCTION tasker.cancel_step(text, uuid);

-- A queued step is taken off its queue and recorded 'cancelled' (as before); a running one (held
-- by a live claim) is asked to stop: 'cancelling'.
CREATE FUNCTION tasker.cancel_step(p_namespace text, p_step_uuid uuid, p_by text DEFAULT NULL)
RETURNS TABLE (msg_id bigint, state text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_queue text := tasker.namespace_queue(p_namespace);
    v_table text := pgmq.format_table_name(v_queue, 'q');
    v_id    bigint;
    v_done  bigint;
    v_held  boolean;
    v_by    text := coalesce(p_by, 'cancel:' || session_user);
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_step_uuid::text, 6134));
    SELECT r.msg_id INTO v_done FROM tasker.step_results AS r WHERE r.step_uuid = p_step_uuid;
    IF FOUND THEN
        RETURN QUERY SELECT v_done, 'finished'::text;
        RETURN;
    END IF;
    -- msg_ids are numbered per queue: a key of another namespace's queue names another message.
    SELECT k.msg_id INTO v_id FROM tasker.step_keys AS k
     WHERE k.step_uuid = p_step_uuid AND k.queue_name = v_queue;
    IF v_id IS NULL THEN
        -- Sent without a key: found by its body (a scan of this namespace's queue).
        EXECUTE format('SELECT q.msg_id FROM pgmq.%I AS q WHERE q.message ->> ''step_uuid'' = $1 LIMIT 1', v_table)
            INTO v_id USING p_step_uuid::text;
    END IF;
    IF v_id IS NULL THEN
        RETURN QUERY SELECT NULL::bigint, 'not_found'::text;
        RETURN;
    END IF;
    EXECUTE format($sql$
        WITH gone AS (
            DELETE FROM pgmq.%1$I AS q
             WHERE q.msg_id = $1 AND q.message ->> 'step_uuid' = $2::text
               AND (NOT coalesce(q.headers ? 'tasker_claim', false) OR q.vt <= clock_timestamp())
            RETURNING q.msg_id, q.read_ct, q.enqueued_at, q.message
        ), recorded AS (
            INSERT INTO tasker.step_results (step_uuid, task_uuid, correlation_id, namespace, queue_name,
                                             msg_id, handler, status, error, attempts, worker_id,
                                             enqueued_at, finished_at)
            SELECT $2, tasker.try_uuid(g.message ->> 'task_uuid'), tasker.try_uuid(g.message ->> 'correlation_id'),
                   %2$L, %3$L, g.msg_id, g.message ->> 'handler', 'cancelled',
                   jsonb_build_object('reason', 'cancelled', 'by', $3), g.read_ct, 'cancel:' || session_user,
                   g.enqueued_at, clock_timestamp()
              FROM gone AS g
            ON CONFLICT (step_uuid) DO NOTHING
        )
        SELECT count(*) > 0 FROM gone
        $sql$, v_table, p_namespace, v_queue)
        INTO v_held USING v_id, p_step_uuid, v_by;
    IF v_held THEN
        RETURN QUERY SELECT v_id, 'cancelled'::text;
        RETURN;
    END IF;
    -- Not taken: held by a live claim, if the message is this step's at all.
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgmq.%I AS q WHERE q.msg_id = $1 AND q.message ->> ''step_uuid'' = $2::text)',
                   v_table)
        INTO v_held USING v_id, p_step_uuid;
    IF NOT v_held THEN
        RETURN QUERY SELECT NULL::bigint, 'not_found'::text;
        RETURN;
    END IF;
    INSERT INTO tasker.step_cancellations (step_uuid, namespace, msg_id, requested_by)
    VALUES (p_step_uuid, p_namespace, v_id, v_by)
    ON CONFLICT (step_uuid) DO NOTHING;
    PERFORM pg_notify('tasker_cancel.' || p_namespace,
                      json_build_object('step_uuid', p_step_uuid, 'msg_id', v_id, 'by', v_by)::text);
    RETURN QUERY SELECT v_id, 'cancelling'::text;
END;
$fn$;

-- Replace a queued step's inputs (debounce): only while no live claim holds it. As the owner: a
-- producer may insert into a queue, not update it. True: replaced.
CREATE FUNCTION tasker.debounce_step(p_queue text, p_msg_id bigint, p_step_uuid uuid, p_inputs jsonb)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_done integer;
BEGIN
    EXECUTE format('UPDATE pgmq.%I AS q SET message = jsonb_set(q.message, ''{inputs}'', $2) '
                   'WHERE q.msg_id = $1 AND q.message ->> ''step_uuid'' = $3::text '
                   'AND (NOT coalesce(q.headers ? ''tasker_claim'', false) OR q.vt <= clock_timestamp())',
                   pgmq.format_table_name(p_queue, 'q'))
        USING p_msg_id, p_inputs, p_step_uuid;
    GET DIAGNOSTICS v_done = ROW_COUNT;
    RETURN v_done > 0;
END;
$$;

DROP FUNCTION tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision, jsonb, integer, text, text);
DROP FUNCTION tasker.enqueue_step(text, text, jsonb, uuid, integer, uuid, uuid, integer, double precision, jsonb,
                                  boolean, integer, text, text);

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
    p_concurrency_key text DEFAULT NULL,
    p_unique_key      text DEFAULT NULL,
    p_unique_for      double precision DEFAULT NULL,
    p_debounce        boolean DEFAULT false
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
    v_first   tasker.unique_keys;
BEGIN
    IF p_delay IS NULL OR p_delay < 0 THEN
        RAISE EXCEPTION 'delay must be zero or more seconds' USING ERRCODE = '22023';
    END IF;
    IF p_unique_key IS NOT NULL THEN
        IF char_length(p_unique_key) NOT BETWEEN 1 AND 200 THEN
            RAISE EXCEPTION 'unique_key must be 1 to 200 characters' USING ERRCODE = '22023';
        END IF;
        IF p_unique_for IS NULL OR NOT (p_unique_for > 0 AND p_unique_for <= 31622400) THEN
            RAISE EXCEPTION 'unique_for must be more than 0 seconds and at most a year' USING ERRCODE = '22023';
        END IF;
        -- One producer at a time per key: the second waits, then finds the first's row.
        PERFORM pg_advisory_xact_lock(hashtextextended(p_namespace || ':' || p_unique_key, 6135));
        SELECT * INTO v_first FROM tasker.unique_keys AS u
         WHERE u.namespace = p_namespace AND u.unique_key = p_unique_key AND u.expires_at > clock_timestamp();
        IF FOUND AND (NOT p_debounce OR tasker.debounce_step(v_queue, v_first.msg_id, v_first.step_uuid, p_inputs)) THEN
            -- Within the window: the first step answers (with debounce, holding the new inputs).
            RETURN QUERY SELECT v_first.step_uuid, v_first.msg_id, false;
            RETURN;
        END IF;
        -- No window open, or (debounce) its step already ran or runs: this send is a new step,
        -- and the window moves to it, so that the newest inputs run.
    ELSIF p_unique_for IS NOT NULL OR p_debounce THEN
        RAISE EXCEPTION 'unique_for and debounce go with unique_key' USING ERRCODE = '22023';
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
    IF p_unique_key IS NOT NULL THEN
        INSERT INTO tasker.unique_keys AS u (namespace, unique_key, step_uuid, msg_id, expires_at)
        VALUES (p_namespace, p_unique_key, v_uuid, v_id, clock_timestamp() + make_interval(secs => p_unique_for))
        ON CONFLICT (namespace, unique_key) DO UPDATE
           SET step_uuid = excluded.step_uuid, msg_id = excluded.msg_id, expires_at = excluded.expires_at;
    END IF;
    RETURN QUERY SELECT v_uuid, v_id, true;
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
    p_concurrency_key text DEFAULT NULL,
    p_unique_key      text DEFAULT NULL,
    p_unique_for      double precision DEFAULT NULL,
    p_debounce        boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF p_unique_key IS NULL AND p_unique_for IS NULL AND NOT p_debounce THEN
        -- The plain send, as before: one INSERT, no lock.
        IF p_delay IS NULL OR p_delay < 0 THEN
            RAISE EXCEPTION 'delay must be zero or more seconds' USING ERRCODE = '22023';
        END IF;
        RETURN (SELECT s.id FROM pgmq.send(tasker.namespace_queue(p_namespace),
                                           tasker.step_message(p_namespace, p_handler, p_inputs, NULL, p_task_uuid,
                                                               p_correlation_id, p_attempt_limit, p_timeout, p_headers,
                                                               p_priority, p_group, p_concurrency_key),
                                           p_headers, p_delay) AS s(id));
    END IF;
    RETURN (SELECT e.msg_id FROM tasker.enqueue_step(
        p_namespace, p_handler, p_inputs, NULL, p_delay, p_task_uuid, p_correlation_id, p_attempt_limit,
        p_timeout, p_headers, false, p_priority, p_group, p_concurrency_key, p_unique_key, p_unique_for,
        p_debounce) AS e);
END;
$$;

-- It calls gen_random_uuid(): every call must be evaluated.
ALTER FUNCTION tasker.step_message(text, text, jsonb, uuid, uuid, uuid, integer, double precision, jsonb, integer,
                                   text, text) VOLATILE;

REVOKE EXECUTE ON FUNCTION
    tasker.cancel_step(text, uuid, text),
    tasker.debounce_step(text, bigint, uuid, jsonb),
    tasker.write_progress(jsonb, text),
    tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision, jsonb, integer, text, text,
                     text, double precision, boolean),
    tasker.enqueue_step(text, text, jsonb, uuid, integer, uuid, uuid, integer, double precision, jsonb, boolean,
                        integer, text, text, text, double precision, boolean)
    FROM PUBLIC;

DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['tasker_producer', 'tasker_worker', 'tasker_operator'] LOOP
        IF tasker.role_exists(v_role) THEN
            EXECUTE format(
                'GRANT EXECUTE ON FUNCTION '
                'tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision, jsonb, integer, '
                'text, text, text, double precision, boolean), '
                'tasker.enqueue_step(text, text, jsonb, uuid, integer, uuid, uuid, integer, double precision, jsonb, '
                'boolean, integer, text, text, text, double precision, boolean) TO %I', v_role);
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON tasker.unique_keys TO %I', v_role);
            EXECUTE format('GRANT EXECUTE ON FUNCTION tasker.debounce_step(text, bigint, uuid, jsonb) TO %I', v_role);
            EXECUTE format('GRANT SELECT ON tasker.step_progress TO %I', v_role);
        END IF;
    END LOOP;
    IF tasker.role_exists('tasker_producer') THEN
        GRANT EXECUTE ON FUNCTION tasker.cancel_step(text, uuid, text) TO tasker_producer;
    END IF;
    IF tasker.role_exists('tasker_worker') THEN
        GRANT EXECUTE ON FUNCTION tasker.write_progress(jsonb, text) TO tasker_worker;
        GRANT INSERT, UPDATE, DELETE ON tasker.step_progress TO tasker_worker;
        GRANT SELECT, DELETE ON tasker.step_cancellations TO tasker_worker;
    END IF;
    IF tasker.role_exists('tasker_operator') THEN
        GRANT EXECUTE ON FUNCTION tasker.cancel_step(text, uuid, text), tasker.write_progress(jsonb, text)
            TO tasker_operator;
        GRANT SELECT, INSERT, UPDATE, DELETE ON tasker.step_progress, tasker.step_cancellations TO tasker_operator;
    END IF;
END;
$$;
