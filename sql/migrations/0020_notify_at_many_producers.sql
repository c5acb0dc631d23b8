-- tasker-worker 0020: NOTIFY at many producers (docs/operations.md, "Notifications at many
-- producers"; the figures in docs/performance.md).
--
-- A transaction that sent a NOTIFY takes one lock of the whole database at commit (PostgreSQL
-- serialises the commits of notifying transactions to keep the notification queue in commit
-- order), so producers that each notify commit one at a time: measured, a notifying producer
-- fleet sends half as much as one without the trigger. Two ways to send fewer notifications:
--
-- 1. tasker.queue_notify: a namespace's switch. notify = false: the trigger announces nothing
--    of that namespace (its workers claim by polling: Hybrid and PollingOnly at their polling
--    interval, an EventDrivenOnly worker polls such a namespace at that interval too). Written by
--    tasker.set_queue_notify (operators, and a worker whose configuration sets
--    [queues.namespaces.<ns>] notify); no row: notify.
--
-- 2. No notification while every listening worker of the namespace drains it. A listening worker
--    (Hybrid, EventDrivenOnly) keeps a row in tasker.queue_listeners (alive_until, renewed each
--    heartbeat interval). While its claim loop works through a backlog (its last claim came back
--    full, so it claims again without being told) it holds a drain lease on its row
--    (draining_until, seconds ahead, renewed while it drains). A send made while every live
--    listener's lease is valid is not announced: each of them claims again anyway, oldest first.
--    What makes that safe:
--      * The lease alone is not enough: a worker whose last claim ran just before a send
--        committed would stop draining without having seen it. So a producer that skips holds a
--        shared advisory lock of the namespace until its transaction ends, taken *before* it reads
--        the leases (re-read after the lock, in a statement of its own: a fresh snapshot). A worker
--        ending its drain first releases its lease (committed), then takes that lock exclusively
--        (tasker.await_skipped_sends: it waits for every producer that skipped while the lease was
--        visible to commit or roll back), then claims once more. A producer that takes its shared
--        lock after that sees the lease released, so it notifies. A producer never waits for the
--        lock (try-lock): while a worker holds it or waits for it, producers simply notify.
--      * Only a producer in READ COMMITTED skips (the re-read needs a snapshot taken after the
--        lock), and only when every message of the statement is visible now (a delayed message's
--        notification tells workers when to come back).
--      * A namespace nobody listens to is announced as before (no live row: notify), and so is one
--        with any live listener not draining: an idle worker must hear of new steps (pickup
--        latency unchanged), and one that just started or changed mode has no lease.
--      * A worker that dies while draining leaves a lease that lapses by itself (seconds); what was
--        skipped meanwhile is claimed by the other draining workers' last claims, or by the next
--        worker to start (its first claim looks at everything), or by Hybrid's poll.
--    tasker-core's producer functions (0015) announce their own sends and are unchanged.

CREATE TABLE tasker.queue_notify (
    namespace  text PRIMARY KEY,
    notify     boolean NOT NULL DEFAULT true,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    changed_by text
);

CREATE TABLE tasker.queue_listeners (
    namespace      text NOT NULL,
    worker_id      text NOT NULL,
    -- The worker listens for this namespace's notifications until then (renewed each heartbeat
    -- interval): a row of a worker that died stops counting by itself.
    alive_until    timestamptz NOT NULL,
    -- Its claim loop drains the namespace until then (NULL: it does not).
    draining_until timestamptz,
    PRIMARY KEY (namespace, worker_id)
);

-- The advisory lock of a namespace's skipped sends: (this constant, hashtext(namespace)), the
-- two-key form, so it never meets the single-key locks of migrations and the supervisor.
CREATE FUNCTION tasker.skip_lock_class() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1952543595 $$;  -- 'task' in ASCII

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
    v_latest  timestamptz;
    v_notify  boolean;
    v_drained boolean;
    v_delay   integer;
    v_ids     bigint[];
    v_payload text;
    v_channel text;
