-- tasker-worker 0021: partitioned outcome history (issue 35).
--
-- tasker.step_results becomes a table partitioned by RANGE (uuid_time), the time written in the
-- step's own step_uuid (UUIDv7, RFC 9562): one partition per UTC day, created ahead by the
-- elected supervisor, and retention drops a whole day instead of deleting its rows.
--
-- Why the step_uuid's time and not the time the outcome was recorded: PostgreSQL can only keep
-- a key unique within each partition, so "one outcome row per step_uuid" holds across the
-- table only if every row a step_uuid can ever have lands in the same partition. uuid_time is a
-- function of the step_uuid alone (tasker.uuid_time), so it does: two runs of one step, two
-- copies of its message, a cancel racing a settle all insert into the partition of that
-- step_uuid, whose primary key (step_uuid) makes the second INSERT do nothing, as before. A
-- partition by recorded time would put a step settled just before midnight and its duplicate
-- settled just after into two partitions, each with its own key.
--
-- * uuid_time = tasker.uuid_time(step_uuid): the UUIDv7 time, or 'epoch' for any other uuid
--   (v4 from clients, v5 of schedule ticks). A CHECK on every partition written from now on holds
--   writers to it. Our producers (tasker.step_message, the Python client) now make UUIDv7s.
-- * Partitions: step_results_unstamped (MINVALUE to 1970-01-02) holds the rows of other uuids
--   and every row written before this migration (they are stamped 'epoch'); retention deletes
--   its rows as before. step_results_YYYYMMDD, one per day, created ahead by the supervisor
--   (tasker.create_history_partition) and dropped whole by retention
--   (tasker.drop_history_partition). step_results_default takes a UUIDv7 whose day has no
--   partition (a clock far ahead, a day already dropped, a supervisor down for days): a settle
--   never fails for want of a partition; creating a day moves its rows there.
-- * Every lookup by step_uuid (the claim's dedup probe through tasker.recorded_step_uuids,
--   claim_steps, enqueue_step, cancel_step, the producer's result) asks for
--   uuid_time IN (tasker.uuid_time(u), 'epoch'): pruned at run time to the step's partition and
--   the unstamped one, an index lookup each. The 'epoch' branch finds the rows written before
--   this migration, a UUIDv7 among them filed as 'epoch'.
-- * Every outcome INSERT writes uuid_time and says ON CONFLICT DO NOTHING (no target: the
--   arbiter is the primary key of the partition the row goes to; the table as a whole has no
--   key on step_uuid alone). An INSERT written for the table before this migration, ON
--   CONFLICT (step_uuid), now fails: stop workers of an earlier version before migrating (as
--   for 0005; their steps come back after their vt and run on new workers).
--
-- A populated table is converted without a long lock: `tasker-worker db migrate` first adds the
-- column (a catalog change) and a CHECK (uuid_time = 'epoch'), validated while the step path
-- writes on (SHARE UPDATE EXCLUSIVE), each in its own short transaction; this file then only
-- renames the table, attaches it as the unstamped partition (the validated CHECK proves its
-- bound: no scan) and creates the parent and the default partition. See docs/operations.md,
-- "Upgrading a populated outcome table".

-- Waiting longer than this for a reader of step_results to finish fails the migration (retry
-- it) instead of stopping the step path behind the migration's lock.
SET LOCAL lock_timeout = '10s';

-- The time a step_uuid carries: its UUIDv7 timestamp (version 7, RFC variant, after
-- 1970-01-02), else 'epoch'. A plain expression, inlined where it is used.
CREATE OR REPLACE FUNCTION tasker.uuid_time(p_uuid uuid)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN get_byte(uuid_send(p_uuid), 6) >> 4 = 7 AND get_byte(uuid_send(p_uuid), 8) >> 6 = 2
                 AND ('x' || encode(substring(uuid_send(p_uuid) FROM 1 FOR 6), 'hex'))::bit(48)::bigint >= 86400000
                THEN to_timestamp(('x' || encode(substring(uuid_send(p_uuid) FROM 1 FOR 6), 'hex'))::bit(48)::bigint
                                  / 1000.0)
                ELSE timestamptz 'epoch' END
$$;

-- A UUIDv7 stamped p_at (the server's clock by default): PostgreSQL 18's uuidv7() written
-- for the servers before it, with a time to choose (tests and benchmarks stamp the past).
CREATE OR REPLACE FUNCTION tasker.uuid_v7(p_at timestamptz DEFAULT clock_timestamp())
RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                  PLACING substring(int8send(floor(extract(epoch FROM p_at) * 1000)::bigint) FROM 3) FROM 1 FOR 6),
                  52, 1), 53, 1), 'hex')::uuid
$$;

