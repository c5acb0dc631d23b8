-- tasker-worker 0004: the worker registry (registration, heartbeats, supervision) and the
-- event log. Postgres is the control plane: every state change of a worker or of a step
-- assignment is appended to tasker.events in the same transaction as the change.

CREATE TABLE IF NOT EXISTS tasker.workers (
    worker_id         text PRIMARY KEY,
    name              text NOT NULL,
    hostname          text NOT NULL,
    pid               integer NOT NULL,
    endpoint          text,
    namespaces        text[] NOT NULL DEFAULT '{}',
    capabilities      text[] NOT NULL DEFAULT '{}',
    version           text NOT NULL,
    deployment_mode   text NOT NULL,
    cpu_cores         integer NOT NULL,
    memory_total      bigint NOT NULL,
    status            text NOT NULL
                      CHECK (status IN ('pending', 'active', 'offline', 'deregistered')),
    busy              boolean NOT NULL DEFAULT false,
    registered_at     timestamptz NOT NULL,
    status_changed_at timestamptz NOT NULL,
    last_heartbeat_at timestamptz,
    deregistered_at   timestamptz,
    deregister_reason text,
    cpu_percent       double precision,
    memory_used       bigint,
    active_steps      integer NOT NULL DEFAULT 0,
    processed         bigint NOT NULL DEFAULT 0,
    -- The worker's last statistics snapshot (counters, latency percentiles, event system).
    stats             jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS workers_status_idx ON tasker.workers (status);

-- Heartbeat history; the writer trims it to a configured number of rows per worker.
CREATE TABLE IF NOT EXISTS tasker.worker_heartbeats (
    heartbeat_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    worker_id    text NOT NULL REFERENCES tasker.workers (worker_id) ON DELETE CASCADE,
    at           timestamptz NOT NULL,
    cpu_percent  double precision,
    memory_used  bigint,
    active_steps integer NOT NULL,
    processed    bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS worker_heartbeats_worker_idx ON tasker.worker_heartbeats (worker_id, heartbeat_id DESC);

-- The append-only event log. Worker events rebuild the worker projection (events replay);
-- step events are the audit trail of every assignment.
CREATE TABLE IF NOT EXISTS tasker.events (
    event_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_type  text NOT NULL,
    worker_id   text,
    step_uuid   uuid,
    queue_name  text,
    msg_id      bigint,
    data        jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS events_worker_idx ON tasker.events (worker_id, event_id) WHERE step_uuid IS NULL;
CREATE INDEX IF NOT EXISTS events_step_idx ON tasker.events (step_uuid) WHERE step_uuid IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_occurred_idx ON tasker.events (occurred_at);

-- Compaction keeps the log bounded without breaking replay: the projection of every worker
-- event up to last_event_id is stored here before those events are deleted.
CREATE TABLE IF NOT EXISTS tasker.event_snapshots (
    last_event_id bigint PRIMARY KEY,
    workers       jsonb NOT NULL,
    taken_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The statistics table of 0003 is superseded by tasker.workers.stats.
DROP TABLE IF EXISTS tasker.worker_stats;

-- Step events are on unless a session says otherwise (SET tasker.step_events = 'off', or
-- options=-c tasker.step_events=off on the connection), which benchmarks use to measure them.
CREATE OR REPLACE FUNCTION tasker.step_events_enabled()
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('tasker.step_events', true), '') NOT IN ('off', 'false', '0');
$$;

-- Claim and say so: StepAssigned for each claimed message, in the claim's transaction.
CREATE OR REPLACE FUNCTION tasker.claim_steps(p_queue text, p_vt integer, p_qty integer, p_worker_id text)
RETURNS TABLE (
    msg_id       bigint,
    read_ct      integer,
    enqueued_at  timestamptz,
    vt           timestamptz,
    message      jsonb,
    headers      jsonb,
    already_done boolean,
    claimed_at   timestamptz
)
LANGUAGE plpgsql ROWS 100 AS $$
BEGIN
    IF p_worker_id IS NULL OR NOT tasker.step_events_enabled() THEN
        RETURN QUERY SELECT * FROM tasker.claim_steps(p_queue, p_vt, p_qty);
        RETURN;
    END IF;
    RETURN QUERY
    WITH claimed AS (
        SELECT * FROM tasker.claim_steps(p_queue, p_vt, p_qty)
    ), logged AS (
        INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
        SELECT 'StepAssigned', p_worker_id,
               CASE WHEN jsonb_typeof(c.message) = 'object'
                    THEN tasker.try_uuid(c.message ->> 'step_uuid') END,
               p_queue, c.msg_id, jsonb_build_object('read_ct', c.read_ct), c.claimed_at
          FROM claimed AS c
    )
    SELECT * FROM claimed;
END;
$$;

-- Outcome rows become StepAssignmentAccepted (when the handler started) plus StepCompleted,
-- StepFailed or StepDeadLettered, in the outcome's own transaction.
CREATE OR REPLACE FUNCTION tasker.log_step_outcomes()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT tasker.step_events_enabled() THEN
        RETURN NULL;
    END IF;
    INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
    SELECT e.event_type, n.worker_id, n.step_uuid, n.queue_name, n.msg_id, e.data, e.at
      FROM new_rows AS n
     CROSS JOIN LATERAL (
           SELECT 'StepAssignmentAccepted' AS event_type,
                  jsonb_build_object('attempt', n.attempts) AS data,
                  n.started_at AS at
            WHERE n.started_at IS NOT NULL
           UNION ALL
           SELECT CASE n.status WHEN 'succeeded' THEN 'StepCompleted'
                                WHEN 'dead_lettered' THEN 'StepDeadLettered'
                                ELSE 'StepFailed' END,
                  jsonb_strip_nulls(jsonb_build_object(
                      'attempts', n.attempts, 'final', true, 'source', n.source,
                      'reason', n.error ->> 'reason')),
                  n.finished_at) AS e;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS tasker_log_step_outcomes ON tasker.step_results;
CREATE TRIGGER tasker_log_step_outcomes
    AFTER INSERT ON tasker.step_results
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tasker.log_step_outcomes();

-- Events of messages put back without an outcome (a retry after a failed attempt, a timeout,
-- a rejection, a release at shutdown); called in the same transaction as tasker.retry_steps.
CREATE OR REPLACE FUNCTION tasker.log_step_events(
    p_queue     text,
    p_worker_id text,
    p_types     text[],
    p_msg_ids   bigint[],
    p_steps     text[],
    p_data      jsonb[]
)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    IF NOT tasker.step_events_enabled() THEN
        RETURN 0;
    END IF;
    INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data)
    SELECT i.event_type, p_worker_id, tasker.try_uuid(i.step), p_queue, i.msg_id,
           coalesce(i.data, '{}'::jsonb)
      FROM unnest(p_types, p_msg_ids, p_steps, p_data) AS i(event_type, msg_id, step, data);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;
