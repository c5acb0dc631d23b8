"""Every configuration key with its default, its environment variable and what it does (for
docs and CLI)."""

from __future__ import annotations

import json

from tasker_worker.config.loader import ENV_PREFIX, leaves
from tasker_worker.config.models import TaskerConfig

#: What each key does: the description column of ``config reference`` and of
#: docs/configuration.md (tests/test_docs.py checks that the two agree row by row).
DESCRIPTIONS: dict[str, str] = {
    "database.url": "PostgreSQL URL (`TASKER_DATABASE_URL` also works); unset: the embedded server, attached to when it runs, else started and left running (`tasker-worker db stop` stops it)",
    "database.read_url": "a read replica (hot standby) for the dashboard, `status`, `workers list/show/stats`, `steps list/show` and the API's reads (`TASKER_DATABASE_READ_URL` also works): as stale as its replay lag, which they show; writes, claims, heartbeats and the producer never use it (see operations.md)",
    "database.pooler": '`"transaction"` when the URL goes through a transaction pooler (PgBouncer `pool_mode = transaction`): no prepared statements, no session state, PollingOnly only, no supervision candidacy (see below)',
    "database.embedded_data_dir": "data directory of the embedded server (default: the user's data directory)",
    "database.auto_migrate": "apply pending migrations at start (off: run `tasker-worker db migrate` yourself)",
    "database.pool_min_size": "connections kept open",
    "database.pool_max_size": "connection pool ceiling (claims, outcome writes, handler transactions)",
    "database.connect_timeout": "time allowed to connect",
    "event_system.system_id": "name of the event system: a field of every log line and a column of the worker's row",
    "event_system.deployment_mode": "`PollingOnly`, `Hybrid` or `EventDrivenOnly` (see operations.md); live on SIGHUP and `mode set`",
    "event_system.health_monitoring_enabled": "the worker judges its own health every `health_check_interval` (listener, missed wakeups, error rate, circuits), logs each change, reports it in its status and heartbeat; off: no self-checks",
    "event_system.health_check_interval": "how often the worker's health monitor runs",
    "event_system.max_concurrent_processors": "steps run at once by one worker process",
    "event_system.processing_timeout": "as in tasker-core: how long one command of the event system (the claim a wakeup triggers) may take before it is abandoned, counted (`claims_timed_out`) and retried; not a handler timeout",
    "event_system.command_buffer_size": "bound of the channel from the sources to the processor",
    "event_system.listener.enabled": "run the LISTEN connection in Hybrid/EventDrivenOnly",
    "event_system.listener.batch_processing": "notifications are coalesced per queue (those arriving during a claim wake one claim after it); `false` is refused",
    "event_system.listener.connection_timeout": "connect time, and how long the startup probe NOTIFY may take",
    "event_system.listener.liveness_interval": "an idle listener checks its connection this often",
    "event_system.listener.max_reconnect_delay": "ceiling of the reconnect backoff",
    "event_system.listener.single_claimer": "one claim per notified message however many workers hear it: the first-ranked live listening worker claims at once, the others only if it has not after `claim_grace` (docs/architecture.md); `false`: every listening worker claims on every notification",
    "event_system.listener.claim_grace": "how long a worker that is not first in line for a notified message waits (per rank) before claiming it itself",
    "event_system.fallback_poller.enabled": "run the poller in PollingOnly/Hybrid",
    "event_system.fallback_poller.polling_interval": "poll interval (Hybrid: the safety net)",
    "event_system.fallback_poller.degraded_interval": "Hybrid's poll interval while the listener is down",
    "event_system.fallback_poller.batch_size": "most messages one claim takes",
    "event_system.fallback_poller.visibility_timeout": "how long a claim hides a message (extended while the step runs)",
    "worker.id": "fixed worker id (default: name-host-pid-random)",
    "worker.name": "worker name shown in the registry and logs",
    "worker.namespaces": "namespaces served (queues `worker_<ns>_queue`)",
    "worker.handler_modules": "modules whose `register(worker)` adds handlers (the planners are one: list it beside yours to keep `path_plan`)",
    "worker.executor": "where sync handlers run: `thread` or `process`",
    "worker.executor_workers": "size of that pool",
    "worker.handler_timeout": "default time a handler may run (a handler's `timeout=` and the step's `timeout` win)",
    "worker.tracing": "OpenTelemetry spans around steps, continuing a `traceparent` found in the message headers: "
    '`"auto"` when the `otel` extra is installed and a TracerProvider is set at start, `"off"` never',
    "worker.periodic_timeout": "default timeout of periodic jobs",
    "worker.shutdown_timeout": "the whole graceful shutdown: handlers may finish until it less a reserve for the final writes (30%, at most 2 s); then unfinished steps are released, results flushed and the worker deregistered, all by this deadline; the process exits within it + 1 s even with the database stopped or unreachable (what could not be written is logged with its count and returns at its vt)",
    "worker.max_rejections": "times a step needing a missing capability is bounced before the DLQ",
    "worker.prefetch": "steps claimed ahead of the free slots while a backlog is worked through (0: none); never for a namespace under flow control",
    "worker.cancel_grace": "how long a step asked to stop (`steps cancel`) may end by itself (`ctx.cancelled`) before an async handler is cancelled",
    "worker.stats_window": "latency samples kept for percentiles",
    "worker.event_loop": "event loop of `tasker-worker run`: `auto` (uvloop when installed), `asyncio` or `uvloop`",
    "retry.max_attempts": "attempts before a failing step goes to the DLQ (a step's `attempt_limit` wins)",
    "retry.base_delay": "first retry delay (doubles each attempt)",
    "retry.max_delay": "retry delay ceiling",
    "retry.jitter": "random fraction added to each delay",
    "retry.max_releases": "attempt-free retries (DependencyUnavailable, broken connection) per message",
    "retry.max_snoozes": "snoozes (a handler's `Snooze`) per message; one more fails the step (a handler's `max_snoozes=` wins)",
    "queues.archive": "also keep each settled message in pgmq's archive `a_worker_<ns>_queue` (the outcome row is the record either way); per namespace: `[queues.namespaces.<ns>] archive`",
    "circuit_breaker.enabled": "open circuits for handlers whose dependency is unavailable",
    "circuit_breaker.failure_threshold": "`DependencyUnavailable` in a row that open a handler's circuit",
    "circuit_breaker.cooldown": "how long an open circuit keeps the handler's steps unclaimed",
    "circuit_breaker.max_cooldown": "ceiling of the cooldown, which doubles after each failed probe",
    "handlers.planning.algorithms": "path planners this worker offers (registered as capabilities)",
    "handlers.planning.max_cells": "largest grid accepted",
    "handlers.planning.timeout": "planning handler timeout",
    "logging.level": "`DEBUG`, `INFO`, `WARNING`, `ERROR`; live on SIGHUP",
    "logging.format": "`auto` (key=value on a terminal, JSON otherwise), `json`, `text`; live on SIGHUP",
    "registry.enabled": "register and heartbeat in `tasker.workers` (also what `mode set` needs)",
    "registry.heartbeat_interval": "heartbeat period; also how often a worker checks for a requested mode",
    "registry.stale_timeout": "no heartbeat this long: marked offline",
    "registry.heartbeat_history": "heartbeat rows kept per worker",
    "registry.registration_attempts": "attempts at registering at start",
    "registry.registration_max_delay": "ceiling of the registration backoff",
    "registry.supervision_enabled": "take part in the leader election for the supervision jobs",
    "registry.activate_interval": "how often pending workers with a heartbeat become active",
    "registry.stale_check_interval": "how often stale workers are marked offline",
    "registry.reactivate_interval": "how often offline workers that heartbeat again are reactivated",
    "events.step_events": "`derived`: step events are read from outcome rows (view `tasker.event_log`), only retries, releases, rejections and timeouts are rows; `stored`: every step event is a row of `tasker.events`",
    "events.retention": "events older than this are compacted into a snapshot",
    "events.compaction_interval": "how often compaction runs",
    "retention.enabled": "the elected supervisor prunes history (outcome and heartbeat rows) in bounded batches",
    "retention.outcomes": "outcome rows finished longer ago are deleted; this is also the **dedup horizon** (a step re-sent after its outcome row is gone runs again), so it may not be shorter than the visibility timeout plus every retry and release delay; per namespace: `[retention.namespaces.<ns>] outcomes`",
    "retention.heartbeats": "heartbeat history rows older than this are deleted",
    "retention.interval": "how often the pruning job runs",
    "retention.batch_size": "rows deleted per statement (each batch its own short transaction, a pause after it)",
    "api.enabled": "serve the HTTP API inside `run`",
    "api.host": "API bind address; anything but loopback needs `api.token` (the API refuses to start otherwise)",
    "api.port": "API port (0: any free port)",
    "api.token": "bearer token required by mutating routes (compared in constant time); required when `api.host` is not loopback; the dashboard's actions need it always",
    "api.dashboard": "serve the dashboard (HTML pages at `/`) beside the JSON API",
    "api.max_queue_age": "`/health/detailed`: oldest message age before degraded",
    "api.max_xmin_age": "`/health/detailed`: oldest transaction age before degraded",
    "api.max_error_rate": "`/health/detailed`: handler error share per minute before degraded",
    "api.max_notify_queue_usage": "`/health/detailed`: NOTIFY queue usage before degraded",
}


def env_var(dotted: str) -> str:
    """The environment variable that sets ``dotted`` (``TASKER__SECTION__KEY``)."""
    return ENV_PREFIX + "__".join(part.upper() for part in dotted.split("."))


def reference_rows() -> list[tuple[str, str, str, str]]:
    """``(dotted key, default as TOML text, environment variable, description)`` for every leaf
    key (durations as written: ``"7d"``, not ``"10080m"``)."""
    return [
        (key, "unset" if value is None else json.dumps(value), env_var(key), DESCRIPTIONS.get(key, ""))
        for key, value in leaves(TaskerConfig())
        if key != "environment"
    ]


def markdown_table() -> str:
    """The rows as the table of ``docs/configuration.md``."""
    lines = ["| key | default | environment variable | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | `{e}` | {text} |" for k, d, e, text in reference_rows()]
    return "\n".join(lines)


__all__ = ["DESCRIPTIONS", "env_var", "markdown_table", "reference_rows"]
