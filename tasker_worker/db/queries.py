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

CLAIM_STEPS_LOGGED = """
SELECT msg_id, read_ct, enqueued_at, vt, message, headers, already_done, claimed_at
  FROM tasker.claim_steps(%s, %s, %s, %s)
"""

# A step given back for a capable worker: announce when it is ready again, as the send trigger
# announces a delayed message, so that listening workers come back for it (in EventDrivenOnly,
# which has no poller, nothing else would). The payload follows the trigger's message_ready.
ANNOUNCE_READY = """
SELECT pg_notify('pgmq_message_ready.' || a.ns,
                 json_build_object('event_type', 'message_ready', 'queue_name', a.q, 'namespace', a.ns,
                                   'msg_id', a.id, 'message_count', 1,
                                   'ready_at', clock_timestamp() + make_interval(secs => a.delay))::text)
  FROM (SELECT q, tasker.queue_namespace(q) AS ns, id, delay
          FROM (VALUES (%s::text, %s::bigint, %s::float8)) AS v (q, id, delay)) AS a
"""

# Only while a circuit is open or a rejected step is left for a capable worker: the same
# claim without the messages of some handlers and some message ids.
CLAIM_STEPS_SKIPPING = """
SELECT msg_id, read_ct, enqueued_at, vt, message, headers, already_done, claimed_at
  FROM tasker.claim_steps(%s, %s, %s, %s, %s::text[], %s::bigint[])
"""

# The arrays go in binary (%b): psycopg's text format escapes every element of a text or
# jsonb array with a regular expression, which cost about 14% of a worker's CPU per step.
RECORD_OUTCOMES = """
SELECT msg_id, acked FROM tasker.record_outcomes(%s, %s, %s::text::jsonb)
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

# --- worker registry -------------------------------------------------------------------------

WORKER_COLUMNS = """worker_id, name, hostname, pid, endpoint, namespaces, capabilities, version,
       deployment_mode, cpu_cores, memory_total, status, busy, registered_at, status_changed_at,
       last_heartbeat_at, deregistered_at, deregister_reason, cpu_percent, memory_used,
       active_steps, processed, stats, requested_mode"""

LOCK_WORKER = "SELECT status, busy FROM tasker.workers WHERE worker_id = %s FOR UPDATE"

INSERT_WORKER = """
INSERT INTO tasker.workers (worker_id, name, hostname, pid, endpoint, namespaces, capabilities,
                            version, deployment_mode, cpu_cores, memory_total, status, busy,
                            registered_at, status_changed_at)
VALUES (%(worker_id)s, %(name)s, %(hostname)s, %(pid)s, %(endpoint)s, %(namespaces)s,
        %(capabilities)s, %(version)s, %(deployment_mode)s, %(cpu_cores)s, %(memory_total)s,
        'pending', false, %(at)s, %(at)s)
ON CONFLICT (worker_id) DO UPDATE
   SET name = EXCLUDED.name, hostname = EXCLUDED.hostname, pid = EXCLUDED.pid,
       endpoint = EXCLUDED.endpoint, namespaces = EXCLUDED.namespaces,
       capabilities = EXCLUDED.capabilities, version = EXCLUDED.version,
       deployment_mode = EXCLUDED.deployment_mode, cpu_cores = EXCLUDED.cpu_cores,
       memory_total = EXCLUDED.memory_total, status = 'pending', busy = false,
       registered_at = EXCLUDED.registered_at, status_changed_at = EXCLUDED.status_changed_at,
       last_heartbeat_at = NULL, deregistered_at = NULL, deregister_reason = NULL,
       cpu_percent = NULL, memory_used = NULL, active_steps = 0, processed = 0,
       stats = '{}'::jsonb, requested_mode = NULL
"""

SET_WORKER_STATUS = """
UPDATE tasker.workers
   SET status = %(status)s, status_changed_at = %(at)s,
       busy = CASE WHEN %(status)s = 'deregistered' THEN false ELSE busy END,
       deregistered_at = CASE WHEN %(status)s = 'deregistered' THEN %(at)s END,
       deregister_reason = CASE WHEN %(status)s = 'deregistered' THEN %(reason)s END
 WHERE worker_id = %(worker_id)s
