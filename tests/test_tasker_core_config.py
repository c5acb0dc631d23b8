"""tasker-core's worker.toml loads through the documented mapping (no database needed).

The files below have tasker-core's real layout (its config/tasker/base/worker.toml and an
environments/test overlay, 0.1.8; a merged file as `tasker-ctl config generate` writes it):
every table it has, ``_docs`` tables included, with values of our own choosing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from tasker_worker.config import tasker_core
from tasker_worker.config.loader import effective_items, leaves, load_config
from tasker_worker.config.models import DeploymentMode, TaskerConfig, WorkerConfig
from tasker_worker.errors import ConfigError

DOCS = Path(__file__).resolve().parent.parent / "docs"

BASE = """
# tasker-core's layout: [worker] with its event system nested under event_systems.worker
[worker]
worker_id = "core-worker-007"
worker_type = "general"

[worker._docs.worker_id]
description = "Unique identifier for this worker instance"
type = "String"

[worker.circuit_breakers.ffi_completion_send]
failure_threshold = 5
recovery_timeout_seconds = 5
success_threshold = 2
slow_send_threshold_ms = 100

[worker.event_systems.worker]
system_id = "core-event-system"
deployment_mode = "EventDrivenOnly"

[worker.event_systems.worker._docs.deployment_mode]
description = "Event delivery mode"
valid_range = "Hybrid | EventDrivenOnly | PollingOnly"

[worker.event_systems.worker.timing]
health_check_interval_seconds = 20
fallback_polling_interval_seconds = 2
visibility_timeout_seconds = 45
processing_timeout_seconds = 9
claim_timeout_seconds = 300

[worker.event_systems.worker.processing]
max_concurrent_operations = 100
batch_size = 20
max_retries = 3

[worker.event_systems.worker.processing.backoff]
initial_delay_ms = 100
max_delay_ms = 10000
multiplier = 2.0
jitter_percent = 0.1

[worker.event_systems.worker.health]
enabled = false
performance_monitoring_enabled = true
max_consecutive_errors = 10
error_rate_threshold_per_minute = 20

[worker.event_systems.worker.metadata.in_process_events]
ffi_integration_enabled = true
deduplication_cache_size = 10000

[worker.event_systems.worker.metadata.listener]
retry_interval_seconds = 7
max_retry_attempts = 5
event_timeout_seconds = 11
batch_processing = true
connection_timeout_seconds = 3

[worker.event_systems.worker.metadata.fallback_poller]
enabled = true
polling_interval_ms = 1500
batch_size = 25
age_threshold_seconds = 5
max_age_hours = 24
visibility_timeout_seconds = 30
supported_namespaces = []

[worker.mpsc_channels.command_processor]
command_buffer_size = 2000

[worker.mpsc_channels.event_systems]
event_channel_buffer_size = 2000

[worker.mpsc_channels.handler_dispatch]
dispatch_buffer_size = 1000
completion_buffer_size = 1000
max_concurrent_handlers = 12
handler_timeout_ms = 30000

[worker.mpsc_channels.handler_dispatch.load_shedding]
enabled = true
capacity_threshold_percent = 80.0

[worker.orchestration_client]
base_url = "http://localhost:8080"
transport = "rest"
timeout_ms = 30000

[worker.web]
enabled = true
bind_address = "${TASKER_WEB_BIND_ADDRESS:-0.0.0.0:8081}"
request_timeout_ms = 30000

[worker.web.auth]
enabled = false
api_key_header = "X-API-Key"

[worker.grpc]
enabled = true
bind_address = "${TASKER_WORKER_GRPC_BIND_ADDRESS:-0.0.0.0:9191}"
"""

TEST_OVERLAY = """
[worker]
worker_id = "test-worker-001"

[worker.event_systems.worker.metadata.fallback_poller]
polling_interval_ms = 500

[worker.mpsc_channels.handler_dispatch]
max_concurrent_handlers = 5
handler_timeout_ms = 5000
"""

MERGED = """
[common.database]
url = "${DATABASE_URL:-postgresql://tasker:tasker@localhost:5432/tasker_rust_test}"

[common.database.pool]
max_connections = 30
min_connections = 2
acquire_timeout_seconds = 30