-- The grants of one table given on another too (a partition gets what the table has: who may
-- read, write and prune outcomes reaches them through either).
CREATE OR REPLACE FUNCTION tasker.copy_grants(p_from regclass, p_to regclass)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_grant record;
BEGIN
    FOR v_grant IN
        SELECT a.privilege_type, a.grantee
          FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a
         WHERE c.oid = p_from AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON %s TO %s', v_grant.privilege_type, p_to,
                       CASE WHEN v_grant.grantee = 0 THEN 'PUBLIC'
                            ELSE quote_ident(pg_get_userbyid(v_grant.grantee)) END);
    END LOOP;
END;
$$;

-- A table not big enough to need it converts inside this transaction; a big one that
-- `db migrate` did not prepare first (the file applied some other way) is refused, not locked
-- for the length of a scan.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'tasker.step_results'::regclass
                      AND conname = 'step_results_unstamped_epoch' AND convalidated)
       AND pg_relation_size('tasker.step_results') > 256 * 1024 * 1024 THEN
        RAISE EXCEPTION 'tasker.step_results is % and not prepared for partitioning',
                        pg_size_pretty(pg_relation_size('tasker.step_results'))
              USING HINT = 'run tasker-worker db migrate, which prepares it online first '
                           '(docs/operations.md, "Upgrading a populated outcome table")';
    END IF;
END;
$$;

ALTER TABLE tasker.step_results ADD COLUMN IF NOT EXISTS uuid_time timestamptz NOT NULL DEFAULT 'epoch';
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'tasker.step_results'::regclass AND conname = 'step_results_unstamped_epoch') THEN
        ALTER TABLE tasker.step_results
            ADD CONSTRAINT step_results_unstamped_epoch CHECK (uuid_time = 'epoch') NOT VALID;
    END IF;
END;
$$;
-- Nothing to do when `db migrate` validated it before this transaction.
ALTER TABLE tasker.step_results VALIDATE CONSTRAINT step_results_unstamped_epoch;

ALTER TABLE tasker.step_results RENAME TO step_results_unstamped;
ALTER INDEX tasker.step_results_pkey RENAME TO step_results_unstamped_pkey;
ALTER INDEX tasker.step_results_finished_brin RENAME TO step_results_unstamped_finished_brin;

CREATE TABLE tasker.step_results (
    step_uuid      uuid NOT NULL,
    task_uuid      uuid,
    correlation_id uuid,
    namespace      text NOT NULL,
    queue_name     text NOT NULL,
    msg_id         bigint NOT NULL,
    handler        text,
    status         text NOT NULL,
    result         jsonb,
    error          jsonb,
    attempts       integer NOT NULL,
    worker_id      text NOT NULL,
    enqueued_at    timestamptz,
    started_at     timestamptz,
    finished_at    timestamptz NOT NULL,
    source         text,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    claimed_at     timestamptz,
    events_stored  boolean NOT NULL DEFAULT false,
    uuid_time      timestamptz NOT NULL DEFAULT 'epoch',
    CONSTRAINT step_results_source_check CHECK (source = ANY (ARRAY['event', 'poll'])),
    CONSTRAINT step_results_status_check
        CHECK (status = ANY (ARRAY['succeeded', 'failed', 'dead_lettered', 'cancelled']))
) PARTITION BY RANGE (uuid_time);

-- Its validated CHECK (uuid_time = 'epoch') proves the bound: attached without a scan.
ALTER TABLE tasker.step_results
    ATTACH PARTITION tasker.step_results_unstamped FOR VALUES FROM (MINVALUE) TO ('1970-01-02 00:00:00+00');
-- Adopts the unstamped partition's BRIN index (same definition) instead of building one.
CREATE INDEX step_results_finished_brin ON tasker.step_results USING brin (finished_at);
-- Rows written from now on are filed under their step_uuid's time (a UUIDv7 goes elsewhere);
-- the rows already there (some of them UUIDv7s filed as 'epoch') are left as they are.
ALTER TABLE tasker.step_results_unstamped
    ADD CONSTRAINT step_results_unstamped_stamped CHECK (uuid_time = tasker.uuid_time(step_uuid)) NOT VALID;
SELECT tasker.copy_grants('tasker.step_results_unstamped', 'tasker.step_results');

-- A new partition, not attached yet: the table's columns, defaults and CHECKs, its own key on
-- step_uuid (exactly once within it), rows held to their step_uuid's time, the table's grants.
CREATE OR REPLACE FUNCTION tasker.new_history_partition(p_name text)
RETURNS regclass
LANGUAGE plpgsql AS $$
DECLARE
    v_leaf regclass;
