"""Every SQL statement the Python code sends, in one place.

Schema objects (tables, triggers, the fenced claim/ack functions) live in ``sql/migrations``;
this module holds the statements that call them. Queue names are always passed as parameters
(the SQL functions quote them with ``%I``), never interpolated here.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql as pgsql

from tasker_worker.domain.notifications import CLAIMED_PREFIX, MESSAGE_READY_PREFIX, OUTCOME_CHANNEL


def _literal(text: str) -> str:
    """``text`` as an SQL string literal (a channel name written into a statement)."""
    return pgsql.Literal(text).as_string(None)


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

# Serializes migrations of several processes starting at once (held to the end of the transaction).
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(%s)"

INSTALL_PGMQ_EXTENSION = "CREATE EXTENSION IF NOT EXISTS pgmq"

PGMQ_EXTENSION_VERSION = "SELECT extversion FROM pg_extension WHERE extname = 'pgmq'"

SERVER_VERSION = "SHOW server_version"

MIGRATIONS_TABLE_EXISTS = "SELECT to_regclass('tasker.schema_migrations') IS NOT NULL"

NOTIFY_HELPER_EXISTS = "SELECT to_regprocedure('tasker.ensure_notify_triggers()') IS NOT NULL"

SERVER_VERSION_NUM = "SHOW server_version_num"

# --- the schema as it is (db/schema.py, sql/schema.sql) ------------------------------------

# Without the outcome table's day partitions: which days exist depends on the date (a migration
# creates today's and the days after it); their definition is tasker.new_history_partition's.
SCHEMA_TABLES = """
SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
 WHERE n.nspname = 'tasker' AND c.relkind IN ('r', 'p')
   AND NOT (c.relispartition AND c.relname ~ '^step_results_[0-9]{8}$')
 ORDER BY c.relname
"""

SCHEMA_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       CASE WHEN a.attidentity = 'a' THEN 'GENERATED ALWAYS AS IDENTITY'
            ELSE pg_get_expr(d.adbin, d.adrelid) END
  FROM pg_attribute AS a
  LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE a.attrelid = ('tasker.' || quote_ident(%s))::regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""

# A partitioned table's key; a partition's attachment (ALTER TABLE ... ATTACH PARTITION ...).
SCHEMA_PARTITIONING = """
SELECT CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
       (SELECT format('ALTER TABLE %%s ATTACH PARTITION %%s %%s', i.inhparent::regclass, c.oid::regclass,
                      pg_get_expr(c.relpartbound, c.oid))
          FROM pg_inherits AS i WHERE i.inhrelid = c.oid AND c.relispartition)
  FROM pg_class AS c
 WHERE c.oid = ('tasker.' || quote_ident(%s))::regclass
"""

SCHEMA_TIME_ZONE = "SET TimeZone = 'UTC'"

SCHEMA_CONSTRAINTS = """
SELECT format('ALTER TABLE %%s ADD CONSTRAINT %%I %%s', c.conrelid::regclass::text, c.conname,
              pg_get_constraintdef(c.oid))
  FROM pg_constraint AS c
 WHERE c.conrelid = ('tasker.' || quote_ident(%s))::regclass AND c.contype <> 'n'
 ORDER BY c.conname
"""

SCHEMA_INDEXES = """
SELECT indexdef FROM pg_indexes
 WHERE schemaname = 'tasker' AND tablename = %s
   AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = ('tasker.' || quote_ident(%s))::regclass)
 ORDER BY indexname
"""

SCHEMA_TRIGGERS = """
SELECT pg_get_triggerdef(t.oid) FROM pg_trigger AS t
 WHERE t.tgrelid = ('tasker.' || quote_ident(%s))::regclass AND NOT t.tgisinternal
 ORDER BY t.tgname
"""

SCHEMA_VIEWS = """
SELECT c.relname, pg_get_viewdef(c.oid, true) FROM pg_class AS c
  JOIN pg_namespace AS n ON n.oid = c.relnamespace
 WHERE n.nspname = 'tasker' AND c.relkind = 'v'
 ORDER BY c.relname
"""

SCHEMA_FUNCTIONS = """
SELECT pg_get_functiondef(p.oid) FROM pg_proc AS p
  JOIN pg_namespace AS n ON n.oid = p.pronamespace
 WHERE n.nspname = 'tasker'
 ORDER BY p.proname, pg_get_function_identity_arguments(p.oid)
"""

# --- the online preparation of 0021 (db/migrations.ONLINE_PREPARATIONS) ------------------------

#: tasker.step_results is still the unpartitioned table of before 0021.
HISTORY_PREPARE_NEEDED = """
SELECT coalesce((SELECT relkind = 'r' FROM pg_class WHERE oid = to_regclass('tasker.step_results')), false)
"""

#: Each its own transaction, on an autocommit connection, each waiting at most lock_timeout for
#: its lock. The column (a constant default: a catalog change) and the CHECK that every row so
#: far is 'epoch' (NOT VALID: not checked yet) take the table's exclusive lock for a moment, and
#: only when missing (looked up first: a second run takes no lock). The validation reads the
#: whole table under SHARE UPDATE EXCLUSIVE, which lets claims, settles and readers go on.
#: Workers of the previous version keep working throughout: they name their columns and leave
#: uuid_time to its default.
HISTORY_PREPARE = (
    "SET lock_timeout = '10s'",
    """DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = 'tasker.step_results'::regclass AND attname = 'uuid_time' AND NOT attisdropped) THEN
        ALTER TABLE tasker.step_results ADD COLUMN uuid_time timestamptz NOT NULL DEFAULT 'epoch';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'tasker.step_results'::regclass AND conname = 'step_results_unstamped_epoch') THEN
        ALTER TABLE tasker.step_results
            ADD CONSTRAINT step_results_unstamped_epoch CHECK (uuid_time = 'epoch') NOT VALID;
    END IF;
