"""Loading the layered configuration and remembering where each value came from.

Precedence, lowest first:

1. model defaults
2. ``<root>/tasker/base/worker.toml``
3. ``<root>/tasker/environments/<env>/worker.toml`` (env from ``--env`` or ``TASKER_ENV``)
4. environment variables ``TASKER__SECTION__KEY`` (JSON for lists/tables), ``TASKER_DATABASE_URL``
   and ``TASKER_DATABASE_READ_URL``
5. CLI flags

``<root>`` is ``--config`` (a directory; a single ``.toml`` file is used alone), else
``TASKER_CONFIG_DIR``, else ``./config`` when it exists. Without any root only defaults,
environment variables and flags apply.

This is the one resolution every entry point uses: the CLI (``run``, ``api``, ``steps``, ...),
``AsyncClient()`` / ``Client()`` and ``Worker()`` without a config, and the pytest plugin (its
test database on top, as a flag would be). So a client with no URL, a worker and
``tasker-worker steps show`` reach the same database, and ``config show`` says from where.

An environment named explicitly (``--env``, ``TASKER_ENV``) must have its overlay file under a
config root: ``--env prodution`` is a typo to report, not a run on the base settings. An
environment that is meant to have no overlay is allowed with ``--allow-missing-env`` (or
``TASKER_ALLOW_MISSING_ENV=1``).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tasker_worker.config import tasker_core
from tasker_worker.config.models import TaskerConfig
from tasker_worker.errors import ConfigError

ENV_PREFIX = "TASKER__"
DEFAULT_ENV = "development"


@dataclass
class LoadedConfig:
    """The validated config plus the origin of every value that did not come from a default."""

    config: TaskerConfig
    origins: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    #: Keys of tasker-core's layout that have no counterpart here: key -> (value, origin).
    unused: dict[str, tuple[Any, str]] = field(default_factory=dict)

    def origin(self, dotted_key: str) -> str:
        """Where ``dotted_key`` was set (``default`` when nothing set it)."""
        return self.origins.get(dotted_key, "default")


def find_config_root(explicit: str | os.PathLike[str] | None) -> Path | None:
    """The config root in force, or ``None`` for defaults only."""
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise ConfigError(f"config path does not exist: {path}", source="--config")
        return path
    env_dir = os.environ.get("TASKER_CONFIG_DIR")
    if env_dir:
        path = Path(env_dir)
        if not path.exists():
            raise ConfigError(f"config path does not exist: {path}", source="TASKER_CONFIG_DIR")
        return path
    local = Path("config")
    return local if (local / "tasker").is_dir() else None


def load_config(
    config_path: str | os.PathLike[str] | None = None,
    env: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    allow_missing_env: bool = False,
    overrides_origin: str = "cli flag",
) -> LoadedConfig:
    """Load, layer and validate the configuration; raise ``ConfigError`` naming file and key.

    ``overrides`` maps dotted keys (``event_system.deployment_mode``) to values given as CLI
    flags (or arguments: ``overrides_origin`` names them in ``origins``); ``None`` values are
    ignored.
    """
    environ = os.environ if environ is None else environ
    env_name = env or environ.get("TASKER_ENV") or DEFAULT_ENV
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    files: list[Path] = []
    unused: dict[str, tuple[Any, str]] = {}

    root = find_config_root(config_path)
    if root is not None:
        if root.is_file():
            layer_files = [root]
        else:
            base = root / "tasker" / "base" / "worker.toml"
            if not base.exists():
                base = root / "base" / "worker.toml"
            overlay = base.parent.parent / "environments" / env_name / "worker.toml"
            explicit = env is not None or "TASKER_ENV" in environ
            allowed = allow_missing_env or environ.get("TASKER_ALLOW_MISSING_ENV", "") in ("1", "true", "yes")
            if explicit and not overlay.exists() and not allowed:
                raise _missing_environment(env_name, overlay, "--env" if env is not None else "TASKER_ENV")
            layer_files = [p for p in (base, overlay) if p.exists()]
        for path in layer_files:
            # A file in tasker-core's layout is read through its mapping (config/tasker_core.py).
            layer = tasker_core.map_layout(_read_toml(path), str(path), environ)
            _merge(merged, layer.values, origins, str(path))
            origins.update(layer.origins)
            unused.update(layer.unused)
            files.append(path)

    env_layer, env_origins = _environment_layer(environ)
    _merge(merged, env_layer, origins, None, env_origins)

    cli_layer: dict[str, Any] = {}
    cli_origins: dict[str, str] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        _set_dotted(cli_layer, dotted, value)
        cli_origins[dotted] = overrides_origin
    _merge(merged, cli_layer, origins, None, cli_origins)

    merged["environment"] = env_name
    origins.setdefault("environment", "--env" if env else ("TASKER_ENV" if "TASKER_ENV" in environ else "default"))
    try:
        config = TaskerConfig(**merged)
    except ValidationError as exc:
        raise _config_error(exc, origins) from None
    return LoadedConfig(config=config, origins=origins, files=files, unused=unused)


def _missing_environment(name: str, overlay: Path, source: str) -> ConfigError:
    environments = overlay.parent.parent
    known = (
        sorted(p.name for p in environments.iterdir() if (p / "worker.toml").is_file()) if environments.is_dir() else []
    )
    return ConfigError(
        f"environment {name!r} has no overlay file ({overlay}); known environments: "
        f"{', '.join(known) or 'none'} (an environment without an overlay needs --allow-missing-env "
        "or TASKER_ALLOW_MISSING_ENV=1)",
        source=source,
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from None


def _environment_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    layer: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key, name in (("url", "TASKER_DATABASE_URL"), ("read_url", "TASKER_DATABASE_READ_URL")):
        given = environ.get(name)
        if given:
            layer.setdefault("database", {})[key] = given
            origins[f"database.{key}"] = f"env {name}"
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        value: Any = raw
        if raw[:1] in "[{":
            try:
                value = json.loads(raw)
            except ValueError:
                raise ConfigError("value is not valid JSON", source=f"env {name}") from None
        dotted = ".".join(parts)
        _set_dotted(layer, dotted, value)
        origins[dotted] = f"env {name}"
    return layer, origins


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{part} is not a table", key=dotted)
        node = child
    node[parts[-1]] = value


def _merge(
    target: dict[str, Any],
    layer: Mapping[str, Any],
    origins: dict[str, str],
    source: str | None,
    layer_origins: Mapping[str, str] | None = None,
    prefix: str = "",
) -> None:
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(target.get(key, {}), dict):
            node = target.setdefault(key, {})
            if source is not None:
                origins[dotted] = source  # names the file when a whole table is unknown
            _merge(node, value, origins, source, layer_origins, dotted + ".")
        else:
            target[key] = value
            if source is not None:
                origins[dotted] = source
            elif layer_origins is not None:
                origins[dotted] = layer_origins.get(dotted, "override")


def _config_error(exc: ValidationError, origins: Mapping[str, str]) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    source = None
    # A rule across the keys of a section (cooldown <= max_cooldown) names the section: blame
    # whoever set its keys, each with its key, not the file that merely opened the table.
    within = {k: o for k, o in origins.items() if k.startswith(key + ".")} if key else {}
    named = {k: o for k, o in within.items() if re.search(rf"\b{re.escape(k.rsplit('.', 1)[-1])}\b", err["msg"])}
    within = named or within
    if within:
        source = ", ".join(f"{o} ({k})" for k, o in sorted(within.items()))
    for i in range(len(loc), 0, -1):
        if source:
            break
        source = origins.get(".".join(loc[:i]))
    if err["type"] == "extra_forbidden":
        message = "unknown key (check its spelling and section)"
    else:
        message = err["msg"]
        if "input" in err and not isinstance(err["input"], dict):
            message += f" (got {err['input']!r})"
    more = len(exc.errors()) - 1
    if more:
        message += f" [and {more} more problem{'s' if more > 1 else ''}]"
    return ConfigError(message, source=source or "config", key=key)


def database_source(loaded: LoadedConfig) -> str:
    """Where the database of ``loaded`` comes from, for messages: ``database.url from env
    TASKER_DATABASE_URL``, ``... from config/tasker/base/worker.toml``, or the embedded server."""
    if loaded.config.database.url:
        return f"database.url from {loaded.origin('database.url')}"
    where = loaded.config.database.embedded_data_dir
    return "the embedded server" + (f" in {where}" if where else "") + " (no database.url, no TASKER_DATABASE_URL)"


def leaves(config: TaskerConfig) -> list[tuple[str, Any]]:
    """Every leaf of ``config`` as ``(dotted key, JSON value)``, in model order."""
    rows: list[tuple[str, Any]] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                rows.append((f"{prefix}{key}", value))

    walk(config.model_dump(mode="json"), "")
    return rows


def effective_items(loaded: LoadedConfig) -> list[tuple[str, Any, str]]:
    """Every leaf of the effective config as ``(dotted key, value, origin)``, then the keys of
    a tasker-core file that are not used (their origin says so, and why)."""
    rows = [(key, value, loaded.origin(key)) for key, value in leaves(loaded.config)]
    return rows + [(key, value, origin) for key, (value, origin) in loaded.unused.items()]
