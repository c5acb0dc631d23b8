-- tasker-worker 0008: least privilege.
--
-- 1. What runs inside a producer's statement costs the producer nothing. The per-queue notify
--    trigger and the queue-created event trigger used to run with the caller's privileges and
--    call into schema tasker, so after our migrations a role that could send on plain pgmq got
--    "permission denied for schema tasker". They are now SECURITY DEFINER (they run as the
--    schema's owner) with search_path pinned to pg_catalog, pg_temp, every name inside
--    schema-qualified. That gives the caller no new power: the notify trigger only sends one
--    notification derived from the rows the caller inserted (which the caller could send
--    itself); the event trigger only attaches that same trigger, and grants the roles below,
--    on pgmq queue tables, naming the table through regclass (no text from the caller reaches
--    the dynamic SQL). Granting USAGE on schema tasker to PUBLIC was the alternative; it would
--    have exposed every tasker function to every role of the database.
--
-- 2. Three NOLOGIN group roles that a DBA grants to login roles:
--      tasker_producer  send steps (tasker.send_step, pgmq.send/send_batch on queue tables),
--                       read outcomes and the event log;
--      tasker_worker    claim, settle, retry, dead-letter, heartbeat, write events, create the
--                       queues of its namespaces (through tasker.create_namespace_queue); no
--                       DDL of its own, owns nothing;
--      tasker_operator  everything a worker may, plus requeue dead letters, purge queues,
--                       switch deployment modes, read everything.
--    Roles belong to the cluster: created here when missing and when the migrating role may
--    (CREATEROLE); the grants are per database. Queue tables get their grants when they appear
--    (tasker.attach_notify_trigger, called from every place a queue table is created or found).
--    `db migrate` remains the one command that needs ownership.

DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['tasker_producer', 'tasker_worker', 'tasker_operator'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE NOTICE 'role % not created (the migrating role lacks CREATEROLE): '
                             'create it and run `tasker-worker db migrate` again', v_role;
            END;
        END IF;
    END LOOP;
END;
$$;

-- Which roles exist (each grant below is made only for those).
CREATE OR REPLACE FUNCTION tasker.role_exists(p_role text)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = p_role);
$$;

-- The privileges of the three roles on one queue table (and its archive): producers insert
-- (and read back the msg_id pgmq returns); workers and operators read, claim (UPDATE), settle
-- (DELETE) and dead-letter (INSERT); operators also purge (TRUNCATE).
CREATE OR REPLACE FUNCTION tasker.grant_queue_table(p_table regclass)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_archive regclass;
BEGIN
    SELECT to_regclass(format('pgmq.%I', 'a_' || substring(c.relname FROM 3))) INTO v_archive
      FROM pg_class AS c WHERE c.oid = p_table;
    IF tasker.role_exists('tasker_producer') THEN
        EXECUTE format('GRANT SELECT, INSERT ON %s TO tasker_producer', p_table);
    END IF;
    IF tasker.role_exists('tasker_worker') THEN
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO tasker_worker', p_table);
        IF v_archive IS NOT NULL THEN
            EXECUTE format('GRANT SELECT, INSERT ON %s TO tasker_worker', v_archive);
        END IF;
    END IF;
    IF tasker.role_exists('tasker_operator') THEN
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON %s TO tasker_operator', p_table);
        IF v_archive IS NOT NULL THEN
            EXECUTE format('GRANT SELECT, INSERT, DELETE, TRUNCATE ON %s TO tasker_operator', v_archive);
        END IF;
    END IF;
END;
$$;

-- Attach the notify trigger to a pgmq queue table (and grant the roles on it). Refuses any
-- other table: as SECURITY DEFINER it must not attach triggers wherever a caller points it.
-- A table the owner may not put a trigger on (created by another role, without a superuser
-- to run the event trigger) is reported, not fatal: its queue is then found by polling.
CREATE OR REPLACE FUNCTION tasker.attach_notify_trigger(p_table regclass)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_table IS NULL THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
                    WHERE c.oid = p_table AND n.nspname = 'pgmq' AND c.relname LIKE 'q\_%'
                      AND c.relkind IN ('r', 'p')) THEN
        RAISE EXCEPTION 'tasker.attach_notify_trigger: % is not a pgmq queue table', p_table
              USING ERRCODE = '22023';
    END IF;
    BEGIN
        PERFORM tasker.grant_queue_table(p_table);
        IF EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgrelid = p_table AND tgname = 'tasker_notify_message_ready') THEN
            RETURN false;
        END IF;
        EXECUTE format(
            'CREATE TRIGGER tasker_notify_message_ready AFTER INSERT ON %s '
            'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT '
            'EXECUTE FUNCTION tasker.notify_message_ready()', p_table);
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE WARNING 'cannot attach the notify trigger to % (%): it is found by polling only',
                      p_table, SQLERRM;
        RETURN false;
    END;
    RETURN true;