BEGIN
    EXECUTE format('CREATE TABLE tasker.%I (LIKE tasker.step_results INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   p_name);
    v_leaf := format('tasker.%I', p_name)::regclass;
    EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I PRIMARY KEY (step_uuid), '
                   'ADD CONSTRAINT %I CHECK (uuid_time = tasker.uuid_time(step_uuid))',
                   v_leaf, p_name || '_pkey', p_name || '_stamped');
    PERFORM tasker.copy_grants('tasker.step_results', v_leaf);
    RETURN v_leaf;
END;
$$;

SELECT tasker.new_history_partition('step_results_default');
ALTER TABLE tasker.step_results ATTACH PARTITION tasker.step_results_default DEFAULT;

-- The partitions, each with its kind ('unstamped', 'default' or 'day'), its bounds and its
-- estimated rows, oldest first.
CREATE OR REPLACE FUNCTION tasker.history_partitions()
RETURNS TABLE (name text, kind text, from_time timestamptz, to_time timestamptz, estimated_rows bigint)
LANGUAGE sql STABLE AS $$
    SELECT c.relname::text,
           CASE WHEN b.bound = 'DEFAULT' THEN 'default'
                WHEN b.bound LIKE '%(MINVALUE)%' THEN 'unstamped'
                ELSE 'day' END,
           (regexp_match(b.bound, 'FROM \(''([^'']*)''\)'))[1]::timestamptz,
           (regexp_match(b.bound, 'TO \(''([^'']*)''\)'))[1]::timestamptz,
           greatest(c.reltuples, 0)::bigint
      FROM pg_catalog.pg_inherits AS i
      JOIN pg_catalog.pg_class AS c ON c.oid = i.inhrelid
     CROSS JOIN LATERAL (SELECT pg_catalog.pg_get_expr(c.relpartbound, c.oid) AS bound) AS b
     WHERE i.inhparent = 'tasker.step_results'::regclass
     ORDER BY 4 NULLS FIRST, 1
$$;

-- The partition of one UTC day, unless one covers it; returns whether it was created. Rows of
-- that day that went to the default partition meanwhile move into it. The table is held
-- exclusively for the moment of the change (waited for at most p_lock_timeout_ms: false with
-- nothing done, the next run tries again), because a statement planned with the partitions of
-- before would go wrong after it: an INSERT routed to the default partition is refused there
-- once the day is out of its bounds (a settle must never fail), and a dedup probe pruned to the
-- default partition would not see a row that moved out of it, or one written into the new
-- partition since (a step would run twice). Every statement on step_results holds a lock on
-- the table from its planning to its end: none planned before the change runs after it.
CREATE OR REPLACE FUNCTION tasker.create_history_partition(p_day date, p_lock_timeout_ms integer DEFAULT 1000)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_from timestamptz := p_day::timestamp AT TIME ZONE 'UTC';
    v_to   timestamptz := (p_day + 1)::timestamp AT TIME ZONE 'UTC';
    v_name text := 'step_results_' || to_char(p_day, 'YYYYMMDD');
    v_leaf regclass;
BEGIN
    -- One partition change at a time (two supervisors for a moment, an operator by hand).
    PERFORM pg_advisory_xact_lock(hashtextextended('tasker.step_results partitions', 6136));
    IF EXISTS (SELECT 1 FROM tasker.history_partitions() AS p
                WHERE p.kind = 'day' AND p.from_time < v_to AND p.to_time > v_from) THEN
        RETURN false;
    END IF;
    PERFORM set_config('lock_timeout', p_lock_timeout_ms || 'ms', true);
    BEGIN
        LOCK TABLE ONLY tasker.step_results IN ACCESS EXCLUSIVE MODE;
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
    v_leaf := tasker.new_history_partition(v_name);
    EXECUTE format('WITH moved AS (DELETE FROM tasker.step_results_default AS d '
                   'WHERE d.uuid_time >= $1 AND d.uuid_time < $2 RETURNING d.*) '
                   'INSERT INTO %s SELECT * FROM moved', v_leaf)
        USING v_from, v_to;
    EXECUTE format('ALTER TABLE tasker.step_results ATTACH PARTITION %s FOR VALUES FROM (%L) TO (%L)',
                   v_leaf, v_from, v_to);
    RETURN true;
END;
$$;

-- Retention of one day partition: dropped whole only when nothing it holds may still be
-- needed to recognise a step, and the answer why not otherwise:
--   'not_due'     its day ends after p_cutoff (now minus the longest outcome horizon);
--   'queued'      a worker queue holds a message of a step of that day: its outcome row, if
--                 recorded, must stay to deduplicate it;
--   'recent_rows' a row in it finished at or after p_cutoff (a step delayed past its day);
--   'locked'      the table's exclusive lock was not had within p_lock_timeout_ms;
--   'dropped'.
-- The recent-rows check runs under the lock that the DROP needs, so no outcome recorded after
-- it is dropped with the partition.
CREATE OR REPLACE FUNCTION tasker.drop_history_partition(p_name text, p_cutoff timestamptz,
                                                         p_lock_timeout_ms integer DEFAULT 1000)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_part   record;
    v_queue  text;
    v_found  boolean;
