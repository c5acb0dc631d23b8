"""The configuration models.

The ``[event_system]`` tree keeps the names of the seed's worker config (``deployment_mode``,
``[event_system.listener]``, ``[event_system.fallback_poller]``); the other sections follow the
same style. tasker-core's own layout (``[worker.event_systems.worker]``, integer ``_seconds`` and
``_ms`` keys) is not these models' shape: it loads through the mapping of
``config/tasker_core.py``. Every model forbids unknown keys, so a typo fails loudly instead of
silently using a default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tasker_worker.config.durations import Duration, format_duration

# Re-exported: the configuration names its starting mode with it.
from tasker_worker.domain.modes import DeploymentMode as DeploymentMode
from tasker_worker.domain.names import checked_namespaces
from tasker_worker.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ListenerConfig(_Section):
    """``[event_system.listener]``: the LISTEN connection."""

    enabled: bool = True
    #: Notifications are coalesced per queue: those that arrive while a queue's claim runs wake
    #: one claim after it. ``false`` (one claim per notification) is refused: it would only
    #: multiply claims that find nothing.
    batch_processing: bool = True
    #: Time allowed to connect, and for the startup LISTEN self-check to see its probe.
    connection_timeout: Duration = timedelta(seconds=5)
    #: How often an idle listener checks that its connection is alive.
    liveness_interval: Duration = timedelta(seconds=5)
    #: Ceiling of the exponential reconnect backoff.
    max_reconnect_delay: Duration = timedelta(seconds=10)
    #: One claim per notified message, however many workers hear it (``domain/herd.py``): the
    #: first-ranked worker claims at once, the others only if it has not after ``claim_grace``
    #: (times their rank). Off: every listening worker claims on every notification.
    single_claimer: bool = True
    #: How long a worker that is not first in line for a notified message waits (per rank)
    #: before claiming it itself.
    claim_grace: Duration = timedelta(milliseconds=50)

    @field_validator("batch_processing")
    @classmethod
    def _coalesced(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "false is not supported: notifications are always coalesced per queue (leave it out or set true)"
            )
        return value


class FallbackPollerConfig(_Section):
    """``[event_system.fallback_poller]``: the periodic claim."""

    enabled: bool = True
    polling_interval: Duration = timedelta(seconds=5)
    #: Hybrid only: the interval used while the listener is down.
    degraded_interval: Duration = timedelta(milliseconds=250)
    batch_size: int = Field(default=100, ge=1, le=1000)
    visibility_timeout: Duration = timedelta(seconds=30)

    @field_validator("polling_interval", "degraded_interval", "visibility_timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 0.01:
            raise ValueError("must be at least 10ms")
        return value


class EventSystemConfig(_Section):
    """``[event_system]``: deployment mode and the processor's limits."""

    #: The event system's name: on every log line (``system_id``) and in the worker's row.
    system_id: str = Field(default="worker-event-system", min_length=1, max_length=100)
    deployment_mode: DeploymentMode = DeploymentMode.HYBRID
    #: The worker judges its own health (listener, missed wakeups, error rate, open circuits)
    #: every ``health_check_interval``, logs each change and reports it in its status.
    health_monitoring_enabled: bool = True
    health_check_interval: Duration = timedelta(seconds=10)
    max_concurrent_processors: int = Field(default=128, ge=1, le=4096)
    #: As in tasker-core: how long the processing of one command may take (here, the claim a
    #: wakeup triggers), after which it is abandoned, counted (``claims_timed_out``) and retried.
    #: Not a handler timeout: that is ``[worker] handler_timeout``.
    processing_timeout: Duration = timedelta(seconds=5)
    #: Bound of the channel between the sources and the command processor.
    command_buffer_size: int = Field(default=1024, ge=1, le=1_000_000)
    listener: ListenerConfig = Field(default_factory=ListenerConfig)
    fallback_poller: FallbackPollerConfig = Field(default_factory=FallbackPollerConfig)

    @field_validator("processing_timeout", "health_check_interval")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 0.01:
            raise ValueError("must be at least 10ms")
        return value


