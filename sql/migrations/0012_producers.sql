-- tasker-worker 0012: the producer's side: idempotent enqueue, cancellation, outcome notices.
--
-- * tasker.enqueue_step: tasker.send_step with a caller-chosen step_uuid. A step_uuid already
--   done (an outcome row) or already sent through it (a row of tasker.step_keys, kept as long as
--   outcome rows: [retention] outcomes) is answered with that step instead of a second message
--   (created = false). The check and the send hold a transaction advisory lock on the step_uuid,
--   so two concurrent sends of one step_uuid enqueue it once. Steps sent without a step_uuid
--   (fresh ids, nothing to deduplicate) write no key: a plain send costs what it did.
-- * tasker.cancel_step: a step still queued (not held by a live claim: no tasker_claim header,
--   or one whose vt lapsed) is deleted and recorded with status 'cancelled'; a running or
--   finished one is left alone and said so.
-- * p_notify adds the header tasker_notify: when such a step's outcome is recorded the settle
--   notifies tasker_outcome with its step_uuid (tasker_worker.AsyncClient.wait_for listens).
--   Steps without it cost the settle nothing more.
-- * Both sends build their message with tasker.step_message (0011).

CREATE TABLE IF NOT EXISTS tasker.step_keys (
    step_uuid  uuid PRIMARY KEY,
    queue_name text NOT NULL,
    msg_id     bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS step_keys_created_brin ON tasker.step_keys USING brin (created_at);

ALTER TABLE tasker.step_results DROP CONSTRAINT IF EXISTS step_results_status_check;
ALTER TABLE tasker.step_results ADD CONSTRAINT step_results_status_check
    CHECK (status IN ('succeeded', 'failed', 'dead_lettered', 'cancelled'));

CREATE OR REPLACE FUNCTION tasker.enqueue_step(
    p_namespace      text,
    p_handler        text,
    p_inputs         jsonb DEFAULT '{}'::jsonb,
    p_step_uuid      uuid DEFAULT NULL,
    p_delay          integer DEFAULT 0,
    p_task_uuid      uuid DEFAULT NULL,
    p_correlation_id uuid DEFAULT NULL,
    p_attempt_limit  integer DEFAULT NULL,
    p_timeout        double precision DEFAULT NULL,
    p_headers        jsonb DEFAULT NULL,
    p_notify         boolean DEFAULT false
)
RETURNS TABLE (step_uuid uuid, msg_id bigint, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_msg     jsonb := tasker.step_message(p_namespace, p_handler, p_inputs, p_step_uuid, p_task_uuid,
                                           p_correlation_id, p_attempt_limit, p_timeout, p_headers);
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

-- Cancel a step still queued. state: 'cancelled', 'running' (a live claim holds it), 'finished'
-- (it has an outcome row) or 'not_found'. Runs as the owner (a producer may not delete queue
-- rows nor write outcomes); the namespace is validated before it names a table.
CREATE OR REPLACE FUNCTION tasker.cancel_step(p_namespace text, p_step_uuid uuid)
RETURNS TABLE (msg_id bigint, state text)
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_queue text := tasker.namespace_queue(p_namespace);
    v_table text := pgmq.format_table_name(v_queue, 'q');
    v_id    bigint;
    v_done  bigint;
    v_held  boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_step_uuid::text, 6134));
    SELECT r.msg_id INTO v_done FROM tasker.step_results AS r WHERE r.step_uuid = p_step_uuid;
    IF FOUND THEN
        RETURN QUERY SELECT v_done, 'finished'::text;
        RETURN;
    END IF;
    SELECT k.msg_id INTO v_id FROM tasker.step_keys AS k WHERE k.step_uuid = p_step_uuid;
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
             WHERE q.msg_id = $1
               AND (NOT coalesce(q.headers ? 'tasker_claim', false) OR q.vt <= clock_timestamp())
            RETURNING q.msg_id, q.read_ct, q.enqueued_at, q.message
        ), recorded AS (
            INSERT INTO tasker.step_results (step_uuid, task_uuid, correlation_id, namespace, queue_name,
                                             msg_id, handler, status, error, attempts, worker_id,
                                             enqueued_at, finished_at)
            SELECT $2, tasker.try_uuid(g.message ->> 'task_uuid'), tasker.try_uuid(g.message ->> 'correlation_id'),
                   %2$L, %3$L, g.msg_id, g.message ->> 'handler', 'cancelled',
                   jsonb_build_object('reason', 'cancelled'), g.read_ct, 'cancel:' || session_user,
                   g.enqueued_at, clock_timestamp()
              FROM gone AS g
            ON CONFLICT (step_uuid) DO NOTHING
        )
        SELECT count(*) > 0 FROM gone
        $sql$, v_table, p_namespace, v_queue)
        INTO v_held USING v_id, p_step_uuid;
    IF v_held THEN
        RETURN QUERY SELECT v_id, 'cancelled'::text;
    ELSE
        RETURN QUERY SELECT v_id, 'running'::text;
    END IF;
END;
$$;

REVOKE EXECUTE ON FUNCTION tasker.enqueue_step(text, text, jsonb, uuid, integer, uuid, uuid, integer,
                                               double precision, jsonb, boolean),
                           tasker.cancel_step(text, uuid)
    FROM PUBLIC;

DO $$
BEGIN
    IF tasker.role_exists('tasker_producer') THEN
        GRANT EXECUTE ON FUNCTION tasker.enqueue_step(text, text, jsonb, uuid, integer, uuid, uuid, integer,
                                                      double precision, jsonb, boolean),
                                  tasker.cancel_step(text, uuid)
            TO tasker_producer;
        GRANT SELECT, INSERT ON tasker.step_keys TO tasker_producer;
    END IF;
    IF tasker.role_exists('tasker_worker') THEN
        GRANT EXECUTE ON FUNCTION tasker.enqueue_step(text, text, jsonb, uuid, integer, uuid, uuid, integer,
                                                      double precision, jsonb, boolean)
            TO tasker_worker;
        GRANT SELECT, INSERT, DELETE ON tasker.step_keys TO tasker_worker;
    END IF;
    IF tasker.role_exists('tasker_operator') THEN
        GRANT EXECUTE ON FUNCTION tasker.enqueue_step(text, text, jsonb, uuid, integer, uuid, uuid, integer,
                                                      double precision, jsonb, boolean),
                                  tasker.cancel_step(text, uuid)
            TO tasker_operator;
        GRANT SELECT, INSERT, DELETE ON tasker.step_keys TO tasker_operator;
    END IF;
END;
$$;
