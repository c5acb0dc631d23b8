"""Every SQL statement the Python code sends, in one place.

Schema objects (tables, triggers, the fenced claim/ack functions) live in ``sql/migrations``;
this module holds the statements that call them. Queue names are always passed as parameters
(the SQL functions quote them with ``%I``), never interpolated here.
"""

from __future__ import annotations

# --- migrations ------------------------------------------------------------------------------

CREATE_MIGRATIONS_TABLE = """
CREATE SCHEMA IF NOT EXISTS tasker;
CREATE TABLE IF NOT EXISTS tasker.schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

APPLIED_VERSIONS = "SELECT version FROM tasker.schema_migrations"

MIGRATION_ROWS = "SELECT version, name, checksum, applied_at FROM tasker.schema_migrations ORDER BY version"

RECORD_MIGRATION = "INSERT INTO tasker.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)"

PGMQ_PRESENT = """
SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pgmq'),
       to_regclass('pgmq.meta') IS NOT NULL,
       EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq')
"""

NOTIFY_TRIGGER_COUNTS = """
SELECT (SELECT count(*) FROM pg_trigger WHERE tgname = 'tasker_notify_message_ready'),
       (SELECT count(*) FROM pgmq.meta)
"""

# --- queues ----------------------------------------------------------------------------------

CREATE_NAMESPACE_QUEUE = "SELECT tasker.create_namespace_queue(%s)"

QUEUE_EXISTS = "SELECT tasker.queue_table(%s) IS NOT NULL"

LIST_QUEUES = """
SELECT queue_name, is_partitioned, is_unlogged, created_at
  FROM pgmq.list_queues()
 ORDER BY queue_name
"""

QUEUE_METRICS = """
SELECT queue_name, queue_length, queue_visible_length, newest_msg_age_sec,
       oldest_msg_age_sec, total_messages
  FROM pgmq.metrics(%s)
"""

ALL_QUEUE_METRICS = """
SELECT queue_name, queue_length, queue_visible_length, newest_msg_age_sec,
       oldest_msg_age_sec, total_messages
  FROM pgmq.metrics_all()
 ORDER BY queue_name
"""

PURGE_QUEUE = "SELECT pgmq.purge_queue(%s)"

SEND_STEP = "SELECT tasker.send_step(%s, %s, %s::jsonb, %s, NULL, NULL, %s, %s)"

SEND_BATCH = "SELECT * FROM pgmq.send_batch(%s, %s::jsonb[], %s)"

ENSURE_NOTIFY_TRIGGERS = "SELECT tasker.ensure_notify_triggers()"

# --- the step path ---------------------------------------------------------------------------

CLAIM_STEPS = """
SELECT msg_id, read_ct, enqueued_at, vt, message, headers, already_done, claimed_at
  FROM tasker.claim_steps(%s, %s, %s)
"""

RECORD_OUTCOMES = """
SELECT msg_id, acked
  FROM tasker.record_outcomes(%s, %s, %s, %s, %s, %s::jsonb[], %s::jsonb[], %s, %s, %s)
"""

RETRY_STEPS = """
SELECT msg_id, applied
  FROM tasker.retry_steps(%s, %s, %s, %s, %s::jsonb[], %s)
"""

EXTEND_VT = "SELECT msg_id, vt FROM tasker.extend_vt(%s, %s, %s, %s)"

DEAD_LETTER_STEPS = """
SELECT msg_id, moved
  FROM tasker.dead_letter_steps(%s, %s, %s, %s, %s, %s::jsonb[], %s, %s, %s)
"""

# --- dead-letter queues ----------------------------------------------------------------------

PEEK_MESSAGES = """
SELECT msg_id, enqueued_at, read_ct, message, headers
  FROM tasker.peek_messages(%s, %s)
"""

REQUEUE_DEAD_LETTERS = "SELECT dlq_msg_id, new_msg_id FROM tasker.requeue_dead_letters(%s, %s)"

# --- outcomes --------------------------------------------------------------------------------

OUTCOME_COUNTS = """
SELECT status, count(*) FROM tasker.step_results
 WHERE queue_name = ANY(%s)
 GROUP BY status
"""

# --- worker statistics -----------------------------------------------------------------------

UPSERT_WORKER_STATS = """
INSERT INTO tasker.worker_stats (worker_id, name, hostname, pid, deployment_mode, namespaces,
                                 capabilities, started_at, updated_at, stopped_at, stats)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, clock_timestamp(), %s, %s)
ON CONFLICT (worker_id) DO UPDATE
   SET deployment_mode = EXCLUDED.deployment_mode,
       updated_at = EXCLUDED.updated_at,
       stopped_at = EXCLUDED.stopped_at,
       capabilities = EXCLUDED.capabilities,
       stats = EXCLUDED.stats
"""

WORKER_STATS = """
SELECT worker_id, name, hostname, pid, deployment_mode, namespaces, started_at, updated_at,
       stopped_at, stats, extract(epoch FROM clock_timestamp() - updated_at) AS age_s
  FROM tasker.worker_stats
 WHERE stopped_at IS NULL OR %s
 ORDER BY started_at DESC
 LIMIT %s
"""

CAPABLE_WORKER_EXISTS = """
SELECT EXISTS (
    SELECT 1 FROM tasker.worker_stats
     WHERE stopped_at IS NULL
       AND updated_at > clock_timestamp() - make_interval(secs => %s)
       AND %s = ANY (capabilities)
       AND worker_id <> %s)
"""