BEGIN
    SELECT * INTO v_part FROM tasker.history_partitions() AS p WHERE p.name = p_name AND p.kind = 'day';
    IF NOT FOUND THEN
        RAISE EXCEPTION '% is not a day partition of tasker.step_results', p_name USING ERRCODE = '22023';
    END IF;
    IF v_part.to_time > p_cutoff THEN
        RETURN 'not_due';
    END IF;
    FOR v_queue IN
        SELECT m.queue_name FROM pgmq.meta AS m WHERE m.queue_name ~ '^worker_[a-z][a-z0-9_]*_queue$'
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgmq.%I AS q WHERE jsonb_typeof(q.message) = ''object'' '
                       'AND tasker.uuid_time(tasker.try_uuid(q.message ->> ''step_uuid'')) >= $1 '
                       'AND tasker.uuid_time(tasker.try_uuid(q.message ->> ''step_uuid'')) < $2)',
                       pgmq.format_table_name(v_queue, 'q'))
            INTO v_found USING v_part.from_time, v_part.to_time;
        IF v_found THEN
            RETURN 'queued';
        END IF;
    END LOOP;
    PERFORM pg_advisory_xact_lock(hashtextextended('tasker.step_results partitions', 6136));
    PERFORM set_config('lock_timeout', p_lock_timeout_ms || 'ms', true);
    BEGIN
        LOCK TABLE ONLY tasker.step_results IN ACCESS EXCLUSIVE MODE;
    EXCEPTION WHEN lock_not_available THEN
        RETURN 'locked';
    END;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM tasker.%I AS r WHERE r.finished_at >= $1)', p_name)
        INTO v_found USING p_cutoff;
    IF v_found THEN
        RETURN 'recent_rows';
    END IF;
    EXECUTE format('DROP TABLE tasker.%I', p_name);
    RETURN 'dropped';
END;
$$;

-- The step_uuids among p_step_uuids that have an outcome row: the dedup probe of a claimed
-- batch. For each, an index lookup in the partition of its day and in the unstamped one (the
-- rows of before 0021, a UUIDv7 among them filed as 'epoch'), pruned at run time. A function of
-- its own so that the claim that calls it is planned without the partitions (its planning grew
-- with their number: 1.4 ms for a claim of one with 16), and on a generic plan kept for the
-- session: the lookups are by key whatever the statistics, unlike a claim's read of a queue.
-- enable_seqscan off holds it to that: planned while a partition was empty (today's, created
-- ahead), the plan read it whole, and kept while the day filled, a scan per claimed step made a
-- claim of 100 cost 35 ms instead of 3 ms over 10,000,000 rows (benchmarks/history.py).
-- VOLATILE, so that its lookup reads with a snapshot of its own, taken after its plan's locks:
-- the partitions it was planned with and the rows it sees are of one moment. (STABLE, it would
-- read with its caller's snapshot, older than a day partition created while the claim waited for
-- the lock: planned with the new partition, reading the rows of before, it would miss a row
-- moved into it from the default partition.)
CREATE OR REPLACE FUNCTION tasker.recorded_step_uuids(p_step_uuids uuid[])
RETURNS SETOF uuid
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
BEGIN
    RETURN QUERY
    SELECT k.u FROM unnest(p_step_uuids) AS k(u)
     CROSS JOIN LATERAL (
         SELECT 1 FROM tasker.step_results AS s
          WHERE s.step_uuid = k.u AND s.uuid_time IN (tasker.uuid_time(k.u), 'epoch')
          LIMIT 1) AS d;
END;
$$;

-- The view bound the table it was created on (now the unstamped partition): to the new one.
CREATE OR REPLACE VIEW tasker.event_log AS
SELECT e.event_id, e.event_type, e.worker_id, e.step_uuid, e.queue_name, e.msg_id, e.data,
       e.occurred_at, false AS derived
  FROM tasker.events AS e
UNION ALL
SELECT NULL::bigint, 'StepAssigned', e.worker_id, e.step_uuid, e.queue_name, e.msg_id,
       jsonb_build_object('read_ct', (e.data ->> 'attempt')::integer),
       (e.data ->> 'claimed_at')::timestamptz, true
  FROM tasker.events AS e
 WHERE e.step_uuid IS NOT NULL AND e.data ? 'claimed_at'