BEGIN
    IF current_setting('tasker.announced_by_caller', true) = 'on' THEN
        RETURN NULL;
    END IF;
    -- One statement reads the new rows, the namespace's switch and whether every live listening
    -- worker drains it now (NULL when none listens).
    SELECT count(*), min(r.msg_id), max(r.msg_id), min(r.vt), max(r.vt),
           (SELECT n.notify FROM tasker.queue_notify AS n WHERE n.namespace = v_ns),
           (SELECT bool_and(coalesce(l.draining_until > clock_timestamp(), false)) FROM tasker.queue_listeners AS l
             WHERE l.namespace = v_ns AND l.alive_until > clock_timestamp())
      INTO v_count, v_min, v_max, v_ready, v_latest, v_notify, v_drained
      FROM new_rows AS r;
    IF v_count = 0 OR NOT coalesce(v_notify, true) THEN
        RETURN NULL;  -- nothing inserted, or notify = false: its workers poll
    END IF;
    -- Every listening worker drains the namespace: it claims these anyway (see the top of 0020).
    IF coalesce(v_drained, false) AND v_latest <= clock_timestamp()
       AND current_setting('transaction_isolation') = 'read committed' THEN
        -- The lock first, then the leases again in a statement of their own (a snapshot taken
        -- after the lock): a worker that released its lease before we locked is seen released.
        IF pg_try_advisory_xact_lock_shared(tasker.skip_lock_class(), hashtext(v_ns)) THEN
            SELECT bool_and(coalesce(l.draining_until > clock_timestamp(), false)) INTO v_drained
              FROM tasker.queue_listeners AS l
             WHERE l.namespace = v_ns AND l.alive_until > clock_timestamp();
            IF coalesce(v_drained, false) THEN
                RETURN NULL;
            END IF;
        END IF;
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

-- --- the workers' side -------------------------------------------------------------------------

-- A listening worker's rows: one per namespace, alive for p_alive_s (its draining state left as
-- it is); rows of namespaces it no longer serves go, and rows of workers gone for an hour are
-- tidied. Returns each namespace's switch (no row: notify; changed_at: when it went off) and the
-- server's time: a worker polls the namespaces it will not hear of.
CREATE FUNCTION tasker.keep_listening(p_worker_id text, p_namespaces text[], p_alive_s double precision)
RETURNS TABLE (namespace text, notify boolean, changed_at timestamptz, read_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO tasker.queue_listeners AS l (namespace, worker_id, alive_until)
    SELECT DISTINCT tasker.validate_namespace(ns), p_worker_id, clock_timestamp() + make_interval(secs => p_alive_s)
      FROM unnest(p_namespaces) AS ns
    ON CONFLICT ON CONSTRAINT queue_listeners_pkey DO UPDATE SET alive_until = excluded.alive_until;
    DELETE FROM tasker.queue_listeners AS l
     WHERE (l.worker_id = p_worker_id AND NOT (l.namespace = ANY (p_namespaces)))
        OR l.alive_until < clock_timestamp() - interval '1 hour';
    RETURN QUERY
        SELECT ns, coalesce(n.notify, true), n.changed_at, clock_timestamp()
          FROM unnest(p_namespaces) AS ns
          LEFT JOIN tasker.queue_notify AS n ON n.namespace = ns;
END;
$$;

-- The worker stops listening (leaves, or runs PollingOnly now): its rows go.
CREATE FUNCTION tasker.stop_listening(p_worker_id text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM tasker.queue_listeners AS l WHERE l.worker_id = p_worker_id
$$;

-- The worker's claim loop drains the namespace for p_lease_s more seconds (it claims again
-- without being told): taken when a claim comes back full, renewed while it does.
-- Returns the server's time (the lease is valid from this statement's commit on).
CREATE FUNCTION tasker.take_drain(p_namespace text, p_worker_id text, p_lease_s double precision,
                                  p_alive_s double precision) RETURNS timestamptz
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO tasker.queue_listeners AS l (namespace, worker_id, alive_until, draining_until)
    VALUES (tasker.validate_namespace(p_namespace), p_worker_id,
            clock_timestamp() + make_interval(secs => p_alive_s),
            clock_timestamp() + make_interval(secs => p_lease_s))
    ON CONFLICT ON CONSTRAINT queue_listeners_pkey DO UPDATE
       SET alive_until = excluded.alive_until, draining_until = excluded.draining_until
    RETURNING clock_timestamp()
$$;