END;
$$;

ALTER FUNCTION tasker.notify_message_ready() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION tasker.on_queue_table_created() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
-- Workers call these at startup; they only create a namespace's queues (validated name) and
-- attach the notify trigger, so they run as the owner and a worker needs no DDL privilege.
ALTER FUNCTION tasker.ensure_notify_triggers() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION tasker.create_namespace_queue(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
-- Creates a missing dead-letter queue (DDL) before moving messages there.
ALTER FUNCTION tasker.dead_letter_steps(text, text, bigint[], integer[], text[], jsonb[], timestamptz[],
                                        timestamptz[], text[], boolean)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Nothing in schema tasker is anyone's by default; each role gets what it needs.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA tasker FROM PUBLIC;

DO $$
DECLARE
    v_table regclass;
BEGIN
    IF tasker.role_exists('tasker_producer') THEN
        GRANT USAGE ON SCHEMA tasker, pgmq TO tasker_producer;
        GRANT EXECUTE ON FUNCTION tasker.send_step(text, text, jsonb, integer, uuid, uuid, integer, double precision),
                                  tasker.validate_namespace(text), tasker.validate_handler(text),
                                  tasker.queue_namespace(text), tasker.queue_table(text), tasker.try_uuid(text),
                                  tasker.outcome_events(integer, text, text, jsonb, timestamptz, timestamptz,
                                                        timestamptz, boolean)
            TO tasker_producer;
        GRANT SELECT ON pgmq.meta TO tasker_producer;
        GRANT SELECT ON tasker.schema_migrations, tasker.step_results, tasker.events, tasker.event_log TO tasker_producer;
    END IF;
    IF tasker.role_exists('tasker_worker') THEN
        GRANT USAGE ON SCHEMA tasker, pgmq TO tasker_worker;
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA tasker TO tasker_worker;
        REVOKE EXECUTE ON FUNCTION tasker.attach_notify_trigger(regclass), tasker.grant_queue_table(regclass),
                                   tasker.requeue_dead_letters(text, bigint[]),
                                   tasker.request_mode(text, text, text)
            FROM tasker_worker;
        GRANT SELECT ON pgmq.meta TO tasker_worker;
        GRANT SELECT ON tasker.schema_migrations, tasker.event_log TO tasker_worker;
        GRANT SELECT, INSERT ON tasker.step_results TO tasker_worker;
        GRANT SELECT, INSERT, UPDATE, DELETE ON tasker.workers, tasker.worker_heartbeats, tasker.events,
                                                tasker.event_snapshots
            TO tasker_worker;
    END IF;
    IF tasker.role_exists('tasker_operator') THEN
        IF tasker.role_exists('tasker_worker') THEN
            GRANT tasker_worker TO tasker_operator;
        END IF;
        GRANT USAGE ON SCHEMA tasker, pgmq TO tasker_operator;
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA tasker TO tasker_operator;
        REVOKE EXECUTE ON FUNCTION tasker.attach_notify_trigger(regclass), tasker.grant_queue_table(regclass)
            FROM tasker_operator;
        GRANT SELECT ON ALL TABLES IN SCHEMA tasker TO tasker_operator;
        GRANT SELECT ON ALL TABLES IN SCHEMA pgmq TO tasker_operator;
    END IF;
    FOR v_table IN
        SELECT c.oid::regclass FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
         WHERE n.nspname = 'pgmq' AND c.relname LIKE 'q\_%' AND c.relkind IN ('r', 'p')
           AND NOT c.relispartition
    LOOP
        PERFORM tasker.grant_queue_table(v_table);
    END LOOP;
END;
$$;