UNION ALL
SELECT NULL::bigint, o.event_type, r.worker_id, r.step_uuid, r.queue_name, r.msg_id, o.data,
       o.occurred_at, true
  FROM tasker.step_results AS r
 CROSS JOIN LATERAL tasker.outcome_events(r.attempts, r.status, r.source, r.error, r.claimed_at,
                                          r.started_at, r.finished_at) AS o
 WHERE NOT r.events_stored;

-- Every outcome INSERT files its row under the step_uuid's time, with no conflict target; every
-- lookup by step_uuid prunes to the step's partition and the unstamped one. Otherwise as before.

CREATE OR REPLACE FUNCTION tasker.dead_letter_steps(p_queue text, p_worker_id text, p_msg_ids bigint[], p_read_cts integer[], p_statuses text[], p_errors jsonb[], p_started_at timestamp with time zone[], p_finished_at timestamp with time zone[], p_sources text[], p_store_events boolean DEFAULT NULL::boolean)
 RETURNS TABLE(msg_id bigint, moved boolean)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_dlq    text := p_queue || '_dlq';
    v_stored boolean := coalesce(p_store_events, tasker.step_events_stored());
BEGIN
    IF tasker.queue_table(v_dlq) IS NULL THEN
        PERFORM pgmq.create(v_dlq);
        PERFORM tasker.attach_notify_trigger(tasker.queue_table(v_dlq));
    END IF;
    RETURN QUERY EXECUTE format($sql$
        WITH input AS (
            SELECT * FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::jsonb[],
                                 $5::timestamptz[], $6::timestamptz[], $7::text[])
                AS i(msg_id, read_ct, status, error, started_at, finished_at, source)
        ), taken AS (
            DELETE FROM pgmq.%1$I AS q
             USING input AS i
             WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct
            RETURNING q.msg_id, q.read_ct, q.enqueued_at, q.last_read_at, q.message, q.headers,
                      i.status, i.error, i.started_at, i.finished_at, i.source
        ), dead AS (
            INSERT INTO pgmq.%2$I (vt, message, headers)
            SELECT clock_timestamp(), t.message,
                   coalesce(t.headers, '{}'::jsonb) || jsonb_build_object('tasker_dlq',
                       jsonb_build_object(
                           'reason', t.error ->> 'reason',
                           'error', t.error,
                           'status', t.status,
                           'source_queue', %4$L,
                           'source_msg_id', t.msg_id,
                           'attempts', t.read_ct,
                           'enqueued_at', t.enqueued_at,
                           'worker_id', $8::text,
                           'dead_lettered_at', clock_timestamp()))
              FROM taken AS t
             ORDER BY t.msg_id
        ), recorded AS (
            INSERT INTO tasker.step_results (
                step_uuid, task_uuid, correlation_id, namespace, queue_name, msg_id, handler,
                status, result, error, attempts, worker_id, enqueued_at, claimed_at, started_at,
                finished_at, source, events_stored, uuid_time)
            SELECT tasker.try_uuid(t.message ->> 'step_uuid'),
                   tasker.try_uuid(t.message ->> 'task_uuid'),
                   tasker.try_uuid(t.message ->> 'correlation_id'),
                   %3$L, %4$L, t.msg_id, t.message ->> 'handler', t.status, NULL, t.error,
                   t.read_ct, $8, t.enqueued_at, t.last_read_at, t.started_at,
                   coalesce(t.finished_at, clock_timestamp()), t.source, $9,
                   tasker.uuid_time(tasker.try_uuid(t.message ->> 'step_uuid'))
              FROM taken AS t
             WHERE t.status IS NOT NULL
               AND jsonb_typeof(t.message) = 'object'
               AND tasker.try_uuid(t.message ->> 'step_uuid') IS NOT NULL
            ON CONFLICT DO NOTHING
            RETURNING step_uuid, worker_id, queue_name, msg_id, attempts, status, source, error,
                      started_at, finished_at
        ), logged AS (
            INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
            SELECT o.event_type, r.worker_id, r.step_uuid, r.queue_name, r.msg_id, o.data, o.occurred_at
              FROM recorded AS r
             CROSS JOIN LATERAL tasker.outcome_events(r.attempts, r.status, r.source, r.error, NULL,
                                                      r.started_at, r.finished_at, false) AS o
             WHERE $9
        )
        SELECT i.msg_id, (t.msg_id IS NOT NULL)
          FROM input AS i LEFT JOIN taken AS t ON t.msg_id = i.msg_id
        $sql$,
        pgmq.format_table_name(p_queue, 'q'), pgmq.format_table_name(v_dlq, 'q'),
        tasker.queue_namespace(p_queue), p_queue)
    USING p_msg_ids, p_read_cts, p_statuses, p_errors, p_started_at, p_finished_at, p_sources,
          p_worker_id, v_stored;