"""

RECORD_HEARTBEAT = """
UPDATE tasker.workers
   SET last_heartbeat_at = %(at)s, cpu_percent = %(cpu_percent)s, memory_used = %(memory_used)s,
       active_steps = %(active_steps)s, processed = %(processed)s, busy = %(busy)s,
       stats = coalesce(%(stats)s, stats)
 WHERE worker_id = %(worker_id)s
"""

INSERT_HEARTBEAT = """
INSERT INTO tasker.worker_heartbeats (worker_id, at, cpu_percent, memory_used, active_steps, processed)
VALUES (%(worker_id)s, %(at)s, %(cpu_percent)s, %(memory_used)s, %(active_steps)s, %(processed)s)
"""

# Keep the newest N heartbeats of one worker: the index on (worker_id, heartbeat_id DESC)
# makes this an index range scan, so the trim costs the same however long the history ran.
TRIM_HEARTBEATS = """
DELETE FROM tasker.worker_heartbeats
 WHERE worker_id = %(worker_id)s
   AND heartbeat_id < (SELECT heartbeat_id FROM tasker.worker_heartbeats
                        WHERE worker_id = %(worker_id)s
                        ORDER BY heartbeat_id DESC OFFSET %(keep)s - 1 LIMIT 1)
"""

APPEND_EVENT = """
INSERT INTO tasker.events (event_type, worker_id, data, occurred_at)
VALUES (%s, %s, %s, %s)
"""

GET_WORKER = "SELECT " + WORKER_COLUMNS + " FROM tasker.workers WHERE worker_id = %s"

LIST_WORKERS = (
    "SELECT " + WORKER_COLUMNS + " FROM tasker.workers"
    " WHERE (%(status)s::text IS NULL OR status = %(status)s)"
    "   AND (%(include_deregistered)s OR status <> 'deregistered' OR %(status)s::text IS NOT NULL)"
    " ORDER BY registered_at DESC, worker_id LIMIT %(limit)s"
)

LIVE_WORKERS = (
    "SELECT " + WORKER_COLUMNS + " FROM tasker.workers"
    " WHERE status IN ('pending', 'active') ORDER BY registered_at DESC, worker_id LIMIT %(limit)s"
)

HEALTHY_WORKERS = (
    "SELECT " + WORKER_COLUMNS + " FROM tasker.workers"
    " WHERE status = 'active' AND last_heartbeat_at > %(at)s - make_interval(secs => %(stale_s)s)"
    " ORDER BY registered_at DESC, worker_id LIMIT %(limit)s"
)

LIST_HEARTBEATS = """
SELECT at, cpu_percent, memory_used, active_steps, processed
  FROM tasker.worker_heartbeats
 WHERE worker_id = %s
 ORDER BY heartbeat_id DESC
 LIMIT %s
"""

WORKER_STATUS_COUNTS = """
SELECT status, count(*), coalesce(sum(cpu_cores), 0), coalesce(sum(memory_total), 0),
       coalesce(sum(active_steps), 0)
  FROM tasker.workers
 GROUP BY status
"""

# Fleet throughput: steps recorded per second over the last minute.
FLEET_THROUGHPUT = """
SELECT count(*) / 60.0 FROM tasker.step_results
 WHERE finished_at > clock_timestamp() - interval '1 minute'
"""

PENDING_WITH_HEARTBEAT = """
SELECT worker_id FROM tasker.workers
 WHERE status = 'pending' AND last_heartbeat_at IS NOT NULL
 ORDER BY worker_id LIMIT %s
"""

# A worker is stale when its newest sign of life (heartbeat, else registration) is older
# than the timeout; pending workers that never heartbeat go offline the same way.
STALE_WORKERS = """
SELECT worker_id FROM tasker.workers
 WHERE status IN ('pending', 'active')
   AND coalesce(last_heartbeat_at, registered_at) < %s - make_interval(secs => %s)
 ORDER BY worker_id LIMIT %s
"""

REVIVED_WORKERS = """
SELECT worker_id FROM tasker.workers
 WHERE status = 'offline'
   AND last_heartbeat_at >= %s - make_interval(secs => %s)
   AND last_heartbeat_at > status_changed_at
 ORDER BY worker_id LIMIT %s
