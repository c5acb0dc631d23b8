-- tasker-worker 0016: flow control for the whole fleet, held inside the claim.
--
-- * tasker.queue_flow: one row per namespace that has any flow control: paused, a fleet-wide
--   cap on running steps (max_running), a cap per concurrency_key (key_max_running), a rate of
--   starts (a token bucket: rate_count per rate_period_s, at most rate_burst at once), and
--   whether its steps carry priorities or groups (set by the first worker that claims one).
--   A namespace without a row is claimed exactly as before, by the workers' own statement,
--   which only checks that no row exists (one probe of this small table's primary key).
-- * tasker.claim_flow: the claim of a namespace that has a row. Limits are counted and spent
--   under the row's lock, taken before they are counted, so no two workers can both see the
--   last free slot (no check-then-claim race), and each statement after the lock sees every
--   claim committed before it. Running steps are the claimed ones (a tasker_claim header and a
--   vt in the future): a slot held by a worker that died frees when its claim lapses, never
--   earlier. A step held back is not touched (its read count unchanged): it uses no attempt.
-- * Ordering: priority 0 runs first (0-9, default 0), oldest first within a priority; steps
--   with a group are taken round-robin across the groups of a priority.
-- * tasker.pause_queue / resume_queue / set_queue_limits change a row (and delete it when
--   nothing is left), record who did what in tasker.events, and announce the namespace ready,
--   so that listening workers claim at once what they may now take.

CREATE TABLE tasker.queue_flow (
    namespace        text PRIMARY KEY,
    paused           boolean NOT NULL DEFAULT false,
    max_running      integer CHECK (max_running > 0),
    key_max_running  integer CHECK (key_max_running > 0),
    rate_count       integer CHECK (rate_count > 0),
    rate_period_s    double precision CHECK (rate_period_s > 0),
    rate_burst       integer CHECK (rate_burst > 0),
    -- The token bucket: tokens left at refilled_at (spent by claims, refilled with time).
    tokens           double precision,
    refilled_at      timestamptz,
    uses_priority    boolean NOT NULL DEFAULT false,
    uses_groups      boolean NOT NULL DEFAULT false,
    changed_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    changed_by       text,
    CHECK ((rate_count IS NULL) = (rate_period_s IS NULL))
);

-- What a claim orders by. Immutable so that indexes can be built on them (a namespace whose
-- steps carry priorities or groups gets them: tasker-worker builds them concurrently).
CREATE FUNCTION tasker.step_priority(p_message jsonb) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(p_message -> 'priority') = 'number'
                THEN least(9, greatest(0, floor((p_message ->> 'priority')::numeric)))::smallint
                ELSE 0::smallint END
$$;

CREATE FUNCTION tasker.step_group(p_message jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(CASE WHEN jsonb_typeof(p_message -> 'group') = 'string' THEN p_message ->> 'group' END, '')
$$;

CREATE FUNCTION tasker.step_concurrency_key(p_message jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(CASE WHEN jsonb_typeof(p_message -> 'concurrency_key') = 'string'
                         THEN p_message ->> 'concurrency_key' END, '')
$$;

-- Listening workers of the namespace claim again now (a pause lifted, a limit raised).
CREATE FUNCTION tasker.announce_namespace(p_namespace text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('pgmq_message_ready.' || p_namespace,
                     json_build_object('event_type', 'message_ready',
                                       'queue_name', 'worker_' || p_namespace || '_queue',
                                       'namespace', p_namespace, 'message_count', 0,
                                       'ready_at', clock_timestamp(), 'delay_seconds', 0)::text)
$$;

-- A row that holds nothing any more is deleted: its namespace is claimed the plain way again.
CREATE FUNCTION tasker.tidy_queue_flow(p_namespace text) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM tasker.queue_flow AS f
     WHERE f.namespace = p_namespace AND NOT f.paused AND f.max_running IS NULL
       AND f.key_max_running IS NULL AND f.rate_count IS NULL
       AND NOT f.uses_priority AND NOT f.uses_groups
$$;

CREATE FUNCTION tasker.pause_queue(p_namespace text, p_by text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_was boolean;
BEGIN
    PERFORM tasker.validate_namespace(p_namespace);
    SELECT f.paused INTO v_was FROM tasker.queue_flow AS f WHERE f.namespace = p_namespace FOR UPDATE;
    INSERT INTO tasker.queue_flow AS f (namespace, paused, changed_by)
    VALUES (p_namespace, true, p_by)
    ON CONFLICT (namespace) DO UPDATE SET paused = true, changed_at = clock_timestamp(), changed_by = p_by;
    IF NOT coalesce(v_was, false) THEN
        INSERT INTO tasker.events (event_type, queue_name, data)
        VALUES ('QueuePaused', 'worker_' || p_namespace || '_queue',
                jsonb_build_object('namespace', p_namespace, 'by', p_by, 'role', current_user));
        -- Listening workers claim now, find the pause, and give back what they prefetched.
        PERFORM tasker.announce_namespace(p_namespace);
    END IF;
    RETURN NOT coalesce(v_was, false);
END;
$$;

CREATE FUNCTION tasker.resume_queue(p_namespace text, p_by text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_was boolean;
BEGIN
    PERFORM tasker.validate_namespace(p_namespace);
    UPDATE tasker.queue_flow AS f SET paused = false, changed_at = clock_timestamp(), changed_by = p_by
     WHERE f.namespace = p_namespace AND f.paused
    RETURNING true INTO v_was;
    IF coalesce(v_was, false) THEN
        INSERT INTO tasker.events (event_type, queue_name, data)
        VALUES ('QueueResumed', 'worker_' || p_namespace || '_queue',
                jsonb_build_object('namespace', p_namespace, 'by', p_by, 'role', current_user));
        PERFORM tasker.tidy_queue_flow(p_namespace);
        PERFORM tasker.announce_namespace(p_namespace);
    END IF;
    RETURN coalesce(v_was, false);
END;
$$;

-- NULL leaves a setting as it is; 0 removes it. A rate is p_rate_count starts per
-- p_rate_period_s seconds, at most p_rate_burst at once (default 1: evenly spaced starts); a
-- burst given alone changes the burst of the rate in force.
CREATE FUNCTION tasker.set_queue_limits(
    p_namespace       text,
    p_max_running     integer DEFAULT NULL,
    p_key_max_running integer DEFAULT NULL,
    p_rate_count      integer DEFAULT NULL,
    p_rate_period_s   double precision DEFAULT NULL,
    p_rate_burst      integer DEFAULT NULL,
    p_by              text DEFAULT NULL
) RETURNS SETOF tasker.queue_flow
LANGUAGE plpgsql AS $$
DECLARE
    v_row tasker.queue_flow;
BEGIN
    PERFORM tasker.validate_namespace(p_namespace);
    IF p_max_running < 0 OR p_key_max_running < 0 OR p_rate_count < 0 OR p_rate_burst < 0 THEN
        RAISE EXCEPTION 'limits are whole numbers, 0 to remove one' USING ERRCODE = '22023';
    END IF;
    IF p_rate_count > 0 AND NOT coalesce(p_rate_period_s > 0, false) THEN
        RAISE EXCEPTION 'a rate needs a period of more than 0 seconds' USING ERRCODE = '22023';
    END IF;
    INSERT INTO tasker.queue_flow AS f (namespace, changed_by) VALUES (p_namespace, p_by)
    ON CONFLICT (namespace) DO NOTHING;
    UPDATE tasker.queue_flow AS f
       SET max_running     = CASE WHEN p_max_running IS NULL THEN f.max_running
                                  ELSE nullif(p_max_running, 0) END,
           key_max_running = CASE WHEN p_key_max_running IS NULL THEN f.key_max_running
                                  ELSE nullif(p_key_max_running, 0) END,
           rate_count      = CASE WHEN p_rate_count IS NULL THEN f.rate_count ELSE nullif(p_rate_count, 0) END,
           rate_period_s   = CASE WHEN p_rate_count IS NULL THEN f.rate_period_s
                                  WHEN p_rate_count = 0 THEN NULL ELSE p_rate_period_s END,
           -- A burst alone changes the burst of the rate in force (none: nothing to change).
           rate_burst      = CASE WHEN p_rate_count = 0 THEN NULL
                                  WHEN p_rate_count IS NULL AND f.rate_count IS NULL THEN NULL
                                  WHEN p_rate_burst IS NOT NULL THEN nullif(p_rate_burst, 0)
                                  WHEN p_rate_count IS NOT NULL THEN coalesce(f.rate_burst, 1)
                                  ELSE f.rate_burst END,
           -- A new rate starts with a full bucket.
           tokens          = CASE WHEN p_rate_count IS NOT NULL OR p_rate_burst IS NOT NULL THEN NULL ELSE f.tokens END,
           refilled_at     = CASE WHEN p_rate_count IS NOT NULL OR p_rate_burst IS NOT NULL THEN NULL
                                  ELSE f.refilled_at END,
           changed_at      = clock_timestamp(),
           changed_by      = p_by
     WHERE f.namespace = p_namespace
    RETURNING * INTO v_row;
    INSERT INTO tasker.events (event_type, queue_name, data)
    VALUES ('QueueLimitsChanged', 'worker_' || p_namespace || '_queue',
            jsonb_build_object('namespace', p_namespace, 'by', p_by, 'role', current_user,
                               'max_running', v_row.max_running, 'key_max_running', v_row.key_max_running,
                               'rate_count', v_row.rate_count, 'rate_period_s', v_row.rate_period_s,
                               'rate_burst', v_row.rate_burst));
    PERFORM tasker.tidy_queue_flow(p_namespace);
    PERFORM tasker.announce_namespace(p_namespace);
    RETURN QUERY SELECT * FROM tasker.queue_flow AS f WHERE f.namespace = p_namespace;
END;
$$;

-- A worker that claimed a step with a priority or a group says so once: from then on the
-- namespace is claimed in priority order, round-robin across groups.
CREATE FUNCTION tasker.note_flow_fields(p_namespace text, p_priority boolean, p_groups boolean) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO tasker.queue_flow AS f (namespace, uses_priority, uses_groups, changed_by)
    VALUES (p_namespace, p_priority, p_groups, 'worker')
    ON CONFLICT (namespace) DO UPDATE
       SET uses_priority = f.uses_priority OR excluded.uses_priority,
           uses_groups   = f.uses_groups OR excluded.uses_groups
     WHERE (excluded.uses_priority AND NOT f.uses_priority) OR (excluded.uses_groups AND NOT f.uses_groups)
$$;

-- The claim of a namespace under flow control. Returns the claimed messages in the shape of the
-- workers' own claim, and at most one more row with msg_id NULL saying why fewer were taken
-- than asked: 'none' (no flow row: claim the plain way), 'paused', or 'limited' (with
-- retry_after, seconds until the rate allows the next start, when that is what held it back).
CREATE FUNCTION tasker.claim_flow(
    p_queue         text,
    p_qty           integer,
    p_vt            integer,
    p_stamp         jsonb,
    p_worker_id     text,
    p_skip_msgs     bigint[] DEFAULT '{}',
    p_skip_handlers text[] DEFAULT '{}',
    p_announce      boolean DEFAULT false,
    p_store_events  boolean DEFAULT false
)
RETURNS TABLE (msg_id bigint, read_ct integer, enqueued_at timestamptz, last_read_at timestamptz,
               message text, prior_headers jsonb, done boolean, prior_read_at timestamptz,
               hold text, retry_after double precision)
-- As the owner: a worker spends the rate's tokens here, and may not change the flow otherwise.
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
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
                   headers = CASE WHEN m.headers IS NULL THEN $3 ELSE m.headers || $3 END
              FROM ready
             WHERE m.msg_id = ready.msg_id
            RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.message, ready.prior_headers,
                      ready.prior_read_at
        )%2$s%3$s
        SELECT c.msg_id, c.read_ct, c.enqueued_at, c.last_read_at, c.message::text, c.prior_headers,
               d.step_uuid IS NOT NULL, c.prior_read_at, NULL::text, NULL::float8
          FROM claimed AS c
          JOIN chosen AS ch ON ch.msg_id = c.msg_id
          LEFT JOIN LATERAL (
              SELECT s.step_uuid FROM tasker.step_results AS s
               WHERE s.step_uuid = tasker.try_uuid(c.message ->> 'step_uuid')
               LIMIT 1) AS d ON true%4$s
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
$fn$;

-- Who may do what (0008's roles): workers claim and note fields; operators change the flow.
REVOKE EXECUTE ON FUNCTION tasker.pause_queue(text, text), tasker.resume_queue(text, text),
                           tasker.set_queue_limits(text, integer, integer, integer, double precision, integer, text),
                           tasker.claim_flow(text, integer, integer, jsonb, text, bigint[], text[], boolean, boolean),
                           tasker.note_flow_fields(text, boolean, boolean), tasker.tidy_queue_flow(text),
                           tasker.announce_namespace(text)
    FROM PUBLIC;
DO $$
BEGIN
    IF tasker.role_exists('tasker_worker') THEN
        GRANT SELECT ON tasker.queue_flow TO tasker_worker;
        GRANT EXECUTE ON FUNCTION tasker.claim_flow(text, integer, integer, jsonb, text, bigint[], text[], boolean, boolean),
                                  tasker.note_flow_fields(text, boolean, boolean),
                                  tasker.step_priority(jsonb), tasker.step_group(jsonb),
                                  tasker.step_concurrency_key(jsonb)
            TO tasker_worker;
    END IF;
    IF tasker.role_exists('tasker_operator') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON tasker.queue_flow TO tasker_operator;
        GRANT EXECUTE ON FUNCTION tasker.pause_queue(text, text), tasker.resume_queue(text, text),
                                  tasker.set_queue_limits(text, integer, integer, integer, double precision, integer, text),
                                  tasker.tidy_queue_flow(text), tasker.announce_namespace(text)
            TO tasker_operator;
    END IF;
END;
$$;
