-- tasker-worker 0025: headers that are no JSON object are kept under tasker_raw_headers.
--
-- pgmq takes any JSON as a message's headers; a raw producer may write `[1]` or `"x"`. The
-- runtime keeps its counters there (tasker_snoozes, tasker_releases, ...) and the claim its
-- stamp (tasker_claim), merged with jsonb's ||, which appends an object to an array (and makes
-- a scalar an array) instead of merging: the counters became array elements the worker never
-- read back, so a step that always snoozed or was always released did so without end. A claim
-- now makes such headers an object first, {"tasker_raw_headers": <what they were>}, kept as
-- they were, so every later merge (the stamp, the put-backs, the dead letter) works on an
-- object and the bounds hold. The worker's own claim (tasker_worker/db/queries.py) does the
-- same; this is the claim of a namespace under flow control. Only that line of 0021's
-- function changes.

CREATE OR REPLACE FUNCTION tasker.claim_flow(p_queue text, p_qty integer, p_vt integer, p_stamp jsonb, p_worker_id text, p_skip_msgs bigint[] DEFAULT '{}'::bigint[], p_skip_handlers text[] DEFAULT '{}'::text[], p_announce boolean DEFAULT false, p_store_events boolean DEFAULT false)
 RETURNS TABLE(msg_id bigint, read_ct integer, enqueued_at timestamp with time zone, last_read_at timestamp with time zone, message text, prior_headers jsonb, done boolean, prior_read_at timestamp with time zone, hold text, retry_after double precision)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_ns       text := tasker.queue_namespace(p_queue);
    v_table    text := pgmq.format_table_name(p_queue, 'q');
    f          tasker.queue_flow;
    v_budget   integer := p_qty;
    v_running  bigint;
    v_keys     jsonb := '{}';
    v_now      timestamptz;
    v_tokens   double precision;
    v_rate     double precision;
    v_took     integer;
    v_window   integer;
    v_cand     text;
    v_events   text := '';
    v_notice   text := '';
    v_ready    boolean;