END;
$$""",
    "ALTER TABLE tasker.step_results VALIDATE CONSTRAINT step_results_unstamped_epoch",
    "RESET lock_timeout",
)

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

# A starting worker's namespaces, in one statement (one transaction, however many namespaces).
CREATE_NAMESPACE_QUEUES = """
SELECT tasker.create_namespace_queue(n.ns) FROM unnest(%s::text[]) WITH ORDINALITY AS n(ns, i) ORDER BY n.i
"""

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

SEND_STEP = "SELECT tasker.send_step(%s, %s, %s::jsonb, %s, NULL, NULL, %s, %s, %s::jsonb)"

SEND_BATCH = "SELECT * FROM pgmq.send_batch(%s, %s::jsonb[], %s)"

SEND = "SELECT pgmq.send(%s, %s, %s)"

# A planning step with fresh ids (the demo's producer).
# --- the producer's side (tasker_worker.AsyncClient / Client, migration 0012) -------------------

ENQUEUE_STEP = """
SELECT step_uuid, msg_id, created
  FROM tasker.enqueue_step(%(namespace)s, %(handler)s, %(inputs)s::jsonb, %(step_uuid)s::uuid, %(delay)s,
                           %(task_uuid)s::uuid, %(correlation_id)s::uuid, %(attempt_limit)s, %(timeout)s,
                           %(headers)s::jsonb, %(notify)s, %(priority)s, %(group)s, %(concurrency_key)s,
                           %(unique_key)s, %(unique_for)s, %(debounce)s)
"""

# A batch in one statement: bodies built and checked by the client, encoded once; one headers
# object for all of them. The bodies go as a binary text[] (%b): psycopg's text format escapes
# every quote of every body in Python, which cost three times the insert itself.
SEND_STEPS = """
SELECT s.id FROM pgmq.send_batch(%(queue)s, %(bodies)b::text[]::jsonb[],
                                 array_fill(%(headers)s::jsonb, ARRAY[%(count)s::integer]),
                                 %(delay)s) AS s(id)
"""

# One step's outcome: its partition and the unstamped one (migration 0021). Parameters: the
# step_uuid, twice.
STEP_RESULT = """
SELECT {columns} FROM tasker.step_results
 WHERE step_uuid = %s AND uuid_time IN (tasker.uuid_time(%s::uuid), 'epoch')
"""

# Newest first, by finished_at (the BRIN index keeps the range cheap); both filters optional.
LIST_STEP_RESULTS = """
SELECT {columns} FROM tasker.step_results
 WHERE (%(namespace)s::text IS NULL OR namespace = %(namespace)s)
   AND (%(status)s::text IS NULL OR status = %(status)s)
 ORDER BY finished_at DESC
 LIMIT %(limit)s
"""

CANCEL_STEP = "SELECT msg_id, state FROM tasker.cancel_step(%s, %s::uuid, %s)"

#: What running steps reported with ``ctx.progress``, a batch at a time (migration 0019).
WRITE_PROGRESS = "SELECT tasker.write_progress(%s::jsonb, %s)"
STEP_PROGRESS = """
SELECT fraction, note, data, worker_id, updated_at FROM tasker.step_progress WHERE step_uuid = %s::uuid
"""
#: Cancel requests of steps held here, for a worker that missed (or does not listen for) them.
PENDING_CANCELLATIONS = """
SELECT step_uuid::text, requested_by FROM tasker.step_cancellations WHERE step_uuid = ANY(%s::uuid[])
"""

STEP_KEY = "SELECT queue_name, msg_id FROM tasker.step_keys WHERE step_uuid = %s"


def queued_step(queue: str) -> pgsql.Composed:
    """A step's message in ``queue`` by its step_uuid (a scan: for a person looking, not a path)."""
    return pgsql.SQL(
        "SELECT msg_id, read_ct, vt, enqueued_at, headers, vt <= clock_timestamp() FROM {} "
        "WHERE message ->> 'step_uuid' = %s LIMIT 1"
    ).format(pgsql.Identifier("pgmq", "q_" + queue.lower()))


#: Where a claim keeps headers that were no JSON object (``[1]``, ``"x"``): ``{RAW_HEADERS: [1]}``.
RAW_HEADERS = "tasker_raw_headers"

SEND_PLANNING_STEP = "SELECT tasker.send_step(%s, 'path_plan', %s)"

# Composed with the queue table's identifier (``sql.SQL(QUEUE_LENGTH).format(...)``).
QUEUE_LENGTH = "SELECT count(*) FROM {}"

ENSURE_NOTIFY_TRIGGERS = "SELECT tasker.ensure_notify_triggers()"

