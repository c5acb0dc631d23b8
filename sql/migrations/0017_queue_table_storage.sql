-- tasker-worker 0017: queue tables keep themselves lean (issue 32, "fast for a long time").
--
-- Every step leaves two dead row versions in its queue table (the claim's UPDATE of vt and
-- read_ct, which is never a HOT update since vt is indexed, and the settle's DELETE) and the
-- index entries that point at them. The claim reads the queue oldest first, so it walks the
-- dead entries at the head of the msg_id index until VACUUM removes them; with PostgreSQL's
-- defaults (vacuum at 20% of the table dead, throttled by the cost delay) a long backlog is
-- vacuumed late and slowly, and the claim gets slower as the drain goes on.
--
-- tasker.tune_queue_table sets per-table storage parameters on a queue table: vacuum after 1,000
-- + 1% of the rows are dead, unthrottled (what PgQueuer's `pgq autovac` sets), and analyze
-- often (the claim is planned at every execution: its statistics must follow the queue).
-- Only parameters the table does not have yet are set, so an operator's own value stays, and
-- a table that has them all is not touched (no lock, no catalog write: every worker start
-- creates its namespaces' queues). tasker.create_namespace_queue applies it to the queues it
-- creates; this migration applies it to every tasker queue table that exists.
--
-- The server's autovacuum_naptime (60 s by default) still bounds how often a table is looked
-- at; that is a server setting, not a table's (docs/operations.md).

CREATE FUNCTION tasker.queue_table_storage() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY[
        'autovacuum_vacuum_scale_factor=0.01',
        'autovacuum_vacuum_threshold=1000',
        'autovacuum_analyze_scale_factor=0.02',
        'autovacuum_analyze_threshold=500',
        'autovacuum_vacuum_cost_delay=0',
        'autovacuum_vacuum_cost_limit=10000'
    ]
$$;

-- The parameters of tasker.queue_table_storage() that p_table does not have yet, set; true when
-- it set any.
CREATE FUNCTION tasker.tune_queue_table(p_table regclass) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_missing text[];
BEGIN
    IF p_table IS NULL THEN
        RETURN false;
    END IF;
    SELECT array_agg(s ORDER BY s) INTO v_missing
      FROM unnest(tasker.queue_table_storage()) AS s
     WHERE split_part(s, '=', 1) NOT IN (
               SELECT split_part(o, '=', 1)
                 FROM pg_class AS c, unnest(coalesce(c.reloptions, '{}')) AS o
                WHERE c.oid = p_table);
    IF v_missing IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('ALTER TABLE %s SET (%s)', p_table, array_to_string(v_missing, ', '));
    RETURN true;
END;
$$;

CREATE OR REPLACE FUNCTION tasker.create_namespace_queue(p_namespace text)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_queue text := 'worker_' || tasker.validate_namespace(p_namespace) || '_queue';
BEGIN
    PERFORM pg_advisory_xact_lock(127961897067890);
    PERFORM pgmq.create(v_queue);
    PERFORM pgmq.create(v_queue || '_dlq');
    PERFORM tasker.attach_notify_trigger(tasker.queue_table(v_queue));
    PERFORM tasker.attach_notify_trigger(tasker.queue_table(v_queue || '_dlq'));
    PERFORM tasker.tune_queue_table(tasker.queue_table(v_queue));
    RETURN v_queue;
END;
$$;

REVOKE EXECUTE ON FUNCTION tasker.tune_queue_table(regclass) FROM PUBLIC;

-- The tasker queues that exist (worker_<namespace>_queue; their dead-letter queues are written
-- once and read by people, so they keep PostgreSQL's defaults).
DO $$
DECLARE
    v_table regclass;
BEGIN
    FOR v_table IN
        SELECT c.oid::regclass
          FROM pg_class AS c
         WHERE c.relnamespace = 'pgmq'::regnamespace
           AND c.relname LIKE 'q\_worker\_%\_queue'
           AND c.relkind = 'r'
    LOOP
        PERFORM tasker.tune_queue_table(v_table);
    END LOOP;
END;
$$;