class DatabaseConfig(_Section):
    """``[database]``: where PostgreSQL is, or where the embedded one keeps its data."""

    url: str | None = None
    #: A read replica (a hot standby) for what only reads: the dashboard, ``status``, ``workers
    #: list|show|stats``, ``steps list|show`` and the API's GET routes other than health and
    #: metrics. As stale as the standby's replay lag (shown where it is read). Writes, claims,
    #: heartbeats, LISTEN, the supervision lock and the producer's client never use it.
    read_url: str | None = None
    #: What sits between the worker and PostgreSQL. ``"transaction"``: a transaction pooler
    #: (PgBouncer ``pool_mode = transaction``, which before 1.21 keeps no prepared statements):
    #: the worker then uses no server-side prepared statements and no session state (no LISTEN,
    #: no session advisory lock), so it runs PollingOnly and leaves supervision to a process
    #: connected directly. ``"none"``: a direct connection (or a session pooler).
    pooler: Literal["none", "transaction"] = "none"

    def refuses(self, mode: DeploymentMode) -> str | None:
        """Why ``mode`` cannot run over this connection (None: it can). The one rule behind the
        configuration check and the refusal of a ``mode set`` at runtime."""
        if self.pooler == "transaction" and mode.uses_listener:
            return 'a transaction pooler (database.pooler = "transaction") does not carry LISTEN'
        return None

    #: Data directory of the embedded server (default: the user's data directory).
    embedded_data_dir: Path | None = None
    auto_migrate: bool = True
    pool_min_size: int = Field(default=1, ge=0, le=1000)
    pool_max_size: int = Field(default=8, ge=1, le=1000)
    connect_timeout: Duration = timedelta(seconds=10)

    @model_validator(mode="after")
    def _pool_bounds(self) -> DatabaseConfig:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("pool_min_size must not exceed pool_max_size")
        return self


#: The name of ``[database]``'s cluster, the primary: the registry, heartbeats, supervision, mode
#: control and the claim ranking live there, and so does every namespace mapped nowhere else.
PRIMARY = "primary"

#: A cluster's name in ``[databases.<name>]`` (and a value of ``[queues.namespaces.<ns>] database``
#: that is not a URL): what status, ``/metrics`` and errors call it.
CLUSTER_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
_CLUSTER_NAME_RE = re.compile(CLUSTER_NAME_PATTERN)


def is_database_url(value: str) -> bool:
    """Whether ``value`` reads as a PostgreSQL connection string (a ``postgresql://`` URL or a
    ``key=value`` conninfo), rather than a cluster's name."""
    return value.startswith(("postgresql://", "postgres://")) or "=" in value


class ClusterDatabaseConfig(_Section):
    """``[databases.<name>]``: another PostgreSQL cluster, holding the namespaces that name it
    (``[queues.namespaces.<ns>] database = "<name>"``). Each key but ``url`` defaults to
    ``[database]``'s; the embedded server is only ever the primary."""

    url: str = Field(min_length=1)
    pooler: Literal["none", "transaction"] | None = None
    auto_migrate: bool | None = None
    pool_min_size: int | None = Field(default=None, ge=0, le=1000)
    pool_max_size: int | None = Field(default=None, ge=1, le=1000)
    connect_timeout: Duration | None = None

    @field_validator("url")
    @classmethod
    def _a_url(cls, value: str) -> str:
        if not is_database_url(value):
            raise ValueError("must be a PostgreSQL URL (postgresql://user@host:5432/dbname) or a key=value conninfo")
        return value

    def settings(self, primary: DatabaseConfig) -> DatabaseConfig:
        """Its ``[database]``-shaped settings: its own keys, the others as ``primary`` has them.
        Only the keys listed here are inherited (the primary's URL-specific keys are its own)."""
        return _inherited(primary, self.url, **self.model_dump(exclude={"url"}, exclude_none=True))


def _inherited(primary: DatabaseConfig, url: str, **own: Any) -> DatabaseConfig:
    """A cluster's settings at ``url``: ``own`` over the pool keys of ``primary``."""
    keys = ("pooler", "auto_migrate", "pool_min_size", "pool_max_size", "connect_timeout")
    return DatabaseConfig(url=url, **{key: own.get(key, getattr(primary, key)) for key in keys})