# Whether this role may run it (a producer may not, and needs not: it runs no worker). A separate
# statement: EXECUTE is checked when a statement starts, even for a CASE branch never taken.
MAY_ENSURE_NOTIFY_TRIGGERS = "SELECT has_function_privilege('tasker.ensure_notify_triggers()', 'EXECUTE')"

# --- the step path ---------------------------------------------------------------------------
#
# The claim and the settle are direct statements, one text per queue with its tables written in
# (``QueueStatements``), sent as prepared statements: parsed once per connection, never re-parsed
# through plpgsql's EXECUTE format(...) as the tasker.* SQL functions do. They are planned on
# every execution all the same (the pool's sessions run with plan_cache_mode =
# force_custom_plan): a queue swings between empty and full, and a generic plan frozen with the
# statistics of an empty queue once made a claim of ten messages take 919 ms on a full one.
# Behind a transaction pooler they go as unnamed statements (parsed and planned each time).

# pgmq.read's claim (oldest visible first, SKIP LOCKED), its dedup probe and asynchronous commit
# in one statement. It merges the claimant (%(stamp)s, {"tasker_claim": {"worker_id": ...}}) into
# the message's headers and returns the headers as they were: a tasker_claim there means the
# previous claim lapsed (migration 0010). Headers that are no object (a raw producer's `[1]`)
# are kept under tasker_raw_headers of one first: || would append to them (migration 0025).
# Merging one constant object costs a claim about 1 us
# per message; building it per row (with the read_ct and the time) cost 8. A claim lost in a server crash only makes its messages visible again when
# their old vt lapses; outcomes stay exactly once through step_results' key. The dedup probe
# is tasker.recorded_step_uuids (migration 0021), once for the claimed batch: an index lookup in
# the partition of each step_uuid's day and in the unstamped one, on a plan of its own kept for
# the session, so that planning this statement does not grow with the number of partitions
# (probing the partitioned table here cost a claim of one 1.4 ms of planning with 16 of them).
# Parameters: qty, vt (seconds); skipping: skip_msgs, skip_handlers; stored events: worker_id.
_CLAIM = """
WITH ready AS (
    SELECT q.msg_id, q.headers AS prior_headers, q.last_read_at AS prior_read_at
      FROM {queue_table} AS q
     WHERE q.vt <= clock_timestamp(){skip}
       AND NOT EXISTS (SELECT 1 FROM tasker.queue_flow AS f WHERE f.namespace = {namespace})
     ORDER BY q.msg_id
     LIMIT %(qty)s
       FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE {queue_table} AS m
       SET last_read_at = clock_timestamp(),
           vt = clock_timestamp() + make_interval(secs => %(vt)s),
           read_ct = m.read_ct + 1,
           headers = CASE WHEN m.headers IS NULL THEN %(stamp)s::jsonb
                          WHEN jsonb_typeof(m.headers) = 'object' THEN m.headers || %(stamp)s::jsonb
                          ELSE jsonb_build_object('tasker_raw_headers', m.headers) || %(stamp)s::jsonb END
      FROM ready
     WHERE m.msg_id = ready.msg_id
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.message, ready.prior_headers,
              ready.prior_read_at
){assigned}{noticed}, recorded AS MATERIALIZED (
    SELECT r.u FROM tasker.recorded_step_uuids(ARRAY(SELECT tasker.try_uuid(c.message ->> 'step_uuid') FROM claimed AS c)) AS r(u)
)
SELECT c.msg_id, c.read_ct, c.enqueued_at, c.last_read_at, c.message::text, c.prior_headers,
       coalesce(tasker.try_uuid(c.message ->> 'step_uuid') IN (SELECT r.u FROM recorded AS r), false),
       c.prior_read_at, NULL::text AS hold, NULL::float8 AS retry_after
  FROM claimed AS c{notice_join},
       set_config('synchronous_commit', 'off', true)
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'flow', NULL
  FROM tasker.queue_flow AS f WHERE f.namespace = {namespace}
"""

# The claim of a namespace under flow control (migration 0016): limits, pause, priority and
# groups are applied inside it, under the namespace's lock where a limit is counted. Same rows as
# the claim above; its row with a NULL msg_id says why fewer were taken ('none': no flow row,
# claim the plain way again; 'paused'; 'limited', with seconds until the rate allows a start).
CLAIM_FLOW = """
SELECT msg_id, read_ct, enqueued_at, last_read_at, message, prior_headers, done, prior_read_at,
       hold, retry_after
  FROM tasker.claim_flow(%(queue)s, %(qty)s, %(vt)s, %(stamp)s::jsonb, %(worker_id)s, %(skip_msgs)s::bigint[],
                         %(skip_handlers)s::text[], %(announce)s, %(stored)s)
"""

#: A worker saw a step with a priority or a group in a namespace: claim it in that order from now on.
NOTE_FLOW_FIELDS = "SELECT tasker.note_flow_fields(%s, %s, %s)"

#: Every namespace's flow control (``queue limit``, ``status``, ``/metrics``, the dashboard).
QUEUE_FLOW = """
SELECT namespace, paused, max_running, key_max_running, rate_count, rate_period_s, rate_burst,
       uses_priority, uses_groups, changed_at, changed_by
  FROM tasker.queue_flow ORDER BY namespace
"""

