"""tasker-core's ``worker.toml``, read through an explicit mapping onto our keys.

tasker-core nests its worker settings under ``[worker.event_systems.worker]`` (integer
``_seconds`` and ``_ms`` keys), beside ``[worker.mpsc_channels.*]``, ``[worker.web]``,
``[worker.grpc]``, ... and, in a merged file (``tasker-ctl config generate``), ``[common.*]`` and
``[orchestration.*]``. A file in that layout is taken as one layer of our configuration like any
other (``config/loader.py`` calls ``map_layout`` on each file it reads): each key tasker-core's
worker reads for a job ours does too becomes our key (``MAPPING``); every other tasker-core key
is accepted and reported by ``config show`` as "tasker-core key, not used", with the reason
(``UNUSED``). Its ``_docs`` tables (documentation of the keys) are skipped. Keys of ours in the
same file load as ever, and win over a tasker-core key for the same setting.

Where tasker-core has two keys for one of ours, the one its worker actually reads is mapped:
its fallback poller runs every ``metadata.fallback_poller.polling_interval_ms`` (not
``timing.fallback_polling_interval_seconds``) and takes ``metadata.fallback_poller.batch_size``
messages; its step claims hold for ``timing.visibility_timeout_seconds``; its handlers run
``mpsc_channels.handler_dispatch.max_concurrent_handlers`` at once, each for at most
``handler_timeout_ms``. ``${VAR}`` and ``${VAR:-default}`` in a mapped string are read from the
environment, as tasker-core does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The tables of tasker-core's layout: top level, and inside ``[worker]`` (its ``WorkerConfig``).
TOP_LEVEL_KEYS = frozenset({"common", "orchestration"})
WORKER_KEYS = frozenset(
    {
        "worker_id",
        "worker_type",
        "event_systems",
        "mpsc_channels",
        "orchestration_client",
        "web",
        "grpc",
        "circuit_breakers",
        "_docs",
    }
)
#: Tables of documentation in tasker-core's files (``[worker._docs.worker_id]``): skipped.
DOCS_KEY = "_docs"

_ES = "worker.event_systems.worker."

#: tasker-core key -> (our key, unit of its integer: "s", "ms", or None for a value taken as is).
MAPPING: dict[str, tuple[str, str | None]] = {
    "worker.worker_id": ("worker.id", None),
    _ES + "system_id": ("event_system.system_id", None),
    _ES + "deployment_mode": ("event_system.deployment_mode", None),
    _ES + "timing.health_check_interval_seconds": ("event_system.health_check_interval", "s"),
    _ES + "timing.visibility_timeout_seconds": ("event_system.fallback_poller.visibility_timeout", "s"),
    _ES + "timing.processing_timeout_seconds": ("event_system.processing_timeout", "s"),
    _ES + "health.enabled": ("event_system.health_monitoring_enabled", None),
    _ES + "metadata.listener.connection_timeout_seconds": ("event_system.listener.connection_timeout", "s"),
    _ES + "metadata.listener.event_timeout_seconds": ("event_system.listener.liveness_interval", "s"),
    _ES + "metadata.listener.retry_interval_seconds": ("event_system.listener.max_reconnect_delay", "s"),
    _ES + "metadata.listener.batch_processing": ("event_system.listener.batch_processing", None),
    _ES + "metadata.fallback_poller.enabled": ("event_system.fallback_poller.enabled", None),
    _ES + "metadata.fallback_poller.polling_interval_ms": ("event_system.fallback_poller.polling_interval", "ms"),
    _ES + "metadata.fallback_poller.batch_size": ("event_system.fallback_poller.batch_size", None),
    "worker.mpsc_channels.command_processor.command_buffer_size": ("event_system.command_buffer_size", None),
    "worker.mpsc_channels.handler_dispatch.max_concurrent_handlers": ("event_system.max_concurrent_processors", None),
    "worker.mpsc_channels.handler_dispatch.handler_timeout_ms": ("worker.handler_timeout", "ms"),
    "common.database.url": ("database.url", None),
    "common.database.pool.max_connections": ("database.pool_max_size", None),
    "common.database.pool.min_connections": ("database.pool_min_size", None),
}

#: Why a tasker-core key has no counterpart here, by key or table (the longest prefix applies).
UNUSED: dict[str, str] = {
    "worker.worker_type": "steps are routed by handler name and capabilities",
    _ES + "timing.fallback_polling_interval_seconds": (
        "its poller runs every metadata.fallback_poller.polling_interval_ms, which is mapped"
    ),
    _ES + "timing.claim_timeout_seconds": "a claim holds for its visibility timeout",
    _ES + "processing": "its in-process event processing; claims here retry with their own backoff",
    _ES + "health": "health is judged by [event_system] health_check_interval and [api] thresholds",
    _ES + "metadata.in_process_events": "its in-process (FFI) event delivery",
    _ES + "metadata.listener.max_retry_attempts": "the listener reconnects with backoff for as long as the worker runs",
    _ES + "metadata.fallback_poller.visibility_timeout_seconds": (
        "one visibility timeout for every claim: timing.visibility_timeout_seconds"
    ),
    _ES + "metadata.fallback_poller.age_threshold_seconds": "the poller takes every visible message",
    _ES + "metadata.fallback_poller.max_age_hours": "no message is skipped for its age",
    _ES + "metadata.fallback_poller.supported_namespaces": "the namespaces served are [worker] namespaces",
    "worker.circuit_breakers": "its FFI completion channel; handler circuits here are [circuit_breaker]",
    "worker.mpsc_channels": "its internal channels; the one bounded channel here is command_buffer_size",
    "worker.orchestration_client": "no orchestration service: outcomes are rows of tasker.step_results",
    "worker.web": "its worker REST API; the API here is [api], off unless enabled",
    "worker.grpc": "no gRPC API here",
    "common.database": "tuning of its own connection pool",
    "common.pgmq_database": "one database holds queues and outcomes: a separate queue database is not supported",
    "common": "its shared and orchestration settings",
    "orchestration": "its orchestration service",
}

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

#: What ``config show`` says of a tasker-core key it does not use.
NOT_USED = "tasker-core key, not used"


@dataclass
class MappedLayer:
    """One file's layer, tasker-core's keys mapped onto ours."""

    #: The layer in our layout (the file's own keys of ours included).
    values: dict[str, Any]
    #: Origins of the keys mapped from tasker-core's: ``"<file> (tasker-core <its key>)"``.
    origins: dict[str, str] = field(default_factory=dict)
    #: tasker-core keys not used: key -> (value, origin saying why).
    unused: dict[str, tuple[Any, str]] = field(default_factory=dict)


def is_tasker_core_layout(document: Mapping[str, Any]) -> bool:
    """Whether a TOML document has tasker-core's tables (none of ours is named like them)."""
    if any(key in document for key in TOP_LEVEL_KEYS):
        return True
    worker = document.get("worker")
    return isinstance(worker, Mapping) and any(key in worker for key in WORKER_KEYS)