@dataclass(frozen=True)
class ClusterSpec:
    """One configured PostgreSQL cluster: its name, URL and settings."""

    name: str
    #: None: the primary on the embedded server (resolved when it is opened).
    url: str | None
    settings: DatabaseConfig
    #: The configuration key that set its URL (for messages that say what to fix).
    key: str


def _url_cluster_name(url: str) -> str:
    """The name of a cluster given by URL alone: ``dbname@host:port`` (no user, no password)."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(url)
    except Exception:  # an unparsable URL fails when it is opened, naming its key
        return "url"
    return f"{info.get('dbname', '')}@{info.get('host', 'localhost')}:{info.get('port', 5432)}"


class WorkerConfig(_Section):
    """``[worker]``: identity, namespaces, handler code and lifecycle."""

    id: str | None = None
    name: str = "tasker-worker"
    namespaces: list[str] = Field(default_factory=lambda: ["default"])
    #: Import paths of user modules that register handlers (``my_app.handlers``).
    handler_modules: list[str] = Field(default_factory=lambda: ["tasker_worker.handlers.planning"])
    #: Where sync (CPU-bound) handlers run.
    executor: Literal["thread", "process"] = "thread"
    executor_workers: int = Field(default=4, ge=1, le=256)
    #: Default time a handler may run (a handler's ``timeout=`` and the step's ``timeout`` win).
    handler_timeout: Duration = timedelta(seconds=5)
    #: OpenTelemetry spans around steps (``runtime/tracing.py``): ``auto`` when the ``otel``
    #: extra is installed and a TracerProvider is set when the worker starts, ``off`` never.
    tracing: Literal["auto", "off"] = "auto"
    periodic_timeout: Duration = timedelta(seconds=30)
    shutdown_timeout: Duration = timedelta(seconds=30)
    #: A step this worker lacks the capability for is released for others this many times at
    #: most, then dead-lettered (at once when no running worker offers the capability).
    max_rejections: int = Field(default=5, ge=1, le=1000)
    #: Steps claimed ahead of the free slots while a backlog is worked through, so that a slot
    #: that frees starts the next step without waiting for a claim (0: claim only for free slots).
    #: Their vt counts from the claim (kept by the vt keeper); given back at shutdown without an
    #: attempt; none for a namespace under flow control.
    prefetch: int = Field(default=128, ge=0, le=4096)
    #: A step asked to stop (``steps cancel``) may end by itself this long (``ctx.cancelled``)
    #: before an async handler's task is cancelled.
    cancel_grace: Duration = timedelta(seconds=5)
    #: How many recent latency samples the statistics keep.
    stats_window: int = Field(default=100_000, ge=100, le=10_000_000)
    #: The event loop of ``tasker-worker run``: ``auto`` takes uvloop where it is installed (a
    #: default dependency except on Windows; about 12% less worker CPU per step), else asyncio.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one namespace is required")
        return checked_namespaces(value)


class RetryConfig(_Section):
    """``[retry]``: backoff of retryable failures (through the message's vt)."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    base_delay: Duration = timedelta(seconds=1)
    max_delay: Duration = timedelta(seconds=30)
    #: Fraction of random jitter added to each delay (0 disables it).
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)
    #: Retries that use no attempt (DependencyUnavailable, a broken database connection) per
    #: message; past this many, each further failure counts as an attempt, so nothing retries
    #: forever.
    max_releases: int = Field(default=100, ge=0, le=100_000)
    #: Snoozes (a handler's ``Snooze``) per message, at most; one more fails the step.
    max_snoozes: int = Field(default=100, ge=0, le=100_000)