BEGIN
    SELECT * INTO f FROM tasker.queue_flow AS q WHERE q.namespace = v_ns;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, NULL::integer, NULL::timestamptz, NULL::timestamptz, NULL::text,
                            NULL::jsonb, NULL::boolean, NULL::timestamptz, 'none'::text, NULL::float8;
        RETURN;
    END IF;
    IF NOT f.paused AND (f.max_running IS NOT NULL OR f.key_max_running IS NOT NULL
                         OR f.rate_count IS NOT NULL OR f.uses_groups) THEN
        -- One claimer of this namespace at a time from here to the commit. Every statement
        -- below takes a new snapshot, so it sees every claim committed before the lock.
        SELECT * INTO f FROM tasker.queue_flow AS q WHERE q.namespace = v_ns FOR UPDATE;
        IF NOT FOUND THEN
            RETURN QUERY SELECT NULL::bigint, NULL::integer, NULL::timestamptz, NULL::timestamptz, NULL::text,
                                NULL::jsonb, NULL::boolean, NULL::timestamptz, 'none'::text, NULL::float8;
            RETURN;
        END IF;
    END IF;
    IF f.paused THEN
        RETURN QUERY SELECT NULL::bigint, NULL::integer, NULL::timestamptz, NULL::timestamptz, NULL::text,
                            NULL::jsonb, NULL::boolean, NULL::timestamptz, 'paused'::text, NULL::float8;
        RETURN;
    END IF;
    IF f.max_running IS NOT NULL THEN
        EXECUTE format('SELECT count(*) FROM pgmq.%I AS q '
                       'WHERE q.headers ? ''tasker_claim'' AND q.vt > clock_timestamp()', v_table)
           INTO v_running;
        v_budget := least(v_budget, f.max_running - v_running);
    END IF;
    IF f.rate_count IS NOT NULL THEN
        v_now := clock_timestamp();
        v_rate := f.rate_count / f.rate_period_s;
        v_tokens := least(coalesce(f.rate_burst, 1)::float8,
                          coalesce(f.tokens, coalesce(f.rate_burst, 1)::float8)
                          + v_rate * greatest(0, extract(epoch FROM v_now - coalesce(f.refilled_at, v_now))));
        v_budget := least(v_budget, floor(v_tokens + 1e-9)::integer);
    END IF;
    IF v_budget <= 0 THEN
        -- Held back only if something is ready: an idle namespace at its limit owes no answer.
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgmq.%I AS q WHERE q.vt <= clock_timestamp())', v_table)
           INTO v_ready;
        IF NOT v_ready THEN
            RETURN;
        END IF;
        RETURN QUERY SELECT NULL::bigint, NULL::integer, NULL::timestamptz, NULL::timestamptz, NULL::text,
                            NULL::jsonb, NULL::boolean, NULL::timestamptz, 'limited'::text,
                            CASE WHEN f.rate_count IS NOT NULL AND v_tokens < 1 THEN (1 - v_tokens) / v_rate END;
        RETURN;
    END IF;
    IF f.key_max_running IS NOT NULL THEN
        EXECUTE format('SELECT coalesce(jsonb_object_agg(r.k, r.n), ''{}'') FROM ('
                       'SELECT tasker.step_concurrency_key(q.message) AS k, count(*) AS n FROM pgmq.%I AS q '
                       'WHERE q.headers ? ''tasker_claim'' AND q.vt > clock_timestamp() '
                       'AND tasker.step_concurrency_key(q.message) <> '''' GROUP BY 1) AS r', v_table)
           INTO v_keys;
    END IF;
    -- Candidates: enough to fill the budget once the per-key cap is applied among them.
    v_window := CASE WHEN f.key_max_running IS NULL THEN v_budget ELSE least(v_budget * 8 + 32, 2000) END;
    IF f.uses_groups THEN
        -- Each group's next steps (through the index on group, priority, msg_id: a probe per
        -- group, at most 1000 groups a claim), then round-robin across them.
        v_cand := format($q$
            WITH RECURSIVE grp AS (
                (SELECT tasker.step_group(q.message) AS g FROM pgmq.%1$I AS q ORDER BY 1 LIMIT 1)
                UNION ALL
                SELECT (SELECT tasker.step_group(q.message) FROM pgmq.%1$I AS q
                         WHERE tasker.step_group(q.message) > grp.g ORDER BY 1 LIMIT 1)
                  FROM grp WHERE grp.g IS NOT NULL
            ), cand AS (
                SELECT h.* FROM (SELECT grp.g FROM grp WHERE grp.g IS NOT NULL LIMIT 1000) AS gs
                CROSS JOIN LATERAL (
                    SELECT q.msg_id, tasker.step_priority(q.message) AS p, gs.g,
                           tasker.step_concurrency_key(q.message) AS k
                      FROM pgmq.%1$I AS q
                     WHERE tasker.step_group(q.message) = gs.g AND q.vt <= clock_timestamp()
                       AND q.msg_id <> ALL ($4)
                       AND NOT (jsonb_typeof(q.message) = 'object'
                                AND coalesce(q.message ->> 'handler' = ANY ($5), false))
                       AND ($7 IS NULL OR coalesce(($6 ->> tasker.step_concurrency_key(q.message))::int, 0) < $7)
                     ORDER BY tasker.step_priority(q.message), q.msg_id
                     LIMIT $8) AS h
            )$q$, v_table);
    ELSE
        v_cand := format($q$
            WITH cand AS (
                SELECT q.msg_id, tasker.step_priority(q.message) AS p, ''::text AS g,
                       tasker.step_concurrency_key(q.message) AS k
                  FROM pgmq.%1$I AS q
                 WHERE q.vt <= clock_timestamp()
                   AND q.msg_id <> ALL ($4)
                   AND NOT (jsonb_typeof(q.message) = 'object' AND coalesce(q.message ->> 'handler' = ANY ($5), false))
                   AND ($7 IS NULL OR coalesce(($6 ->> tasker.step_concurrency_key(q.message))::int, 0) < $7)
                 ORDER BY tasker.step_priority(q.message), q.msg_id
                 LIMIT $8
            )$q$, v_table);
    END IF;
    IF p_store_events THEN
        v_events := format($q$, logged AS (
                INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
                SELECT 'StepAssigned', $9, tasker.try_uuid(c.message ->> 'step_uuid'), %1$L, c.msg_id,
                       jsonb_build_object('read_ct', c.read_ct), c.last_read_at
                  FROM claimed AS c)$q$, p_queue);
    END IF;
    IF p_announce THEN
        v_notice := format($q$, noticed AS (
                SELECT pg_notify(%1$L, json_build_object(
                           'q', %2$L, 'ids', (array_agg(c.msg_id ORDER BY c.msg_id))[1:100],
                           'lo', min(c.msg_id), 'hi', max(c.msg_id), 'n', count(*))::text) AS sent
                  FROM claimed AS c
                HAVING count(*) > 0)$q$, 'tasker_claimed.' || v_ns, p_queue);
    END IF;
    RETURN QUERY EXECUTE v_cand || format($q$
        , ranked AS (
            SELECT c.*, row_number() OVER (PARTITION BY c.k ORDER BY c.p, c.msg_id) AS kn,
                        row_number() OVER (PARTITION BY c.g, c.p ORDER BY c.msg_id) AS gn
              FROM cand AS c
        ), chosen AS (
            SELECT r.msg_id, r.p, r.gn FROM ranked AS r
             WHERE $7 IS NULL OR r.k = '' OR r.kn + coalesce(($6 ->> r.k)::int, 0) <= $7
             ORDER BY r.p, r.gn, r.msg_id
             LIMIT $1
        ), ready AS (
            SELECT q.msg_id, q.headers AS prior_headers, q.last_read_at AS prior_read_at
              FROM pgmq.%1$I AS q
             WHERE q.msg_id IN (SELECT chosen.msg_id FROM chosen) AND q.vt <= clock_timestamp()
               FOR UPDATE OF q SKIP LOCKED
        ), claimed AS (
            UPDATE pgmq.%1$I AS m
               SET last_read_at = clock_timestamp(),
                   vt = clock_timestamp() + make_interval(secs => $2),
                   read_ct = m.read_ct + 1,
                   headers = CASE WHEN m.headers IS NULL THEN $3
                                  WHEN jsonb_typeof(m.headers) = 'object' THEN m.headers || $3
                                  ELSE jsonb_build_object('tasker_raw_headers', m.headers) || $3 END
              FROM ready
             WHERE m.msg_id = ready.msg_id
            RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.message, ready.prior_headers,
                      ready.prior_read_at
        )%2$s%3$s, recorded AS MATERIALIZED (
            SELECT r.u FROM tasker.recorded_step_uuids(
                ARRAY(SELECT tasker.try_uuid(c.message ->> 'step_uuid') FROM claimed AS c)) AS r(u)
        )
        SELECT c.msg_id, c.read_ct, c.enqueued_at, c.last_read_at, c.message::text, c.prior_headers,
               coalesce(tasker.try_uuid(c.message ->> 'step_uuid') IN (SELECT r.u FROM recorded AS r), false),
               c.prior_read_at, NULL::text, NULL::float8
          FROM claimed AS c
          JOIN chosen AS ch ON ch.msg_id = c.msg_id%4$s
         ORDER BY ch.p, ch.gn, c.msg_id
        $q$, v_table, v_events, v_notice, CASE WHEN p_announce THEN ' LEFT JOIN noticed ON true' ELSE '' END)
    USING v_budget, p_vt, p_stamp, coalesce(p_skip_msgs, '{}'), coalesce(p_skip_handlers, '{}'), v_keys,
          f.key_max_running, v_window, p_worker_id;
    GET DIAGNOSTICS v_took = ROW_COUNT;
    IF f.rate_count IS NOT NULL THEN
        UPDATE tasker.queue_flow AS q SET tokens = v_tokens - v_took, refilled_at = v_now
         WHERE q.namespace = v_ns;
    END IF;
    IF v_took < v_budget AND f.key_max_running IS NOT NULL THEN
        -- Fewer than the budget: if steps are ready, the per-key cap held them; come back when
        -- a slot of their key frees (a finished step here, or a recheck).
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgmq.%I AS q WHERE q.vt <= clock_timestamp())', v_table)
           INTO v_ready;
        IF v_ready THEN
            RETURN QUERY SELECT NULL::bigint, NULL::integer, NULL::timestamptz, NULL::timestamptz, NULL::text,
                                NULL::jsonb, NULL::boolean, NULL::timestamptz, 'limited'::text, NULL::float8;
        END IF;
    ELSIF v_budget < p_qty AND v_took = v_budget THEN
        -- Held back by a limit, not by an empty queue: the worker comes back (when the rate
        -- allows the next start, or when a slot frees).
        RETURN QUERY SELECT NULL::bigint, NULL::integer, NULL::timestamptz, NULL::timestamptz, NULL::text,
                            NULL::jsonb, NULL::boolean, NULL::timestamptz, 'limited'::text,
                            CASE WHEN f.rate_count IS NOT NULL AND v_tokens - v_took < 1
                                 THEN (1 - (v_tokens - v_took)) / v_rate END;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
END;
$function$;