END;
$function$;

CREATE OR REPLACE FUNCTION tasker.record_outcomes(p_queue text, p_worker_id text, p_outcomes jsonb, p_archive boolean DEFAULT false, p_store_events boolean DEFAULT NULL::boolean)
 RETURNS TABLE(msg_id bigint, acked boolean)
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_stored boolean := coalesce(p_store_events, tasker.step_events_stored());
BEGIN
    IF jsonb_typeof(p_outcomes) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'tasker.record_outcomes: p_outcomes must be a JSON array'
              USING ERRCODE = '22023';
    END IF;
    RETURN QUERY EXECUTE format($sql$
        WITH input AS (
            SELECT * FROM jsonb_to_recordset($1)
                AS i(msg_id bigint, read_ct integer, status text, result jsonb, error jsonb,
                     started_at timestamptz, finished_at timestamptz, source text,
                     step_uuid uuid, task_uuid uuid, correlation_id uuid, handler text)
        ), settled AS (
            DELETE FROM pgmq.%1$I AS q
             USING input AS i
             WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct
            RETURNING q.msg_id, q.vt, q.read_ct, q.enqueued_at, q.last_read_at, q.message,
                      q.headers, i.status, i.result, i.error, i.started_at, i.finished_at,
                      i.source,
                      coalesce(i.step_uuid, tasker.try_uuid(q.message ->> 'step_uuid')) AS step_uuid,
                      coalesce(i.task_uuid, tasker.try_uuid(q.message ->> 'task_uuid')) AS task_uuid,
                      coalesce(i.correlation_id,
                               tasker.try_uuid(q.message ->> 'correlation_id')) AS correlation_id,
                      coalesce(i.handler, q.message ->> 'handler') AS handler
        ), kept AS (
            INSERT INTO pgmq.%2$I (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
            SELECT a.msg_id, a.vt, a.read_ct, a.enqueued_at, a.last_read_at, a.message, a.headers
              FROM settled AS a
             WHERE $4
        ), recorded AS (
            INSERT INTO tasker.step_results (
                step_uuid, task_uuid, correlation_id, namespace, queue_name, msg_id, handler,
                status, result, error, attempts, worker_id, enqueued_at, claimed_at, started_at,
                finished_at, source, events_stored, uuid_time)
            SELECT a.step_uuid, a.task_uuid, a.correlation_id,
                   %3$L, %4$L, a.msg_id, a.handler, a.status, a.result, a.error,
                   a.read_ct, $2, a.enqueued_at, a.last_read_at, a.started_at,
                   coalesce(a.finished_at, clock_timestamp()), a.source, $3, tasker.uuid_time(a.step_uuid)
              FROM settled AS a
             WHERE a.status IS NOT NULL
               AND jsonb_typeof(a.message) = 'object'
               AND a.step_uuid IS NOT NULL
            ON CONFLICT DO NOTHING
            RETURNING step_uuid, worker_id, queue_name, msg_id, attempts, status, source, error,
                      started_at, finished_at
        ), logged AS (
            INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
            SELECT o.event_type, r.worker_id, r.step_uuid, r.queue_name, r.msg_id, o.data, o.occurred_at
              FROM recorded AS r
             CROSS JOIN LATERAL tasker.outcome_events(r.attempts, r.status, r.source, r.error, NULL,
                                                      r.started_at, r.finished_at, false) AS o
             WHERE $3
        )
        SELECT i.msg_id, (a.msg_id IS NOT NULL)
          FROM input AS i
          LEFT JOIN settled AS a ON a.msg_id = i.msg_id
        $sql$,
        pgmq.format_table_name(p_queue, 'q'), pgmq.format_table_name(p_queue, 'a'),
        tasker.queue_namespace(p_queue), p_queue)
    USING p_outcomes, p_worker_id, v_stored, p_archive;
END;
$function$;

CREATE OR REPLACE FUNCTION tasker.cancel_step(p_namespace text, p_step_uuid uuid, p_by text DEFAULT NULL::text)
 RETURNS TABLE(msg_id bigint, state text)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_queue text := tasker.namespace_queue(p_namespace);
    v_table text := pgmq.format_table_name(v_queue, 'q');
    v_id    bigint;
    v_done  bigint;
    v_held  boolean;
    v_by    text := coalesce(p_by, 'cancel:' || session_user);
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_step_uuid::text, 6134));
    SELECT r.msg_id INTO v_done FROM tasker.step_results AS r
     WHERE r.step_uuid = p_step_uuid AND r.uuid_time IN (tasker.uuid_time(p_step_uuid), 'epoch');
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
                                             enqueued_at, finished_at, uuid_time)
            SELECT $2, tasker.try_uuid(g.message ->> 'task_uuid'), tasker.try_uuid(g.message ->> 'correlation_id'),
                   %2$L, %3$L, g.msg_id, g.message ->> 'handler', 'cancelled',
                   jsonb_build_object('reason', 'cancelled', 'by', $3), g.read_ct, 'cancel:' || session_user,
                   g.enqueued_at, clock_timestamp(), tasker.uuid_time($2)
              FROM gone AS g
            ON CONFLICT DO NOTHING
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
$function$;

