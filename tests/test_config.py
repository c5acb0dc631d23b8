"""Configuration layering, provenance and every error path (no database needed)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from tasker_worker.config.durations import format_duration, parse_duration
from tasker_worker.config.loader import effective_items, load_config
from tasker_worker.config.models import DeploymentMode
from tasker_worker.errors import ConfigError

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config"


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write(
        tmp_path,
        "tasker/base/worker.toml",
        """
[event_system]
deployment_mode = "Hybrid"
max_concurrent_processors = 4
[event_system.fallback_poller]
polling_interval = "5s"
batch_size = 10
""",
    )
    write(
        tmp_path,
        "tasker/environments/staging/worker.toml",
        """
[event_system]
deployment_mode = "PollingOnly"
[event_system.fallback_poller]
polling_interval = "250ms"
""",
    )
    return tmp_path


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("250ms", 0.25),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        (" 10 s", 10.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5", "fast", "5 parsecs", 5, None, "-1s"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_duration_round_trip() -> None:
    for text in ("250ms", "5s", "2m", "1h", "7d", "1m30s", "1s500ms", "0s"):
        assert format_duration(parse_duration(text)) == text
    assert format_duration(parse_duration("10080m")) == "7d"  # the largest units that fit exactly


def test_precedence_base_env_file_envvar_cli(root: Path) -> None:
    loaded = load_config(root, "staging", environ={})
    cfg = loaded.config
    assert cfg.event_system.deployment_mode is DeploymentMode.POLLING_ONLY
    assert cfg.event_system.fallback_poller.polling_interval == timedelta(milliseconds=250)
    assert cfg.event_system.fallback_poller.batch_size == 10
    assert loaded.origin("event_system.fallback_poller.batch_size").endswith("base/worker.toml")
    assert loaded.origin("event_system.deployment_mode").endswith("staging/worker.toml")
    assert loaded.origin("retry.max_attempts") == "default"

    environ = {
        "TASKER__EVENT_SYSTEM__DEPLOYMENT_MODE": "EventDrivenOnly",
        "TASKER__EVENT_SYSTEM__FALLBACK_POLLER__BATCH_SIZE": "7",
        "TASKER__WORKER__NAMESPACES": '["a", "b"]',
        "TASKER_DATABASE_URL": "postgresql://x@h/db",
    }
    loaded = load_config(root, "staging", environ=environ)
    assert loaded.config.event_system.deployment_mode is DeploymentMode.EVENT_DRIVEN_ONLY
    assert loaded.config.event_system.fallback_poller.batch_size == 7
    assert loaded.config.worker.namespaces == ["a", "b"]
    assert loaded.config.database.url == "postgresql://x@h/db"
    assert loaded.origin("event_system.deployment_mode") == "env TASKER__EVENT_SYSTEM__DEPLOYMENT_MODE"

    loaded = load_config(root, "staging", {"event_system.deployment_mode": "Hybrid"}, environ=environ)
    assert loaded.config.event_system.deployment_mode is DeploymentMode.HYBRID
    assert loaded.origin("event_system.deployment_mode") == "cli flag"


def test_env_name_from_environment(root: Path) -> None:
    loaded = load_config(root, None, environ={"TASKER_ENV": "staging"})
    assert loaded.config.environment == "staging"
    assert loaded.config.event_system.deployment_mode is DeploymentMode.POLLING_ONLY


def test_an_environment_without_an_overlay_is_an_error_unless_allowed(root: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(root, "stagign", environ={})
    assert caught.value.source == "--env" and "'stagign' has no overlay" in str(caught.value)
    assert "known environments: staging" in str(caught.value)
    with pytest.raises(ConfigError, match="TASKER_ENV"):
        load_config(root, None, environ={"TASKER_ENV": "prodution"})
    assert load_config(root, "adhoc", environ={}, allow_missing_env=True).config.environment == "adhoc"
    assert load_config(root, "adhoc", environ={"TASKER_ALLOW_MISSING_ENV": "1"}).config.environment == "adhoc"
    # The default environment needs no overlay: nothing was asked for by name.
    assert load_config(root, None, environ={}).config.environment == "development"


def test_shipped_environments_differ_in_mode() -> None:
    modes = {
        env: load_config(REPO_CONFIG, env, environ={}).config.event_system.deployment_mode
        for env in ("development", "test", "production")
    }
    assert modes["test"] is DeploymentMode.POLLING_ONLY
    assert modes["production"] is DeploymentMode.HYBRID
    assert len(set(modes.values())) >= 2


@pytest.mark.parametrize(
    ("toml", "key", "words"),
    [
        ('[event_system]\ndeployment_mod = "Hybrid"', "event_system.deployment_mod", "unknown key"),
        (
            "[event_system.listener]\nbatch_processing = false",
            "event_system.listener.batch_processing",
            "always coalesced",
        ),
        ('[event_system]\nprocessing_timeout = "0s"', "event_system.processing_timeout", "at least 10ms"),
        ('[event_system]\ndeployment_mode = "Sometimes"', "event_system.deployment_mode", "PollingOnly"),
        ('[event_system]\nmax_concurrent_processors = "many"', "event_system.max_concurrent_processors", "integer"),
        (
            "[event_system.fallback_poller]\npolling_interval = 5",
            "event_system.fallback_poller.polling_interval",
            "durations are strings",
        ),
        ('[worker]\nnamespaces = ["Bad-Name"]', "worker.namespaces", "invalid"),
        ("[retry]\nmax_attempts = 0", "retry.max_attempts", "greater than or equal"),
        ('[databse]\nurl = "x"', "databse", "unknown key"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, toml: str, key: str, words: str) -> None:
    path = write(tmp_path, "tasker/base/worker.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, None, environ={})
    text = str(info.value)
    assert str(path) in text and key in text and words in text
    assert "\n" not in text
    assert info.value.exit_code == 2


def test_invalid_toml_and_missing_path(tmp_path: Path) -> None:
    write(tmp_path, "tasker/base/worker.toml", "[event_system\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path, None, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope", None, environ={})


def test_env_var_errors_name_the_variable(root: Path) -> None:
    with pytest.raises(ConfigError, match=r"env TASKER__RETRY__MAX_ATTEMPTS: retry\.max_attempts"):
        load_config(root, None, environ={"TASKER__RETRY__MAX_ATTEMPTS": "lots"})
    with pytest.raises(ConfigError, match="env TASKER__WORKER__NAMESPACES: value is not valid JSON"):
        load_config(root, None, environ={"TASKER__WORKER__NAMESPACES": "[oops"})


def test_effective_items_cover_every_leaf(root: Path) -> None:
    rows = effective_items(load_config(root, "staging", environ={}))
    keys = {k for k, _, _ in rows}
    assert "event_system.fallback_poller.visibility_timeout" in keys
    assert all(isinstance(o, str) for _, _, o in rows)


def test_a_rule_across_keys_names_who_set_each_of_them(root: Path) -> None:
    """A cross-key check failing on a CLI override used to be blamed on the file that opened the
    section; it names each key's origin now."""
    (root / "tasker" / "base" / "worker.toml").write_text('[circuit_breaker]\nmax_cooldown = "1m"\nenabled = true\n')
    with pytest.raises(ConfigError) as caught:
        load_config(root, None, {"circuit_breaker.cooldown": "10m"}, environ={})
    assert caught.value.source is not None
    assert "cli flag (circuit_breaker.cooldown)" in caught.value.source
    assert "worker.toml (circuit_breaker.max_cooldown)" in caught.value.source
    assert "enabled" not in caught.value.source  # not named by the rule