PAUSE_QUEUE = "SELECT tasker.pause_queue(%s, %s)"
RESUME_QUEUE = "SELECT tasker.resume_queue(%s, %s)"
SET_QUEUE_LIMITS = """
SELECT namespace FROM tasker.set_queue_limits(%(namespace)s, %(max_running)s, %(key_max_running)s,
                                              %(rate_count)s, %(rate_period_s)s, %(rate_burst)s, %(by)s)
"""

# --- notifications at many producers (migration 0020) ----------------------------------------
# A listening worker's rows in tasker.queue_listeners: alive (renewed each heartbeat interval),
# and its drain leases. While every live listener of a namespace holds a lease, the notify
# trigger announces nothing; a worker ending its drain releases its lease, waits for the sends
# that skipped, and claims once more (runtime/drains.py).

#: ``(namespace, notify, changed_at, server time)`` of each of the worker's namespaces; its rows
#: kept alive for ``%s`` seconds.
KEEP_LISTENING = "SELECT namespace, notify, changed_at, read_at FROM tasker.keep_listening(%s, %s::text[], %s)"
STOP_LISTENING = "SELECT tasker.stop_listening(%s)"
TAKE_DRAIN = "SELECT tasker.take_drain(%s, %s, %s, %s)"
END_DRAIN = "SELECT tasker.end_drain(%s, %s)"
#: True when no send that skipped its notification is still in flight (waits at most %s ms).
AWAIT_SKIPPED_SENDS = "SELECT tasker.await_skipped_sends(%s, %s)"
SET_QUEUE_NOTIFY = "SELECT tasker.set_queue_notify(%s, %s, %s)"
#: The namespaces whose notifications are off (no row: on).
QUIET_NAMESPACES = "SELECT namespace, changed_at, changed_by FROM tasker.queue_notify WHERE NOT notify ORDER BY 1"

# The indexes that keep a flow-controlled claim O(claimed) on a long queue: the claimed messages
# (counted against max_running), and the claim orders (priority; group then priority). Built
# CONCURRENTLY (no lock on producers) when a namespace first needs them; a claim is correct without
# them, only slower. {table}: pgmq.q_<queue>; {name}: the index's name.
FLOW_INDEXES = {
    "claimed": "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} (vt) WHERE headers ? 'tasker_claim'",
    "priority": "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} (tasker.step_priority(message), msg_id)",
    "group": (
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} "
        "(tasker.step_group(message), tasker.step_priority(message), msg_id)"
    ),
}
#: An index left invalid by a build that failed half-way (CREATE INDEX CONCURRENTLY leaves it).
INVALID_INDEX = """
SELECT c.relname FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid
 WHERE c.relname = %s AND c.relnamespace = 'pgmq'::regnamespace AND NOT i.indisvalid
"""

#: The key of a message's headers that names the worker holding its claim (migration 0010).
CLAIM_HEADER = "tasker_claim"

# A worker with peers says what it claimed (domain/herd.py): peers waiting on a notified message
# find it taken and send nothing. One notification per claim, sent when the claim commits; a
# materialized CTE (volatile), so it runs once whatever the plan.
_CLAIM_NOTICED = """, noticed AS (
    SELECT pg_notify({channel}, json_build_object(
               'q', {queue}, 'ids', (array_agg(c.msg_id ORDER BY c.msg_id))[1:100],
               'lo', min(c.msg_id), 'hi', max(c.msg_id), 'n', count(*))::text) AS sent
      FROM claimed AS c
    HAVING count(*) > 0
)"""

_CLAIM_NOTICE_JOIN = """
  LEFT JOIN noticed ON true"""

# A handler whose circuit is open is not claimed at all (its steps stay untouched, read_ct
# unchanged), nor are the steps this worker gave back to a capable one a moment ago.
_CLAIM_SKIP = """
       AND q.msg_id <> ALL (%(skip_msgs)s::bigint[])
       AND NOT (jsonb_typeof(q.message) = 'object' AND coalesce(q.message ->> 'handler' = ANY (%(skip_handlers)s::text[]), false))"""

# [events] step_events = "stored": StepAssigned as a row, in the claim's statement.
_CLAIM_ASSIGNED = """, logged AS (
    INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
    SELECT 'StepAssigned', %(worker_id)s, tasker.try_uuid(c.message ->> 'step_uuid'), {queue}, c.msg_id,
           jsonb_build_object('read_ct', c.read_ct), c.last_read_at
      FROM claimed AS c
)"""

