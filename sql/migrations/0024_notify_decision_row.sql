-- tasker-worker 0024: the send trigger's decision, one row per namespace (issue 35, "NOTIFY at
-- many producers"; the figures in docs/performance.md).
--
-- 0020 made a send skip its notification while every listening worker of the namespace drains
-- it. Its trigger function decided at every INSERT: it read the new rows, the namespace's switch
-- and its listeners' leases, took the skip lock and read the leases again, and PL/pgSQL sets up
-- each of those statements again in every transaction. Measured, that price left producers at
-- 0.69x the trigger-less throughput. Now:
--
-- * tasker.notify_decisions holds what the decision needs, one row per namespace (no row: announce):
--   quiet (its switch, notify = false) and skip_until (every live listening worker holds a drain
--   lease until then). Triggers on tasker.queue_listeners and tasker.queue_notify keep it: each
--   change of a listener's state (a new listener, a lease taken, renewed or released, a row
--   gone or made dead) refreshes its namespace's row, in the same transaction, so that a
--   lease's release and the row's change commit together. A heartbeat that only renews an idle listener
--   changes no decision and writes nothing. Refreshes of a namespace are serialised (an advisory
--   lock, then the state read in a statement of its own): the last one sees every listener's
--   committed state. A listener that died stops counting at the next refresh (another worker's
--   lease renewal); until then skip_until (never later than a listener's alive_until) lapses by
--   itself and sends are announced.
-- * The send trigger decides in its WHEN clause, tasker.notify_wanted(<namespace>): a SQL
--   function (its plans kept for the session) that reads that row twice, around the skip lock,
--   as 0020 did with the leases: when the row says skip, the producer takes the namespace's
--   shared skip lock, then reads the row again in a statement of its own (a snapshot taken
--   after the lock). The handshake of a worker ending its drain (0020's end_drain, then
--   await_skipped_sends) is unchanged. A skipped send runs no trigger function at all.
-- * A delayed message's notification says when to come back, which no drain knows. The WHEN
--   clause cannot see the new rows, so a BEFORE ROW trigger whose own WHEN picks only the rows
--   not visible yet marks the transaction (tasker.delayed_send); a marked transaction's sends
--   are announced (the announcing function clears the mark). Sends visible at once never run
--   it.
-- * tasker.notify_message_ready only announces now. A trigger of the old shape (no WHEN: its
--   replacement waits for the queue table's lock, and gives up after 0.5 s rather than hold up
--   producers; the next tasker.ensure_notify_triggers, at every worker start, tries again)
--   passes no argument, and the function then decides as before, with the same rule.

CREATE TABLE tasker.notify_decisions (
    namespace  text PRIMARY KEY,
    -- notify = false (tasker.queue_notify): the namespace's sends are never announced.
    quiet      boolean NOT NULL DEFAULT false,
    -- Every live listening worker drains the namespace until then (the earliest of their drain
    -- leases and of their alive_until): sends are not announced (NULL: they are).
    skip_until timestamptz
) WITH (fillfactor = 50);  -- room for HOT updates: a drain lease renewed rewrites its row

-- The advisory lock class of a namespace's refresh (one at a time), beside the skip lock's and
-- tasker.set_queue_notify's (+1).
CREATE FUNCTION tasker.decision_lock_class() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT tasker.skip_lock_class() + 2 $$;

-- Recompute the rows of p_namespaces from tasker.queue_notify and tasker.queue_listeners.
CREATE FUNCTION tasker.refresh_notify_decisions(p_namespaces text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_ns    text;
    v_quiet boolean;
    v_until timestamptz;
BEGIN
    -- In one order everywhere: two refreshes of several namespaces never wait for each other in
    -- a circle.
    FOR v_ns IN SELECT DISTINCT ns FROM unnest(p_namespaces) AS ns WHERE ns IS NOT NULL ORDER BY ns LOOP
        PERFORM pg_advisory_xact_lock(tasker.decision_lock_class(), hashtext(v_ns));
        -- A statement of its own, after the lock: it sees what the refresh before it committed.
        SELECT coalesce((SELECT NOT n.notify FROM tasker.queue_notify AS n WHERE n.namespace = v_ns), false),
               (SELECT CASE WHEN bool_and(coalesce(l.draining_until > clock_timestamp(), false))
                            THEN min(least(l.draining_until, l.alive_until)) END
                  FROM tasker.queue_listeners AS l
                 WHERE l.namespace = v_ns AND l.alive_until > clock_timestamp())
          INTO v_quiet, v_until;
        IF v_quiet OR v_until IS NOT NULL THEN
            INSERT INTO tasker.notify_decisions AS d (namespace, quiet, skip_until)
            VALUES (v_ns, v_quiet, v_until)
            ON CONFLICT (namespace) DO UPDATE SET quiet = excluded.quiet, skip_until = excluded.skip_until
             WHERE (d.quiet, d.skip_until) IS DISTINCT FROM (excluded.quiet, excluded.skip_until);
        ELSE
            DELETE FROM tasker.notify_decisions AS d WHERE d.namespace = v_ns;
        END IF;
    END LOOP;
END;
$$;

-- A change of tasker.queue_listeners or tasker.queue_notify refreshes the namespaces whose
-- decision it may change.
CREATE FUNCTION tasker.on_decision_input_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM tasker.refresh_notify_decisions(ARRAY(SELECT n.namespace FROM new_rows AS n));
    ELSIF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'queue_listeners' THEN
        -- Renewing an idle listener's alive_until (every heartbeat) changes nothing: skipped.
        PERFORM tasker.refresh_notify_decisions(ARRAY(
            SELECT n.namespace FROM new_rows AS n
              LEFT JOIN old_rows AS o ON o.namespace = n.namespace AND o.worker_id = n.worker_id
             WHERE o.worker_id IS NULL OR o.draining_until IS DISTINCT FROM n.draining_until
                OR n.alive_until <= clock_timestamp()
            UNION
            SELECT o.namespace FROM old_rows AS o
              LEFT JOIN new_rows AS n ON n.namespace = o.namespace AND n.worker_id = o.worker_id
             WHERE n.worker_id IS NULL));
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM tasker.refresh_notify_decisions(ARRAY(SELECT n.namespace FROM new_rows AS n
                                                      UNION SELECT o.namespace FROM old_rows AS o));
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM tasker.refresh_notify_decisions(ARRAY(SELECT o.namespace FROM old_rows AS o));
    ELSE  -- TRUNCATE
        PERFORM tasker.refresh_notify_decisions(ARRAY(SELECT d.namespace FROM tasker.notify_decisions AS d));
    END IF;
    RETURN NULL;
END;
$$;

-- Run by the triggers below as its owner; nobody else needs it.
REVOKE EXECUTE ON FUNCTION tasker.refresh_notify_decisions(text[]) FROM PUBLIC;

CREATE TRIGGER tasker_listeners_inserted AFTER INSERT ON tasker.queue_listeners
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tasker.on_decision_input_changed();
CREATE TRIGGER tasker_listeners_updated AFTER UPDATE ON tasker.queue_listeners
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION tasker.on_decision_input_changed();
CREATE TRIGGER tasker_listeners_deleted AFTER DELETE ON tasker.queue_listeners
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tasker.on_decision_input_changed();
CREATE TRIGGER tasker_listeners_truncated AFTER TRUNCATE ON tasker.queue_listeners
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.on_decision_input_changed();

CREATE TRIGGER tasker_queue_notify_inserted AFTER INSERT ON tasker.queue_notify
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tasker.on_decision_input_changed();
CREATE TRIGGER tasker_queue_notify_updated AFTER UPDATE ON tasker.queue_notify
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION tasker.on_decision_input_changed();
CREATE TRIGGER tasker_queue_notify_deleted AFTER DELETE ON tasker.queue_notify
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tasker.on_decision_input_changed();
CREATE TRIGGER tasker_queue_notify_truncated AFTER TRUNCATE ON tasker.queue_notify
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.on_decision_input_changed();

SELECT tasker.refresh_notify_decisions(ARRAY(SELECT l.namespace FROM tasker.queue_listeners AS l
                                             UNION SELECT n.namespace FROM tasker.queue_notify AS n));

-- --- the producers' side ------------------------------------------------------------------------

-- Whether a send into the namespace is announced: the send trigger's WHEN clause. Two
-- statements, each with a snapshot of its own: the first takes the skip lock when the row says
-- skip (0020's rule: only a READ COMMITTED producer, and never waiting for the lock), the second
-- reads the row again, after the lock. A send through tasker-core's functions (they announce it
-- themselves) and a quiet namespace's are not announced; a transaction that sent a delayed
-- message (tasker.mark_delayed_send) is announced unless quiet.
-- Anyone who can insert into a queue evaluates it: executable by PUBLIC (it reads one row twice and
-- takes a shared advisory lock, which anyone may).
CREATE FUNCTION tasker.notify_wanted(p_namespace text) RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN current_setting('tasker.announced_by_caller', true) IS DISTINCT FROM 'on'
                 AND current_setting('transaction_isolation') = 'read committed'
                 AND (SELECT d.skip_until FROM tasker.notify_decisions AS d WHERE d.namespace = p_namespace)
                     > clock_timestamp()
                 AND pg_try_advisory_xact_lock_shared(tasker.skip_lock_class(), hashtext(p_namespace))
           THEN set_config('tasker.skip_locked', 'on', true) END;
    SELECT current_setting('tasker.announced_by_caller', true) IS DISTINCT FROM 'on'
       AND coalesce((SELECT NOT d.quiet
                            AND (current_setting('tasker.delayed_send', true) IS NOT DISTINCT FROM 'on'
                                 OR current_setting('tasker.skip_locked', true) IS DISTINCT FROM 'on'
                                 OR NOT coalesce(d.skip_until > clock_timestamp(), false))
                       FROM tasker.notify_decisions AS d WHERE d.namespace = p_namespace), true);
$$;
GRANT EXECUTE ON FUNCTION tasker.notify_wanted(text) TO PUBLIC;

-- The BEFORE ROW trigger's function, run only for a row not visible yet (its WHEN): the
-- transaction's sends are announced (their notification says when to come back).
CREATE FUNCTION tasker.mark_delayed_send() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('tasker.delayed_send', 'on', true);
    RETURN NEW;
END;
$$;

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
    v_delay   integer;
    v_ids     bigint[];
    v_payload text;
    v_channel text;
BEGIN
    SELECT count(*), min(r.msg_id), max(r.msg_id), min(r.vt), max(r.vt)
      INTO v_count, v_min, v_max, v_ready, v_latest
      FROM new_rows AS r;
    IF v_count = 0 THEN
        RETURN NULL;
    END IF;
    IF TG_NARGS = 0 THEN
        -- A trigger of the shape before 0024 (no WHEN, no delayed-row trigger): decide here.
        IF v_latest > clock_timestamp() THEN
            PERFORM set_config('tasker.delayed_send', 'on', true);
        END IF;
        IF NOT tasker.notify_wanted(v_ns) THEN
            RETURN NULL;
        END IF;
    END IF;
    IF current_setting('tasker.delayed_send', true) = 'on' THEN
        PERFORM set_config('tasker.delayed_send', '', true);  -- announced now: later sends may skip
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

-- The longest wait for a queue table's lock when its triggers are replaced by the new shape.
CREATE FUNCTION tasker.trigger_lock_timeout_ms() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 500 $$;

-- Attach the notify triggers to a pgmq queue table (and grant the roles on it), replacing those
-- of an older shape. Refuses any other table: as SECURITY DEFINER it must not attach triggers
-- wherever a caller points it. A table the owner may not put a trigger on (created by another
-- role, without a superuser to run the event trigger) is reported, not fatal: its queue is then
-- found by polling. A table whose lock is not had within tasker.trigger_lock_timeout_ms() keeps
-- its triggers (reported; tried again by the next tasker.ensure_notify_triggers).
CREATE OR REPLACE FUNCTION tasker.attach_notify_trigger(p_table regclass)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_ns      text;
    v_current boolean;
    v_old     boolean;
    v_timeout text := current_setting('lock_timeout');
BEGIN
    IF p_table IS NULL THEN
        RETURN false;
    END IF;
    SELECT tasker.queue_namespace(substring(c.relname FROM 3)) INTO v_ns
      FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
     WHERE c.oid = p_table AND n.nspname = 'pgmq' AND c.relname LIKE 'q\_%' AND c.relkind IN ('r', 'p');
    IF v_ns IS NULL THEN
        RAISE EXCEPTION 'tasker.attach_notify_trigger: % is not a pgmq queue table', p_table
              USING ERRCODE = '22023';
    END IF;
    BEGIN
        PERFORM tasker.grant_queue_table(p_table);
        SELECT bool_or(t.tgname = 'tasker_notify_message_ready'),
               count(*) FILTER (WHERE t.tgname = 'tasker_notify_message_ready' AND t.tgnargs = 1
                                  AND t.tgqual IS NOT NULL) = 1
               AND count(*) FILTER (WHERE t.tgname = 'tasker_mark_delayed_send') = 1
          INTO v_old, v_current
          FROM pg_trigger AS t
         WHERE t.tgrelid = p_table AND t.tgname IN ('tasker_notify_message_ready', 'tasker_mark_delayed_send');
        IF v_current THEN
            RETURN false;
        END IF;
        PERFORM set_config('lock_timeout', tasker.trigger_lock_timeout_ms() || 'ms', true);
        EXECUTE format('DROP TRIGGER IF EXISTS tasker_notify_message_ready ON %s', p_table);
        EXECUTE format('DROP TRIGGER IF EXISTS tasker_mark_delayed_send ON %s', p_table);
        EXECUTE format(
            'CREATE TRIGGER tasker_mark_delayed_send BEFORE INSERT ON %s '
            'FOR EACH ROW WHEN (NEW.vt > clock_timestamp()) '
            'EXECUTE FUNCTION tasker.mark_delayed_send()', p_table);
        EXECUTE format(
            'CREATE TRIGGER tasker_notify_message_ready AFTER INSERT ON %s '
            'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT '
            'WHEN (tasker.notify_wanted(%L)) '
            'EXECUTE FUNCTION tasker.notify_message_ready(%L)', p_table, v_ns, 'decided');
        PERFORM set_config('lock_timeout', v_timeout, true);
    EXCEPTION
        WHEN insufficient_privilege THEN
            RAISE WARNING 'cannot attach the notify trigger to % (%): it is found by polling only',
                          p_table, SQLERRM;
            RETURN false;
        WHEN lock_not_available THEN
            RAISE WARNING 'the notify trigger of % keeps its older shape for now (its lock was not had '
                          'within % ms); the next tasker.ensure_notify_triggers() tries again',
                          p_table, tasker.trigger_lock_timeout_ms();
            RETURN false;
    END;
    RETURN NOT coalesce(v_old, false);
END;
$$;
