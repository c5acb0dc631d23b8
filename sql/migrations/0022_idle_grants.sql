-- tasker-worker 0022: a queue's grants are written only when a role lacks them (issue 35).
--
-- tasker.grant_queue_table ran its GRANTs on every call, and tasker.create_namespace_queue calls
-- it for the queue and its dead-letter queue whenever a worker starts: a GRANT rewrites the
-- table's pg_class row even when it changes nothing, so every start wrote 10 catalog rows per
-- namespace (500 for a worker on 50 namespaces), which autovacuum later cleaned up in
-- transactions that no logged statement accounts for. Now each role is granted only the
-- privileges it does not hold on the table yet (read from the table's ACL), so a start on
-- existing queues writes nothing; a new queue, or one whose privileges were revoked, is granted
-- exactly as before.

CREATE OR REPLACE FUNCTION tasker.grant_queue_table(p_table regclass)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_archive    regclass;
    v_target     regclass;
    v_role       text;
    v_privileges text[];
    v_missing    text;
BEGIN
    SELECT to_regclass(format('pgmq.%I', 'a_' || substring(c.relname FROM 3))) INTO v_archive
      FROM pg_class AS c WHERE c.oid = p_table;
    -- Producers insert (and read back the msg_id pgmq returns); workers and operators read,
    -- claim (UPDATE), settle (DELETE) and dead-letter (INSERT); operators also purge (TRUNCATE).
    FOR v_target, v_role, v_privileges IN
        SELECT g.target, g.role, g.privileges
          FROM (VALUES (p_table, 'tasker_producer', ARRAY['SELECT', 'INSERT']),
                       (p_table, 'tasker_worker', ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']),
                       (v_archive, 'tasker_worker', ARRAY['SELECT', 'INSERT']),
                       (p_table, 'tasker_operator', ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']),
                       (v_archive, 'tasker_operator', ARRAY['SELECT', 'INSERT', 'DELETE', 'TRUNCATE']))
               AS g(target, role, privileges)
         WHERE g.target IS NOT NULL AND tasker.role_exists(g.role)
    LOOP
        SELECT string_agg(w.privilege, ', ' ORDER BY w.i) INTO v_missing
          FROM unnest(v_privileges) WITH ORDINALITY AS w(privilege, i)
         WHERE NOT EXISTS (SELECT 1 FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a
                            WHERE c.oid = v_target AND a.grantee = v_role::regrole
                              AND a.privilege_type = w.privilege);
        IF v_missing IS NOT NULL THEN
            EXECUTE format('GRANT %s ON %s TO %I', v_missing, v_target, v_role);
        END IF;
    END LOOP;
END;
$$;