[common.pgmq_database]
enabled = true
url = "${PGMQ_DATABASE_URL:-}"

[common.queues]
backend = "${TASKER_MESSAGING_BACKEND:-pgmq}"

[worker]
worker_id = "merged-worker"
worker_type = "general"

[worker.event_systems.worker]
deployment_mode = "Hybrid"
system_id = "worker-event-system"

[worker.event_systems.worker.metadata.fallback_poller]
polling_interval_ms = 500
batch_size = 20
"""


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def core_root(tmp_path: Path) -> Path:
    """A config directory laid out as tasker-core's (config/tasker/base, environments/test)."""
    write(tmp_path, "tasker/base/worker.toml", BASE)
    write(tmp_path, "tasker/environments/test/worker.toml", TEST_OVERLAY)
    return tmp_path


def test_tasker_cores_worker_toml_loads_through_the_mapping(core_root: Path) -> None:
    loaded = load_config(core_root, None, environ={})
    es = loaded.config.event_system
    assert loaded.config.worker.id == "core-worker-007"
    assert es.system_id == "core-event-system"
    assert es.deployment_mode is DeploymentMode.EVENT_DRIVEN_ONLY
    assert es.health_check_interval == timedelta(seconds=20)
    assert es.health_monitoring_enabled is False
    assert es.processing_timeout == timedelta(seconds=9)
    # What tasker-core's worker reads for each job: its poller's own interval and batch, the
    # step claim's visibility timeout, the handler dispatch's concurrency and timeout.
    assert es.fallback_poller.polling_interval == timedelta(milliseconds=1500)
    assert es.fallback_poller.batch_size == 25
    assert es.fallback_poller.visibility_timeout == timedelta(seconds=45)
    assert es.max_concurrent_processors == 12
    assert loaded.config.worker.handler_timeout == timedelta(seconds=30)
    assert es.command_buffer_size == 2000
    assert es.listener.connection_timeout == timedelta(seconds=3)
    assert es.listener.liveness_interval == timedelta(seconds=11)
    assert es.listener.max_reconnect_delay == timedelta(seconds=7)
    path = str(core_root / "tasker" / "base" / "worker.toml")
    assert loaded.origin("event_system.fallback_poller.polling_interval") == (
        f"{path} (tasker-core worker.event_systems.worker.metadata.fallback_poller.polling_interval_ms)"
    )
    # Our keys that tasker-core's file does not set keep their defaults.
    assert loaded.config.worker.namespaces == ["default"]


def test_its_other_keys_are_accepted_and_reported_as_not_used(core_root: Path) -> None:
    loaded = load_config(core_root, None, environ={})
    unused = dict(loaded.unused)
    es = "worker.event_systems.worker."
    for key in (
        "worker.worker_type",
        es + "timing.fallback_polling_interval_seconds",
        es + "timing.claim_timeout_seconds",
        es + "processing.max_concurrent_operations",
        es + "processing.backoff.multiplier",
        es + "metadata.fallback_poller.supported_namespaces",
        "worker.circuit_breakers.ffi_completion_send.failure_threshold",
        "worker.mpsc_channels.event_systems.event_channel_buffer_size",
        "worker.mpsc_channels.handler_dispatch.load_shedding.enabled",
        "worker.orchestration_client.base_url",
        "worker.web.enabled",
        "worker.web.auth.api_key_header",
        "worker.grpc.bind_address",
    ):
        _, origin = unused[key]
        assert "tasker-core key, not used (" in origin, key
    assert unused[es + "timing.fallback_polling_interval_seconds"][1].endswith(
        "(its poller runs every metadata.fallback_poller.polling_interval_ms, which is mapped)"
    )
    assert not [k for k in unused if "_docs" in k], "documentation tables are skipped"
    assert not set(unused) & set(tasker_core.MAPPING)
    rows = {key: origin for key, _, origin in effective_items(loaded)}
    assert "tasker-core key, not used" in rows["worker.web.enabled"]
    assert "tasker-core worker.worker_id" in rows["worker.id"]