def map_layout(document: dict[str, Any], source: str, environ: Mapping[str, str]) -> MappedLayer:
    """``document`` (read from ``source``) as a layer of our configuration: returned unchanged
    when it is not in tasker-core's layout."""
    if not is_tasker_core_layout(document):
        return MappedLayer(document)
    values = {k: v for k, v in document.items() if k not in TOP_LEVEL_KEYS}
    theirs: dict[str, Any] = {k: document[k] for k in TOP_LEVEL_KEYS if k in document}
    worker = document.get("worker")
    if isinstance(worker, Mapping):
        ours = {k: v for k, v in worker.items() if k not in WORKER_KEYS}
        theirs["worker"] = {k: v for k, v in worker.items() if k in WORKER_KEYS}
        if ours:
            values["worker"] = ours
        else:
            values.pop("worker", None)
    layer = MappedLayer(values)
    for key, value in _leaves(theirs, ""):
        target = MAPPING.get(key)
        if target is None:
            layer.unused[key] = (value, f"{source}: {NOT_USED} ({_why_unused(key)})")
            continue
        ours_key, unit = target
        if _lookup(values, ours_key) is not _MISSING:
            layer.unused[key] = (value, f"{source}: {NOT_USED} ({ours_key} is set in the same file)")
            continue
        converted = _converted(value, unit, environ)
        if converted == "":
            layer.unused[key] = (value, f"{source}: {NOT_USED} (empty)")
            continue
        _assign(values, ours_key, converted)
        layer.origins[ours_key] = f"{source} (tasker-core {key})"
    return layer


def _leaves(node: Mapping[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """Every ``(dotted key, value)`` under ``node``, ``_docs`` tables left out."""
    out: list[tuple[str, Any]] = []
    for key, value in node.items():
        if key == DOCS_KEY:
            continue
        dotted = prefix + key
        if isinstance(value, Mapping):
            out.extend(_leaves(value, dotted + "."))
        else:
            out.append((dotted, value))
    return out


def _why_unused(key: str) -> str:
    prefixes = [p for p in UNUSED if key == p or key.startswith(p + ".")]
    return UNUSED[max(prefixes, key=len)] if prefixes else "no counterpart here"


def _converted(value: Any, unit: str | None, environ: Mapping[str, str]) -> Any:
    """tasker-core's value as ours: integer seconds and milliseconds as durations, placeholders
    read from the environment; anything else as it is (our validation then names the key)."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), value)
    if unit is not None and isinstance(value, int) and not isinstance(value, bool):
        return f"{value}{unit}"
    return value


_MISSING = object()


def _lookup(values: Mapping[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _assign(values: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = values
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


__all__ = ["MAPPING", "NOT_USED", "UNUSED", "MappedLayer", "is_tasker_core_layout", "map_layout"]