CREATE OR REPLACE FUNCTION tasker.enqueue_step(p_namespace text, p_handler text, p_inputs jsonb DEFAULT '{}'::jsonb, p_step_uuid uuid DEFAULT NULL::uuid, p_delay integer DEFAULT 0, p_task_uuid uuid DEFAULT NULL::uuid, p_correlation_id uuid DEFAULT NULL::uuid, p_attempt_limit integer DEFAULT NULL::integer, p_timeout double precision DEFAULT NULL::double precision, p_headers jsonb DEFAULT NULL::jsonb, p_notify boolean DEFAULT false, p_priority integer DEFAULT NULL::integer, p_group text DEFAULT NULL::text, p_concurrency_key text DEFAULT NULL::text, p_unique_key text DEFAULT NULL::text, p_unique_for double precision DEFAULT NULL::double precision, p_debounce boolean DEFAULT false)
 RETURNS TABLE(step_uuid uuid, msg_id bigint, created boolean)
 LANGUAGE plpgsql
AS $function$
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
        SELECT r.msg_id INTO v_id FROM tasker.step_results AS r
         WHERE r.step_uuid = p_step_uuid AND r.uuid_time IN (tasker.uuid_time(p_step_uuid), 'epoch');
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
$function$;

CREATE OR REPLACE FUNCTION tasker.claim_steps(p_queue text, p_vt integer, p_qty integer)
 RETURNS TABLE(msg_id bigint, read_ct integer, enqueued_at timestamp with time zone, vt timestamp with time zone, message jsonb, headers jsonb, already_done boolean, claimed_at timestamp with time zone)
 LANGUAGE sql
 ROWS 100
AS $function$
    SELECT set_config('synchronous_commit', 'off', true);
    SELECT r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message, r.headers,
           d.step_uuid IS NOT NULL,
           clock_timestamp()
      FROM pgmq.read(p_queue, p_vt, p_qty) AS r
      LEFT JOIN LATERAL (
          SELECT s.step_uuid FROM tasker.step_results AS s
           WHERE s.step_uuid = tasker.try_uuid(r.message ->> 'step_uuid')
             AND s.uuid_time IN (tasker.uuid_time(tasker.try_uuid(r.message ->> 'step_uuid')), 'epoch')
           LIMIT 1) AS d ON true;
$function$;

CREATE OR REPLACE FUNCTION tasker.claim_steps(p_queue text, p_vt integer, p_qty integer, p_worker_id text, p_skip_handlers text[], p_skip_msgs bigint[])
 RETURNS TABLE(msg_id bigint, read_ct integer, enqueued_at timestamp with time zone, vt timestamp with time zone, message jsonb, headers jsonb, already_done boolean, claimed_at timestamp with time zone)
 LANGUAGE plpgsql
 ROWS 100
AS $function$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    WITH claimed AS (
        SELECT r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message, r.headers,
               d.step_uuid IS NOT NULL AS already_done,
               clock_timestamp() AS claimed_at
          FROM tasker.read_skipping(p_queue, p_vt, p_qty, p_skip_handlers, p_skip_msgs) AS r
          LEFT JOIN LATERAL (
              SELECT s.step_uuid FROM tasker.step_results AS s
               WHERE s.step_uuid = tasker.try_uuid(r.message ->> 'step_uuid')
                 AND s.uuid_time IN (tasker.uuid_time(tasker.try_uuid(r.message ->> 'step_uuid')), 'epoch')
               LIMIT 1) AS d ON true
    ), logged AS (
        INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
        SELECT 'StepAssigned', p_worker_id,
               CASE WHEN jsonb_typeof(c.message) = 'object'
                    THEN tasker.try_uuid(c.message ->> 'step_uuid') END,
               p_queue, c.msg_id, jsonb_build_object('read_ct', c.read_ct), c.claimed_at
          FROM claimed AS c
         WHERE p_worker_id IS NOT NULL AND tasker.step_events_stored()
    )
    SELECT * FROM claimed;
END;
$function$;

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
                   headers = CASE WHEN m.headers IS NULL THEN $3 ELSE m.headers || $3 END
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