class CircuitBreakerConfig(_Section):
    """``[circuit_breaker]``: stop running a handler whose dependency keeps being unavailable."""

    enabled: bool = True
    #: ``DependencyUnavailable`` in a row (nothing else in between) that open the circuit.
    failure_threshold: int = Field(default=5, ge=1, le=10_000)
    #: How long an open circuit keeps the handler's steps unclaimed before one probe runs.
    cooldown: Duration = timedelta(seconds=30)
    #: Each failed probe doubles the cooldown up to this.
    max_cooldown: Duration = timedelta(minutes=5)

    @model_validator(mode="after")
    def _bounds(self) -> CircuitBreakerConfig:
        if self.cooldown.total_seconds() < 0.01:
            raise ValueError("cooldown must be at least 10ms")
        if self.max_cooldown < self.cooldown:
            raise ValueError("max_cooldown must not be shorter than cooldown")
        return self


Algorithm = Literal["astar", "dijkstra", "theta_star"]
ALGORITHMS: tuple[Algorithm, ...] = ("astar", "dijkstra", "theta_star")


class PlanningConfig(_Section):
    """``[handlers.planning]``: what the built-in path planners accept."""

    algorithms: list[Algorithm] = Field(default_factory=lambda: list(ALGORITHMS))
    max_cells: int = Field(default=4_194_304, ge=1, le=100_000_000)
    timeout: Duration = timedelta(seconds=5)


class HandlersConfig(_Section):
    """``[handlers]``: settings of the built-in handlers."""

    planning: PlanningConfig = Field(default_factory=PlanningConfig)