"""

CAPABLE_WORKER_EXISTS = """
SELECT EXISTS (
    SELECT 1 FROM tasker.workers
     WHERE status IN ('pending', 'active')
       AND coalesce(last_heartbeat_at, registered_at) > clock_timestamp() - make_interval(secs => %s)
       AND %s = ANY (capabilities)
       AND worker_id <> %s)
"""

# --- event log -------------------------------------------------------------------------------

LATEST_SNAPSHOT = """
SELECT last_event_id, workers FROM tasker.event_snapshots ORDER BY last_event_id DESC LIMIT 1
"""

WORKER_EVENTS_AFTER = """
SELECT event_id, event_type, worker_id, data
  FROM tasker.events
 WHERE event_id > %s AND event_id <= %s AND step_uuid IS NULL AND worker_id IS NOT NULL
   AND event_type = ANY(%s)
 ORDER BY event_id
"""

MAX_EVENT_ID = "SELECT coalesce(max(event_id), 0) FROM tasker.events"

# The newest event old enough to compact.
COMPACTION_CUTOFF = "SELECT coalesce(max(event_id), 0) FROM tasker.events WHERE occurred_at < %s"

INSERT_SNAPSHOT = """
INSERT INTO tasker.event_snapshots (last_event_id, workers) VALUES (%s, %s)
ON CONFLICT (last_event_id) DO NOTHING
"""

DELETE_EVENTS_UPTO = "DELETE FROM tasker.events WHERE event_id <= %s"

DELETE_OLD_SNAPSHOTS = "DELETE FROM tasker.event_snapshots WHERE last_event_id < %s"

LIVE_PROJECTION = "SELECT " + WORKER_COLUMNS + " FROM tasker.workers"

EVENT_COUNTS = "SELECT event_type, count(*) FROM tasker.events GROUP BY event_type ORDER BY event_type"

LOG_STEP_EVENTS = "SELECT tasker.log_step_events(%s, %s, %s, %s, %s, %s::jsonb[])"

# --- leadership ------------------------------------------------------------------------------

TRY_LEADER_LOCK = "SELECT pg_try_advisory_lock(%s)"

LEADER_BACKEND = """
SELECT a.pid, a.application_name
  FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objid = %s AND l.classid = 0
"""

SCHEMA_INSTALLED = "SELECT to_regclass('tasker.workers') IS NOT NULL AND to_regclass('tasker.events') IS NOT NULL"

# --- health ----------------------------------------------------------------------------------

# A session holds the vacuum horizon back with its snapshot (backend_xmin) or, idle in a
# transaction that wrote, with its own xid (backend_xid); either counts.
DATABASE_HORIZON = """
SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start))
                FILTER (WHERE (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
                          AND pid <> pg_backend_pid()), 0),
       coalesce(max(greatest(age(backend_xmin), age(backend_xid)))
                FILTER (WHERE pid <> pg_backend_pid()), 0),
       pg_notification_queue_usage()
  FROM pg_stat_activity
"""

QUEUE_DEAD_TUPLES = r"""
SELECT relname, n_live_tup, n_dead_tup
  FROM pg_stat_all_tables
 WHERE schemaname = 'pgmq' AND relname LIKE 'q\_%%'
 ORDER BY n_dead_tup DESC
"""

# --- control channel (runtime deployment mode changes) -------------------------------------

REQUEST_MODE = "SELECT worker_id FROM tasker.request_mode(%s, %s, %s)"

REQUESTED_MODE = "SELECT requested_mode FROM tasker.workers WHERE worker_id = %s"

# The request is cleared only if it is still the one applied (a newer one waits its turn).
APPLY_MODE = """
UPDATE tasker.workers
   SET deployment_mode = %(to)s,
       requested_mode = CASE WHEN requested_mode = %(to)s THEN NULL ELSE requested_mode END
 WHERE worker_id = %(worker_id)s
RETURNING deployment_mode
"""

CLEAR_REQUESTED_MODE = """
UPDATE tasker.workers SET requested_mode = NULL
 WHERE worker_id = %s AND requested_mode = %s
"""
