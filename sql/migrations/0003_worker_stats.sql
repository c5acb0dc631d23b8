-- tasker-worker 0003: the last statistics snapshot of every worker (tasker-worker status).
-- Written every health_check_interval and at shutdown; one row per worker.

CREATE TABLE IF NOT EXISTS tasker.worker_stats (
    worker_id       text PRIMARY KEY,
    name            text NOT NULL,
    hostname        text NOT NULL,
    pid             integer NOT NULL,
    deployment_mode text NOT NULL,
    namespaces      text[] NOT NULL,
    capabilities    text[] NOT NULL DEFAULT '{}',
    started_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    stopped_at      timestamptz,
    stats           jsonb NOT NULL DEFAULT '{}'::jsonb
);