class RegistryConfig(_Section):
    """``[registry]``: registration, heartbeats and the supervision jobs."""

    enabled: bool = True
    heartbeat_interval: Duration = timedelta(seconds=30)
    #: A worker with no heartbeat for this long is marked offline.
    stale_timeout: Duration = timedelta(minutes=2)
    #: Heartbeat rows kept per worker (older ones are trimmed as new ones arrive).
    heartbeat_history: int = Field(default=100, ge=1, le=100_000)
    registration_attempts: int = Field(default=5, ge=1, le=100)
    registration_max_delay: Duration = timedelta(seconds=10)
    #: Whether this process takes part in the leader election for the supervision jobs.
    supervision_enabled: bool = True
    activate_interval: Duration = timedelta(seconds=10)
    stale_check_interval: Duration = timedelta(seconds=30)
    reactivate_interval: Duration = timedelta(seconds=30)

    @field_validator(
        "heartbeat_interval", "stale_timeout", "activate_interval", "stale_check_interval", "reactivate_interval"
    )
    @classmethod
    def _at_least_10ms(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 0.01:
            raise ValueError("must be at least 10ms")
        return value


def _valid_namespace_keys(value: dict[str, Any]) -> dict[str, Any]:
    """The keys of a per-namespace table must be valid namespaces (the CLI's and SQL's rule)."""
    checked_namespaces(value)
    return value


class QueueNamespaceConfig(_Section):
    """``[queues.namespaces.<ns>]``: settings of one namespace's queue."""

    #: Keep settled messages in pgmq's archive table ``a_worker_<ns>_queue`` (unset: ``[queues] archive``).
    archive: bool | None = None
    #: Announce the namespace's sends with NOTIFY (``false``: its workers find them by polling,
    #: and producers commit without the database-wide notify lock). Kept in the database
    #: (``tasker.queue_notify``, which the send trigger reads): a worker whose configuration sets
    #: it writes it at start; unset leaves what the database holds (``tasker.set_queue_notify``).
    notify: bool | None = None
    #: The PostgreSQL cluster that holds this namespace's queue and outcome rows: a name of
    #: ``[databases]`` (or ``"primary"``), or a URL. Unset: the primary, ``[database]``.
    database: str | None = Field(default=None, min_length=1)


class QueuesConfig(_Section):
    """``[queues]``: what happens to a settled message."""

    #: Keep each settled message in pgmq's archive table besides its outcome row. Off by default:
    #: the outcome row in ``tasker.step_results`` is the step's record (ids, handler, attempts,
    #: enqueue/claim/start/finish times, worker, source, status, result, error), and the archive
    #: insert is a second row per step. Dead-lettered messages always go whole to ``<queue>_dlq``.
    archive: bool = False
    #: Per-namespace settings: ``[queues.namespaces.billing] archive = true``, ``notify = false``.
    namespaces: dict[str, QueueNamespaceConfig] = Field(default_factory=dict)

    @field_validator("namespaces")
    @classmethod
    def _namespace_keys(cls, value: dict[str, QueueNamespaceConfig]) -> dict[str, QueueNamespaceConfig]:
        return _valid_namespace_keys(value)

    def archive_for(self, namespace: str) -> bool:
        """Whether settled messages of ``namespace`` are archived."""
        own = self.namespaces.get(namespace)
        return self.archive if own is None or own.archive is None else own.archive

    def notify_for(self, namespace: str) -> bool | None:
        """Whether this configuration turns the notifications of ``namespace`` on or off (None:
        it says nothing, the database's setting stands)."""
        own = self.namespaces.get(namespace)
        return None if own is None else own.notify


class EventsConfig(_Section):
    """``[events]``: the event log."""

    #: How the step assignment events (StepAssigned ... StepCompleted) are kept. ``derived``: the
    #: events a step's outcome row implies (assigned, accepted, completed/failed/dead-lettered)
    #: are read from that row through the view ``tasker.event_log``, and only what has no
    #: outcome row (retries, releases, rejections, handler timeouts) is stored; no event row is
    #: written on a step's normal path. ``stored``: every step event is a row of
    #: ``tasker.events``, as before 0.2 (three more rows per step). The booleans of earlier
    #: versions read as ``derived``.
    step_events: Literal["derived", "stored"] = "derived"
    #: Events older than this are compacted into a snapshot and deleted.
    retention: Duration = timedelta(days=7)
    compaction_interval: Duration = timedelta(hours=1)

    @field_validator("step_events", mode="before")
    @classmethod
    def _legacy_boolean(cls, value: object) -> object:
        # ``step_events = true | false`` of earlier versions: with the outcome row as the record of
        # a step, turning its events off no longer saves a write, so both read as "derived".
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
            return "derived"
        return value


def _roughly(value: timedelta) -> str:
    """``1h 0m 34s``: a computed duration for a message (rounded up to the second)."""
    seconds = int(-(-value.total_seconds() // 1))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m {secs}s" if hours else f"{minutes}m {secs}s"


class RetentionNamespaceConfig(_Section):
    """``[retention.namespaces.<ns>]``: the history of one namespace."""

    #: How long this namespace's outcome rows are kept (unset: ``[retention] outcomes``).
    outcomes: Duration | None = None


class RetentionConfig(_Section):
    """``[retention]``: how long history is kept; the elected supervisor prunes the rest in
    bounded batches (``tasker_worker.fleet.retention``)."""

    enabled: bool = True
    #: Outcome rows (``tasker.step_results``) finished longer ago are deleted. This is also the
    #: dedup horizon: a step re-sent after its outcome row is gone runs again. It may not be
    #: shorter than the visibility timeout plus the retry horizon (see ``retry_horizon``).
    outcomes: Duration = timedelta(days=7)
    #: Heartbeat history rows (``tasker.worker_heartbeats``) older than this are deleted.
    heartbeats: Duration = timedelta(days=7)
    #: How often the pruning job runs.
    interval: Duration = timedelta(minutes=1)
    #: Rows deleted per statement (each batch its own short transaction).
    batch_size: int = Field(default=5000, ge=100, le=100_000)
    #: Outcome rows are partitioned by the day of their step_uuid (a UUIDv7's time): the
    #: supervisor keeps today's partition and this many days after it created (a day without
    #: one goes to the default partition meanwhile), whether or not pruning is enabled.
    partitions_ahead: int = Field(default=3, ge=1, le=60)
    #: Per-namespace overrides: ``[retention.namespaces.audit] outcomes = "90d"``.
    namespaces: dict[str, RetentionNamespaceConfig] = Field(default_factory=dict)

    @field_validator("namespaces")
    @classmethod
    def _namespace_keys(cls, value: dict[str, RetentionNamespaceConfig]) -> dict[str, RetentionNamespaceConfig]:
        return _valid_namespace_keys(value)

    def outcomes_for(self, namespace: str) -> timedelta:
        """How long ``namespace``'s outcome rows are kept."""
        own = self.namespaces.get(namespace)
        return self.outcomes if own is None or own.outcomes is None else own.outcomes


class ApiConfig(_Section):
    """``[api]``: the HTTP control-plane API (``tasker-worker api``, or inside ``run``)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: When set, mutating routes require ``Authorization: Bearer <token>``.
    token: str | None = None
    #: Serve the operators' dashboard (HTML pages at ``/``) beside the JSON API.
    dashboard: bool = True
    #: Health thresholds for ``/health/detailed``.
    max_queue_age: Duration = timedelta(minutes=5)
    max_xmin_age: Duration = timedelta(minutes=5)
    max_error_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    max_notify_queue_usage: float = Field(default=0.5, ge=0.0, le=1.0)


class LoggingConfig(_Section):
    """``[logging]``: level and line format."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"


class TaskerConfig(BaseSettings):
    """The whole effective configuration.

    Values arrive already layered (TOML base < environment TOML < ``TASKER__*`` variables < CLI
    flags) by ``tasker_worker.config.loader``, which also keeps where each value came from.
    """

    model_config = SettingsConfigDict(extra="forbid", validate_assignment=True)

    environment: str = "development"
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    #: Other PostgreSQL clusters, by name, for namespaces that live elsewhere than the primary
    #: (``[queues.namespaces.<ns>] database``).
    databases: dict[str, ClusterDatabaseConfig] = Field(default_factory=dict)
    event_system: EventSystemConfig = Field(default_factory=EventSystemConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    queues: QueuesConfig = Field(default_factory=QueuesConfig)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    handlers: HandlersConfig = Field(default_factory=HandlersConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)

    def retry_horizon(self) -> timedelta:
        """The longest a step's message can stay claimed or waiting between its first claim and
        its outcome: one visibility timeout, plus every retry delay (attempts and releases) at
        its largest jitter. Outcome rows must be kept at least this long, or a redelivered
        step finds no outcome and runs again."""
        retry = self.retry
        grow = 1.0 + retry.jitter
        attempts = sum(
            min(retry.base_delay.total_seconds() * 2 ** min(a - 1, 30), retry.max_delay.total_seconds())
            for a in range(1, retry.max_attempts)
        )
        releases = retry.max_releases * retry.max_delay.total_seconds()
        vt = self.event_system.fallback_poller.visibility_timeout.total_seconds()
        return timedelta(seconds=vt + (attempts + releases) * grow)

    @model_validator(mode="after")
    def _retention_covers_retries(self) -> TaskerConfig:
        if not self.retention.enabled:
            return self
        horizon = self.retry_horizon()
        kept = {"retention.outcomes": self.retention.outcomes}
        kept.update(
            {f"retention.namespaces.{ns}.outcomes": self.retention.outcomes_for(ns) for ns in self.retention.namespaces}
        )
        for key, value in kept.items():
            if value < horizon:
                raise ConfigError(
                    f"{format_duration(value)} is shorter than a step can wait for its outcome "
                    f"({_roughly(horizon)}: the visibility timeout plus every retry and release delay): "
                    "a step redelivered after its outcome row is deleted would run again. Keep outcomes longer, "
                    "or lower retry.max_releases / retry.max_delay",
                    key=key,
                )
        return self

    @model_validator(mode="after")
    def _pooler_needs_polling(self) -> TaskerConfig:
        why = self.database.refuses(self.event_system.deployment_mode)
        if why is not None:
            # Raised as itself (not a ValueError), so the message names both keys as written.
            raise ConfigError(
                f"event_system.deployment_mode = {self.event_system.deployment_mode.value} needs LISTEN, and {why}: "
                "run PollingOnly behind the pooler, or connect the worker to PostgreSQL directly",
                source="config",
            )
        return self

    @model_validator(mode="after")
    def _clusters_known(self) -> TaskerConfig:
        """Every cluster is named well, reached by a URL of its own, and known where it is
        named; each cluster's merged settings hold together (pool bounds, LISTEN)."""
        urls: dict[str, str] = {}
        if self.database.url:
            urls[self.database.url] = "database.url"
        for name, own in self.databases.items():
            key = f"databases.{name}"
            if name == PRIMARY:
                raise ConfigError(f'"{PRIMARY}" is the name of [database]: give this cluster another name', key=key)
            if not _CLUSTER_NAME_RE.fullmatch(name):
                raise ConfigError(
                    "a cluster name is lowercase letters, digits and '_', starting with a letter (at most 63)", key=key
                )
            if own.url in urls:
                raise ConfigError(
                    f"the same URL as {urls[own.url]}: one cluster has one name (map its namespaces to that one)",
                    key=f"{key}.url",
                )
            urls[own.url] = f"{key}.url"
            low = self.database.pool_min_size if own.pool_min_size is None else own.pool_min_size
            high = self.database.pool_max_size if own.pool_max_size is None else own.pool_max_size
            if low > high:
                raise ConfigError(
                    f"pool_min_size ({low}) must not exceed pool_max_size ({high}; [database]'s when unset)", key=key
                )
            settings = own.settings(self.database)
            why = settings.refuses(self.event_system.deployment_mode)
            if why is not None:
                raise ConfigError(
                    f"event_system.deployment_mode = {self.event_system.deployment_mode.value} needs LISTEN on every "
                    f"cluster, and {why}: run PollingOnly, or connect to this cluster directly",
                    key=f"{key}.pooler",
                )
        for ns, own_ns in self.queues.namespaces.items():
            value = own_ns.database
            if value is None or value == PRIMARY or value in self.databases or is_database_url(value):
                continue
            known = ", ".join([PRIMARY, *sorted(self.databases)])
            if _CLUSTER_NAME_RE.fullmatch(value):
                raise ConfigError(
                    f'no cluster named {value!r}: define it as [databases.{value}] url = "postgresql://..." '
                    f"(known: {known}), or give a PostgreSQL URL",
                    key=f"queues.namespaces.{ns}.database",
                )
            raise ConfigError(
                f"{value!r} is neither a cluster's name (known: {known}) nor a PostgreSQL URL (postgresql://...)",
                key=f"queues.namespaces.{ns}.database",
            )
        return self

    def clusters(self) -> dict[str, ClusterSpec]:
        """Every configured cluster by name, the primary first: ``[database]``, each of
        ``[databases]``, then each URL given directly to a namespace (named ``dbname@host:port``,
        with ``[database]``'s pool settings). A URL that is already a cluster's is that cluster."""
        found = {PRIMARY: ClusterSpec(PRIMARY, self.database.url, self.database, "database.url")}
        for name, own in self.databases.items():
            found[name] = ClusterSpec(name, own.url, own.settings(self.database), f"databases.{name}.url")
        by_url = {spec.url: name for name, spec in found.items() if spec.url}
        for ns, own_ns in sorted(self.queues.namespaces.items()):
            url = own_ns.database
            if url is None or not is_database_url(url) or url in by_url:
                continue
            name = base = _url_cluster_name(url)
            while name in found:  # two URLs of one server and database (other users, options)
                name = f"{base}#{len(found)}"
            found[name] = ClusterSpec(name, url, _inherited(self.database, url), f"queues.namespaces.{ns}.database")
            by_url[url] = name
        return found

    def cluster_of(self, namespace: str) -> str:
        """The name of the cluster that holds ``namespace``'s queue, its outcome rows and its
        flow control: ``"primary"`` unless ``[queues.namespaces.<ns>] database`` says otherwise."""
        own = self.queues.namespaces.get(namespace)
        value = None if own is None else own.database
        if value is None or value == PRIMARY or value in self.databases:
            return value or PRIMARY
        for name, spec in self.clusters().items():
            if spec.url == value:
                return name
        return PRIMARY  # unreachable: every URL is a cluster of clusters()

    @property
    def sharded(self) -> bool:
        """Whether any namespace lives on another cluster than the primary (several pools,
        listeners and claim loops; one of each otherwise)."""
        return any(self.cluster_of(ns) != PRIMARY for ns in self.queues.namespaces)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The loader merges every layer itself (it must know the origin of each key to name
        # it in errors), so only the merged result passed to __init__ is read here.
        return (init_settings,)