# Settle finished steps: a fenced DELETE of each message (applied only while its read_ct is the
# one claimed) and its outcome row, at most one per step_uuid: the row goes to the partition of
# its step_uuid's time (tasker.uuid_time, migration 0021), whose primary key is the step_uuid,
# so ON CONFLICT DO NOTHING (the arbiter: that partition's key) keeps a second one out; steps whose producer waits for
# them (header tasker_notify) are named on tasker_outcome when this commits. A row without a status only
# settles (the step's outcome was recorded before). Returns the msg_ids settled; an input
# missing from the result was fenced out (a stale ack). Parameters: outcomes (one JSON array,
# see queue_client.encode_outcomes), worker_id.
_SETTLE = """
WITH input AS (
    SELECT * FROM jsonb_to_recordset(%(outcomes)s::text::jsonb)
        AS i(msg_id bigint, read_ct integer, status text, result jsonb, error jsonb,
             started_at float8, finished_at float8, source text,
             step_uuid uuid, task_uuid uuid, correlation_id uuid, handler text)
), settled AS (
    DELETE FROM {queue_table} AS q
     USING input AS i
     WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct
    RETURNING q.msg_id, q.read_ct, q.enqueued_at, q.last_read_at, q.vt, q.message, q.headers,
              i.status, i.result, i.error, i.started_at, i.finished_at, i.source,
              i.step_uuid, i.task_uuid, i.correlation_id, i.handler
){archived}, recorded AS (
    INSERT INTO tasker.step_results (
        step_uuid, task_uuid, correlation_id, namespace, queue_name, msg_id, handler, status,
        result, error, attempts, worker_id, enqueued_at, claimed_at, started_at, finished_at,
        source, events_stored, uuid_time)
    SELECT s.step_uuid, s.task_uuid, s.correlation_id, {namespace}, {queue}, s.msg_id, s.handler,
           s.status, s.result, s.error, s.read_ct, %(worker_id)s, s.enqueued_at, s.last_read_at,
           to_timestamp(s.started_at), coalesce(to_timestamp(s.finished_at), clock_timestamp()),
           s.source, {stored}, tasker.uuid_time(s.step_uuid)
      FROM settled AS s
     WHERE s.status IS NOT NULL AND s.step_uuid IS NOT NULL
    ON CONFLICT DO NOTHING{returning}
){logged}, notified AS (
    SELECT pg_notify({outcome_channel}, json_build_object(
               'step_uuids', (array_agg(s.step_uuid ORDER BY s.msg_id))[1:150])::text) AS sent
      FROM settled AS s
     WHERE s.status IS NOT NULL AND s.headers ? 'tasker_notify'
    HAVING count(*) > 0
)
SELECT s.msg_id{recorded} FROM settled AS s LEFT JOIN notified ON true
"""

# The settle inside a handler's own transaction also says whether the outcome row was written:
# when another run of the same step recorded first, the handler's writes must not commit.
_SETTLE_RECORDED = ", EXISTS (SELECT 1 FROM recorded AS r WHERE r.msg_id = s.msg_id)"

_SETTLE_RETURNING = """
    RETURNING worker_id, step_uuid, queue_name, msg_id, attempts, status, source, error, started_at, finished_at"""

# [queues] archive: the settled message is also kept in pgmq's archive table.
_SETTLE_ARCHIVE = """, archived AS (
    INSERT INTO {archive_table} (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
    SELECT s.msg_id, s.vt, s.read_ct, s.enqueued_at, s.last_read_at, s.message, s.headers
      FROM settled AS s
)"""

# [events] step_events = "stored": the outcome's events as rows (StepAssigned was stored at the claim).
_SETTLE_LOGGED = """, logged AS (
    INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data, occurred_at)
    SELECT o.event_type, r.worker_id, r.step_uuid, r.queue_name, r.msg_id, o.data, o.occurred_at
      FROM recorded AS r
     CROSS JOIN LATERAL tasker.outcome_events(r.attempts, r.status, r.source, r.error, NULL, r.started_at,
                                              r.finished_at, false) AS o
)"""


@dataclass(frozen=True)
class QueueStatements:
    """The step-path statements of one queue (its table names written in, built once)."""

    #: Parameters: qty, vt (seconds), worker_id (used with stored step events).
    claim: str
    #: The claim leaving some messages alone; also skip_msgs (bigint[]), skip_handlers (text[]).
    claim_skipping: str
    #: The claim and the claim leaving messages alone, each announcing what it took
    #: (``tasker_claimed.<namespace>``), for a worker with peers.
    claim_announcing: str
    claim_skipping_announcing: str
    #: Parameters: outcomes (JSON text), worker_id.
    settle: str
    #: The settle returning (msg_id, outcome row written) for each message settled.
    settle_reporting: str

    @classmethod
    def build(cls, queue: str, namespace: str, *, archive: bool, store_events: bool) -> QueueStatements:
        """The statements for ``queue``. Identifiers are quoted here; ``queue`` needs no checking
        beyond that (a queue that does not exist fails with UndefinedTable at execution)."""
        table = pgsql.Identifier("pgmq", "q_" + queue.lower())
        names = {
            "queue_table": table,
            "archive_table": pgsql.Identifier("pgmq", "a_" + queue.lower()),
            "queue": pgsql.Literal(queue),
            "namespace": pgsql.Literal(namespace),
            "stored": pgsql.Literal(store_events),
            "channel": pgsql.Literal(CLAIMED_PREFIX + namespace),
            "outcome_channel": pgsql.Literal(OUTCOME_CHANNEL),
        }

        def render(template: str, **parts: str) -> str:
            composed = pgsql.SQL(template.format_map({**{k: "{" + k + "}" for k in names}, **parts}))
            text: str = composed.format(**names).as_string(None)
            return text

        assigned = _CLAIM_ASSIGNED if store_events else ""
        quiet = {"assigned": assigned, "noticed": "", "notice_join": ""}
        loud = {"assigned": assigned, "noticed": _CLAIM_NOTICED, "notice_join": _CLAIM_NOTICE_JOIN}
        return cls(
            claim=render(_CLAIM, skip="", **quiet),
            claim_skipping=render(_CLAIM, skip=_CLAIM_SKIP, **quiet),
            claim_announcing=render(_CLAIM, skip="", **loud),
            claim_skipping_announcing=render(_CLAIM, skip=_CLAIM_SKIP, **loud),
            settle=render(
                _SETTLE,
                archived=_SETTLE_ARCHIVE if archive else "",
                returning=_SETTLE_RETURNING if store_events else "",
                logged=_SETTLE_LOGGED if store_events else "",
                recorded="",
            ),
            settle_reporting=render(
                _SETTLE,
                archived=_SETTLE_ARCHIVE if archive else "",
                returning=_SETTLE_RETURNING,
                logged=_SETTLE_LOGGED if store_events else "",
                recorded=_SETTLE_RECORDED,
            ),
        )