-- Its drain ended (a claim came back short): producers notify again from the commit of this on.
-- The worker then waits for the sends that skipped meanwhile (tasker.await_skipped_sends) and
-- claims once more.
-- Returns the server's time (no send after this statement's commit skips because of this worker).
CREATE FUNCTION tasker.end_drain(p_namespace text, p_worker_id text) RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE tasker.queue_listeners AS l SET draining_until = NULL
     WHERE l.namespace = p_namespace AND l.worker_id = p_worker_id AND l.draining_until IS NOT NULL;
    RETURN clock_timestamp();
END;
$$;

-- Wait until every transaction that skipped the notification of a send into the namespace has
-- ended (each holds the shared lock until then), at most p_timeout_ms: true when none is left.
-- Called after tasker.end_drain committed (or after the lease lapsed); a claim that starts after
-- a true sees all their messages. While this waits, producers do not skip (their try-lock fails).
CREATE FUNCTION tasker.await_skipped_sends(p_namespace text, p_timeout_ms integer) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('lock_timeout', greatest(p_timeout_ms, 1) || 'ms', true);
    PERFORM pg_advisory_xact_lock(tasker.skip_lock_class(), hashtext(p_namespace));
    RETURN true;
EXCEPTION WHEN lock_not_available THEN
    RETURN false;
END;
$$;

-- A namespace's switch (notify = false: no notification of its sends). Returns whether it
-- changed; a change is recorded in tasker.events and announced, so that listening workers
-- re-read it at once (and poll a namespace that went quiet).
CREATE FUNCTION tasker.set_queue_notify(p_namespace text, p_notify boolean, p_by text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_was boolean;
BEGIN
    PERFORM tasker.validate_namespace(p_namespace);
    IF p_notify IS NULL THEN
        RAISE EXCEPTION 'notify must be true or false' USING ERRCODE = '22023';
    END IF;
    -- One change at a time per namespace (two workers starting with different settings).
    PERFORM pg_advisory_xact_lock(tasker.skip_lock_class() + 1, hashtext(p_namespace));
    SELECT n.notify INTO v_was FROM tasker.queue_notify AS n WHERE n.namespace = p_namespace;
    IF coalesce(v_was, true) = p_notify THEN
        RETURN false;
    END IF;
    IF p_notify THEN
        DELETE FROM tasker.queue_notify AS n WHERE n.namespace = p_namespace;  -- the default
    ELSE
        INSERT INTO tasker.queue_notify AS n (namespace, notify, changed_by)
        VALUES (p_namespace, false, p_by)
        ON CONFLICT (namespace) DO UPDATE SET notify = false, changed_at = clock_timestamp(), changed_by = p_by;
    END IF;
    INSERT INTO tasker.events (event_type, queue_name, data)
    VALUES ('QueueNotifyChanged', 'worker_' || p_namespace || '_queue',
            jsonb_build_object('namespace', p_namespace, 'notify', p_notify, 'by', p_by, 'role', current_user));
    PERFORM tasker.announce_namespace(p_namespace);
    RETURN true;
END;
$$;

-- Who may do what (0008's roles): workers keep their rows and leases and apply their
-- configuration's switch; operators set switches; both read the tables.
REVOKE EXECUTE ON FUNCTION tasker.keep_listening(text, text[], double precision), tasker.stop_listening(text),
                           tasker.take_drain(text, text, double precision, double precision),
                           tasker.end_drain(text, text), tasker.await_skipped_sends(text, integer),
                           tasker.set_queue_notify(text, boolean, text)
    FROM PUBLIC;
DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['tasker_worker', 'tasker_operator'] LOOP
        IF tasker.role_exists(v_role) THEN
            EXECUTE format('GRANT SELECT ON tasker.queue_notify, tasker.queue_listeners TO %I', v_role);
            EXECUTE format('GRANT EXECUTE ON FUNCTION tasker.keep_listening(text, text[], double precision), '
                           'tasker.stop_listening(text), '
                           'tasker.take_drain(text, text, double precision, double precision), '
                           'tasker.end_drain(text, text), tasker.await_skipped_sends(text, integer), '
                           'tasker.set_queue_notify(text, boolean, text) TO %I', v_role);
        END IF;
    END LOOP;
END;
$$;
