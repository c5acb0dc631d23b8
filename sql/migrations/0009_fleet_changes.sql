-- tasker-worker 0009: workers hear at once when the fleet changes; the supervisor may prune outcomes.
--
-- A notified message is claimed by the worker ranked first among the live listening workers of
-- its namespace (domain/herd.py). Each worker reads that list with its heartbeat; a worker that
-- registers, leaves, changes mode or namespaces would otherwise be known to its peers only at
-- their next heartbeat (30 s by default), and until then they would rank without it. One
-- notification per statement that changes who is in the fleet (a heartbeat changes none of
-- these columns, so it sends none) makes every listening worker re-read the list at once.

CREATE OR REPLACE FUNCTION tasker.notify_fleet_changed()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tasker_fleet_changed', '');
    RETURN NULL;
END;
$$;

REVOKE EXECUTE ON FUNCTION tasker.notify_fleet_changed() FROM PUBLIC;

DROP TRIGGER IF EXISTS tasker_fleet_changed ON tasker.workers;
CREATE TRIGGER tasker_fleet_changed
    AFTER INSERT OR DELETE OR UPDATE OF status, deployment_mode, namespaces ON tasker.workers
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.notify_fleet_changed();

-- Retention (fleet/retention.py) runs in the elected supervisor, which is a worker: workers may
-- delete outcome rows (the job deletes only rows past the retention horizon).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tasker_worker') THEN
        GRANT DELETE ON tasker.step_results TO tasker_worker;
    END IF;
END;
$$;