# The safety poll of a worker with several queues: which of them have a message visible now, in
# one statement (an index probe of each queue's vt index) instead of one claim per queue, so an
# idle worker's cost does not grow with its namespaces. Composed by ``visible_queues_statement``.
_VISIBLE_IN = "SELECT {name}::text WHERE EXISTS (SELECT 1 FROM {table} WHERE vt <= clock_timestamp())"


def visible_queues_statement(queues: list[str]) -> str:
    """The statement returning the names of ``queues`` that have a visible message."""
    parts = [
        pgsql.SQL(_VISIBLE_IN)
        .format(name=pgsql.Literal(q), table=pgsql.Identifier("pgmq", "q_" + q.lower()))
        .as_string(None)
        for q in queues
    ]
    return "\nUNION ALL\n".join(parts)


# A step given back for a capable worker: announce when it is ready again, as the send trigger
# announces a delayed message, so that listening workers come back for it (in EventDrivenOnly,
# which has no poller, nothing else would). The payload follows the trigger's message_ready
# (``delay_seconds``: the delay rounded to whole seconds, as tasker-core's field is).
ANNOUNCE_READY = f"""
SELECT pg_notify({_literal(MESSAGE_READY_PREFIX)} || a.ns,
                 CASE WHEN cardinality(a.ids) = 1
                 THEN json_build_object('event_type', 'message_ready', 'queue_name', a.q, 'namespace', a.ns,
                                        'msg_id', a.ids[1], 'message_count', 1, 'ready_at', a.ready,
                                        'delay_seconds', a.delay)
                 ELSE json_build_object('event_type', 'batch_ready', 'queue_name', a.q, 'namespace', a.ns,
                                        'msg_ids', a.ids[1:100], 'message_count', cardinality(a.ids),
                                        'min_msg_id', a.ids[1], 'max_msg_id', a.ids[cardinality(a.ids)],
                                        'truncated', cardinality(a.ids) > 100, 'ready_at', a.ready,
                                        'delay_seconds', a.delay)
                 END::text)
  FROM (SELECT %(queue)s::text AS q, tasker.queue_namespace(%(queue)s::text) AS ns, %(ids)s::bigint[] AS ids,
               clock_timestamp() + make_interval(secs => %(delay)s::float8) AS ready,
               least(round(greatest(%(delay)s::float8, 0)), 2147483647)::integer AS delay) AS a
"""

# A claim that found the previous one lapsed (migration 0010).
RECORD_LAPSED_CLAIM = """
INSERT INTO tasker.events (event_type, worker_id, step_uuid, queue_name, msg_id, data)
VALUES ('StepAssignmentTimedOut', %s, tasker.try_uuid(%s), %s, %s, %s)
"""

RETRY_STEPS = """
SELECT msg_id, applied
  FROM tasker.retry_steps(%s, %s, %s, %s, %s::jsonb[], %s)
"""

EXTEND_VT = "SELECT msg_id, vt FROM tasker.extend_vt(%s, %s, %s, %s)"

# The last two parameters: msg_ids and step_uuids of the steps whose producer waits for them
# (header tasker_notify), named on tasker_outcome once they are moved.
DEAD_LETTER_STEPS = f"""
WITH moved AS (
    SELECT msg_id, moved FROM tasker.dead_letter_steps(%s, %s, %s, %s, %s, %s::jsonb[], %s, %s, %s, %s)
), notified AS (
    SELECT pg_notify({_literal(OUTCOME_CHANNEL)}, json_build_object('step_uuids', (array_agg(w.u))[1:150])::text)
      FROM moved AS m JOIN unnest(%s::bigint[], %s::text[]) AS w(id, u) ON w.id = m.msg_id
     WHERE m.moved
    HAVING count(*) > 0
)
SELECT m.msg_id, m.moved FROM moved AS m LEFT JOIN notified ON true
"""

# --- dead-letter queues ----------------------------------------------------------------------

PEEK_MESSAGES = """
SELECT msg_id, enqueued_at, read_ct, message, headers
  FROM tasker.peek_messages(%s, %s)
"""

# Parameters: queue, msg_ids (NULL: all), actor (recorded in each DeadLetterRequeued event), limit.
REQUEUE_DEAD_LETTERS = "SELECT dlq_msg_id, new_msg_id FROM tasker.requeue_dead_letters(%s, %s, %s, %s)"