-- Steps sent from SQL get a UUIDv7: their outcomes go to the partition of their day.
CREATE OR REPLACE FUNCTION tasker.step_message(p_namespace text, p_handler text, p_inputs jsonb, p_step_uuid uuid, p_task_uuid uuid, p_correlation_id uuid, p_attempt_limit integer, p_timeout double precision, p_headers jsonb, p_priority integer DEFAULT NULL::integer, p_group text DEFAULT NULL::text, p_concurrency_key text DEFAULT NULL::text)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
BEGIN
    PERFORM tasker.validate_namespace(p_namespace);
    PERFORM tasker.validate_handler(p_handler);
    IF p_inputs IS NULL OR jsonb_typeof(p_inputs) <> 'object' THEN
        RAISE EXCEPTION 'inputs must be a JSON object' USING ERRCODE = '22023';
    END IF;
    IF p_attempt_limit IS NOT NULL AND p_attempt_limit NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'attempt_limit must be between 1 and 100' USING ERRCODE = '22023';
    END IF;
    IF p_timeout IS NOT NULL AND NOT (p_timeout > 0 AND p_timeout <= 86400) THEN
        RAISE EXCEPTION 'timeout must be between 0 and 86400 seconds' USING ERRCODE = '22023';
    END IF;
    IF p_priority IS NOT NULL AND p_priority NOT BETWEEN 0 AND 9 THEN
        RAISE EXCEPTION 'priority must be between 0 (first) and 9' USING ERRCODE = '22023';
    END IF;
    IF p_group IS NOT NULL AND char_length(p_group) NOT BETWEEN 1 AND 128 THEN
        RAISE EXCEPTION 'group must be 1 to 128 characters' USING ERRCODE = '22023';
    END IF;
    IF p_concurrency_key IS NOT NULL AND char_length(p_concurrency_key) NOT BETWEEN 1 AND 128 THEN
        RAISE EXCEPTION 'concurrency_key must be 1 to 128 characters' USING ERRCODE = '22023';
    END IF;
    IF p_headers IS NOT NULL THEN
        IF jsonb_typeof(p_headers) <> 'object' THEN
            RAISE EXCEPTION 'headers must be a JSON object' USING ERRCODE = '22023';
        END IF;
        IF octet_length(p_headers::text) > 8192 THEN
            RAISE EXCEPTION 'headers must be at most 8192 bytes of JSON' USING ERRCODE = '22023';
        END IF;
        IF EXISTS (SELECT 1 FROM jsonb_object_keys(p_headers) AS k WHERE k LIKE 'tasker\_%') THEN
            RAISE EXCEPTION 'header keys beginning with tasker_ are reserved for the runtime'
                USING ERRCODE = '22023';
        END IF;
    END IF;
    RETURN jsonb_strip_nulls(jsonb_build_object(
        'step_uuid', coalesce(p_step_uuid, tasker.uuid_v7()),
        'task_uuid', coalesce(p_task_uuid, gen_random_uuid()),
        'correlation_id', coalesce(p_correlation_id, gen_random_uuid()),
        'namespace', p_namespace,
        'handler', p_handler,
        'attempt_limit', p_attempt_limit,
        'timeout', p_timeout,
        'priority', nullif(p_priority, 0),
        'group', p_group,
        'concurrency_key', p_concurrency_key)) || jsonb_build_object('inputs', p_inputs);
END;
$function$;

REVOKE EXECUTE ON FUNCTION
    tasker.uuid_time(uuid),
    tasker.uuid_v7(timestamptz),
    tasker.copy_grants(regclass, regclass),
    tasker.new_history_partition(text),
    tasker.history_partitions(),
    tasker.create_history_partition(date, integer),
    tasker.drop_history_partition(text, timestamptz, integer),
    tasker.recorded_step_uuids(uuid[])
    FROM PUBLIC;

DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['tasker_producer', 'tasker_worker', 'tasker_operator'] LOOP
        IF tasker.role_exists(v_role) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION tasker.uuid_time(uuid), tasker.uuid_v7(timestamptz), '
                           'tasker.history_partitions() TO %I', v_role);
        END IF;
    END LOOP;
    -- The elected supervisor (a worker) creates and drops day partitions, through these two
    -- functions of the owner only: a worker holds no DDL privilege of its own.
    FOREACH v_role IN ARRAY ARRAY['tasker_worker', 'tasker_operator'] LOOP
        IF tasker.role_exists(v_role) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION tasker.create_history_partition(date, integer), '
                           'tasker.drop_history_partition(text, timestamptz, integer), '
                           'tasker.recorded_step_uuids(uuid[]) TO %I', v_role);
        END IF;
    END LOOP;
END;
$$;

SET LOCAL lock_timeout TO DEFAULT;