def test_an_environment_overlay_in_its_layout_applies_over_the_base(core_root: Path) -> None:
    loaded = load_config(core_root, "test", environ={})
    assert loaded.config.worker.id == "test-worker-001"
    assert loaded.config.event_system.fallback_poller.polling_interval == timedelta(milliseconds=500)
    assert loaded.config.event_system.max_concurrent_processors == 5
    assert loaded.config.event_system.fallback_poller.visibility_timeout == timedelta(seconds=45)  # from the base
    overlay = str(core_root / "tasker" / "environments" / "test" / "worker.toml")
    assert loaded.origin("worker.handler_timeout") == (
        f"{overlay} (tasker-core worker.mpsc_channels.handler_dispatch.handler_timeout_ms)"
    )


def test_a_merged_file_maps_its_database_and_reads_placeholders_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "worker-test.toml", MERGED)
    defaulted = load_config(path, None, environ={}).config
    assert defaulted.database.url == "postgresql://tasker:tasker@localhost:5432/tasker_rust_test"
    assert (defaulted.database.pool_max_size, defaulted.database.pool_min_size) == (30, 2)
    assert defaulted.worker.id == "merged-worker"
    loaded = load_config(path, None, environ={"DATABASE_URL": "postgresql://app@db/app"})
    assert loaded.config.database.url == "postgresql://app@db/app"
    assert "one database holds queues and outcomes" in loaded.unused["common.pgmq_database.enabled"][1]
    assert "not used" in loaded.unused["common.queues.backend"][1]
    # Our own variable still wins over the file, as over any file.
    assert load_config(path, None, environ={"TASKER_DATABASE_URL": "postgresql://x@y/z"}).config.database.url == (
        "postgresql://x@y/z"
    )


def test_our_keys_in_the_same_file_load_and_win(tmp_path: Path) -> None:
    text = BASE.replace('worker_id = "core-worker-007"', 'worker_id = "core-worker-007"\nnamespaces = ["orders"]')
    path = write(tmp_path, "worker.toml", text + "\n[event_system.fallback_poller]\nbatch_size = 7\n")
    loaded = load_config(path, None, environ={})
    assert loaded.config.worker.namespaces == ["orders"]
    assert loaded.config.worker.id == "core-worker-007"
    assert loaded.config.event_system.fallback_poller.batch_size == 7
    _, why = loaded.unused["worker.event_systems.worker.metadata.fallback_poller.batch_size"]
    assert why.endswith("(event_system.fallback_poller.batch_size is set in the same file)")


def test_a_bad_value_names_the_tasker_core_key(tmp_path: Path) -> None:
    path = write(
        tmp_path, "worker.toml", BASE.replace("max_concurrent_handlers = 12", "max_concurrent_handlers = 100000")
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, None, environ={})
    assert err.value.key == "event_system.max_concurrent_processors"
    assert "tasker-core worker.mpsc_channels.handler_dispatch.max_concurrent_handlers" in str(err.value)


def test_the_mapping_names_only_keys_of_ours_and_its_tables_are_none_of_ours() -> None:
    ours = {key for key, _ in leaves(TaskerConfig())}
    assert {target for target, _ in tasker_core.MAPPING.values()} <= ours
    assert not tasker_core.WORKER_KEYS & set(WorkerConfig.model_fields)
    assert not tasker_core.TOP_LEVEL_KEYS & set(TaskerConfig.model_fields)
    assert not tasker_core.is_tasker_core_layout({"worker": {"namespaces": ["a"]}, "event_system": {}})


def test_the_documented_mapping_is_the_mapping() -> None:
    text = (DOCS / "configuration.md").read_text()
    section = text.split("## tasker-core's worker.toml", 1)[1]
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([a-z_.]+)` \|", section, re.M)
    assert {k: v for k, v in rows} == {k: ours for k, (ours, _) in tasker_core.MAPPING.items()}


def test_config_show_reports_the_mapping(core_root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tasker_worker.cli.main",
            "--config",
            str(core_root),
            "--env",
            "test",
            "config",
            "show",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["event_system.deployment_mode"]["value"] == "EventDrivenOnly"
    assert shown["event_system.deployment_mode"]["origin"].endswith(
        "(tasker-core worker.event_systems.worker.deployment_mode)"
    )
    assert "tasker-core key, not used" in shown["worker.grpc.enabled"]["origin"]