# --- outcomes ------------------------------------------------------------------------------

OUTCOME_COUNT = "SELECT count(*) FROM tasker.step_results"

OUTCOME_COUNT_WITH_STATUS = "SELECT count(*) FROM tasker.step_results WHERE status = %s"

OUTCOME_OF_STEP = "SELECT status, result, error, attempts, handler FROM tasker.step_results WHERE step_uuid = %s"

OUTCOMES_BY_STATUS_OF_WORKER = "SELECT status, count(*) FROM tasker.step_results WHERE worker_id = %s GROUP BY 1"

FAILURE_REASONS_OF_WORKER = """
SELECT error ->> 'reason', count(*) FROM tasker.step_results
 WHERE status <> 'succeeded' AND worker_id = %s
 GROUP BY 1
"""

LATEST_SUCCESS_RESULT = """
SELECT result FROM tasker.step_results WHERE status = 'succeeded' ORDER BY finished_at DESC LIMIT 1
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

# A leaving worker's last statistics (its heartbeat time stays that of its last heartbeat).
RECORD_FINAL_STATS = """
UPDATE tasker.workers
   SET cpu_percent = %(cpu_percent)s, memory_used = %(memory_used)s, active_steps = %(active_steps)s,
       processed = %(processed)s, busy = %(busy)s, stats = coalesce(%(stats)s, stats)
 WHERE worker_id = %(worker_id)s
"""

# The live listening workers of each of these namespaces (domain/herd.py ranks them), read in
# the heartbeat's transaction: the view costs no round trip of its own.
LISTENING_PEERS = """
SELECT n.ns, array_agg(w.worker_id ORDER BY w.worker_id)
  FROM tasker.workers AS w
 CROSS JOIN LATERAL unnest(w.namespaces) AS n(ns)
 WHERE w.status IN ('pending', 'active')
   AND w.deployment_mode IN ('Hybrid', 'EventDrivenOnly')
   AND coalesce(w.last_heartbeat_at, w.registered_at) > %(at)s - make_interval(secs => %(stale_s)s)
   AND n.ns = ANY (%(namespaces)s)
 GROUP BY n.ns
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
       coalesce(sum(active_steps), 0), coalesce(sum(cpu_percent), 0), coalesce(sum(memory_used), 0)
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

# Serializes the registrations that ask for one worker id (held to the end of the transaction).
LOCK_WORKER_ID = "SELECT pg_advisory_xact_lock(hashtext(%s))"

# --- retention (fleet/retention.py) --------------------------------------------------------

# The partitions of tasker.step_results (migration 0021): name, kind ('unstamped', 'default',
# 'day'), bounds, estimated rows.
HISTORY_PARTITIONS = "SELECT name, kind, from_time, to_time, estimated_rows FROM tasker.history_partitions()"

# The partition of one UTC day (created unless one covers it; whether it was). Parameters: the
# day, the longest wait in ms for the default partition's lock.
CREATE_HISTORY_PARTITION = "SELECT tasker.create_history_partition(%s::date, %s)"

# A migration's partitions: today's (UTC, the server's clock) and the %s days after it, in the
# migration's transaction. Without them a new database's first outcomes went to the default
# partition and the first supervisor moved them out under the table's exclusive lock, four
# times, while the first worker's steps settled. Parameters: the lock wait in ms, the days.
CREATE_FIRST_HISTORY_PARTITIONS = """
SELECT tasker.create_history_partition((timezone('UTC', now()))::date + d, %s) FROM generate_series(0, %s) AS d
"""

# One day partition dropped whole if nothing in it can still be needed ('dropped'), or why not
# ('not_due', 'queued', 'recent_rows', 'locked'). Parameters: its name, the cutoff (now minus
# the longest outcome horizon), the longest wait in ms for the table's exclusive lock.
DROP_HISTORY_PARTITION = "SELECT tasker.drop_history_partition(%s, %s, %s)"

# One batch of outcome rows of one partition ({partition}: its identifier; a ctid names a row
# within one partition only) finished before the cutoff, of the namespaces in ``only`` (or, when
# ``only`` is empty, of every namespace not in ``others``: those have horizons of their own).
# Found through the BRIN index on finished_at, deleted by ctid: a short transaction that locks
# only rows nobody else touches (a finished step's row is never updated).
PRUNE_OUTCOMES = """
DELETE FROM {partition}
 WHERE ctid = ANY (ARRAY(
       SELECT ctid FROM {partition}
        WHERE finished_at < %(cutoff)s
          AND (CASE WHEN cardinality(%(only)s::text[]) > 0 THEN namespace = ANY (%(only)s::text[])
                    ELSE namespace <> ALL (%(others)s::text[]) END)
        LIMIT %(batch)s))
"""

# Idempotency keys (tasker.enqueue_step) older than the longest outcome horizon.
PRUNE_STEP_KEYS = """
DELETE FROM tasker.step_keys
 WHERE step_uuid = ANY (ARRAY(
       SELECT step_uuid FROM tasker.step_keys WHERE created_at < %(cutoff)s LIMIT %(batch)s))
"""

# What steps reported while running, and cancel requests, older than the longest outcome horizon;
# unique windows that are over (migration 0019).
PRUNE_STEP_PROGRESS = """
DELETE FROM tasker.step_progress
 WHERE step_uuid = ANY (ARRAY(
       SELECT step_uuid FROM tasker.step_progress WHERE updated_at < %(cutoff)s LIMIT %(batch)s))
"""
PRUNE_CANCELLATIONS = """
DELETE FROM tasker.step_cancellations
 WHERE step_uuid = ANY (ARRAY(
       SELECT step_uuid FROM tasker.step_cancellations WHERE requested_at < %(cutoff)s LIMIT %(batch)s))
"""
PRUNE_UNIQUE_KEYS = """
DELETE FROM tasker.unique_keys AS u
 USING (SELECT namespace, unique_key FROM tasker.unique_keys
         WHERE expires_at < clock_timestamp() LIMIT %(batch)s) AS o
 WHERE u.namespace = o.namespace AND u.unique_key = o.unique_key AND u.expires_at < clock_timestamp()
"""

PRUNE_HEARTBEATS = """
DELETE FROM tasker.worker_heartbeats
 WHERE heartbeat_id = ANY (ARRAY(
       SELECT heartbeat_id FROM tasker.worker_heartbeats WHERE at < %(cutoff)s LIMIT %(batch)s))
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

# Replay reads the log and the live rows as of one moment.
CONSISTENT_READ = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"

# Keeps two compactions from interleaving (held to the end of the transaction).
TRY_COMPACTION_LOCK = "SELECT pg_try_advisory_xact_lock(%s)"

LIVE_PROJECTION = "SELECT " + WORKER_COLUMNS + " FROM tasker.workers"

LOG_STEP_EVENTS = "SELECT tasker.log_step_events(%s, %s, %s, %s, %s, %s::jsonb[])"

# --- listening -----------------------------------------------------------------------------

# Composed with the channel's identifier (``sql.SQL(LISTEN).format(sql.Identifier(channel))``).
LISTEN = "LISTEN {}"


def listen_all(channels: list[str]) -> pgsql.Composed:
    """LISTEN on every one of ``channels`` in one statement: sent without parameters (the simple
    protocol), it is one round trip and one transaction, where a LISTEN per channel cost three
    per namespace at every (re)connect of a listener."""
    return pgsql.SQL("; ").join(pgsql.SQL(LISTEN).format(pgsql.Identifier(c)) for c in channels)


NOTIFY = "SELECT pg_notify(%s, %s)"

# A round trip that proves a quiet session (and whatever it holds: LISTEN, a lock) is alive.
PING = "SELECT 1"

# --- test databases (the pytest plugin); composed with identifiers -----------------------------

CREATE_DATABASE_FROM = "CREATE DATABASE {} TEMPLATE {}"

DROP_DATABASE = "DROP DATABASE IF EXISTS {} WITH (FORCE)"

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

# The server behind [database] read_url: a standby (in recovery) or a primary; whether its WAL
# receiver streams (no row: it does not; its status is NULL without pg_read_all_stats), whether
# it replayed all it received, replay paused, and the age of the last commit it replayed.
REPLICA_STATE = """
SELECT pg_is_in_recovery(),
       (SELECT CASE WHEN count(*) = 0 THEN false ELSE bool_or(status = 'streaming') END
          FROM pg_stat_wal_receiver),
       coalesce(pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn(), false),
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END,
       extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8
"""

QUEUE_DEAD_TUPLES = r"""
SELECT relname, n_live_tup, n_dead_tup
  FROM pg_stat_all_tables
 WHERE schemaname = 'pgmq' AND relname LIKE 'q\_%%'
 ORDER BY n_dead_tup DESC
"""

# --- dashboard (api/dashboard) -------------------------------------------------------------

# Every queue's depth and visible count, each counted up to a cap, and its oldest message.
QUEUE_GLANCE = "SELECT queue_name, depth, visible, capped, oldest_enqueued_at FROM tasker.queue_glance(%s)"

# Outcomes per namespace and time bucket (epoch seconds / bucket) over the last window seconds;
# the BRIN index on finished_at keeps the range read to the pages of that window.
OUTCOME_BUCKETS = """
SELECT namespace,
       floor(extract(epoch FROM finished_at) / %(bucket)s)::bigint AS bucket,
       count(*) AS outcomes,
       count(*) FILTER (WHERE status IN ('failed', 'dead_lettered')) AS errors
  FROM tasker.step_results
 WHERE finished_at > clock_timestamp() - make_interval(secs => %(window)s)
 GROUP BY 1, 2
"""

# A worker's own events (not its steps'), newest first: events_worker_idx answers it.
WORKER_TIMELINE = """
SELECT event_id, event_type, data, occurred_at
  FROM tasker.events
 WHERE worker_id = %s AND step_uuid IS NULL
 ORDER BY event_id DESC
 LIMIT %s
"""

# A step's events, stored and derived from its outcome row (the view tasker.event_log), in the
# order they happened; the step_uuid reaches each branch (events_step_idx, step_results' key).
STEP_EVENTS = """
SELECT event_id, event_type, worker_id, queue_name, msg_id, data, occurred_at
  FROM tasker.event_log
 WHERE step_uuid = %s
 ORDER BY occurred_at, event_id NULLS LAST
 LIMIT %s
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
