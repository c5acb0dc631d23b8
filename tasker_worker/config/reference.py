"""Every configuration key with its default and its environment variable (for docs and CLI)."""

from __future__ import annotations

import json

from tasker_worker.config.loader import ENV_PREFIX, leaves
from tasker_worker.config.models import TaskerConfig


def env_var(dotted: str) -> str:
    """The environment variable that sets ``dotted`` (``TASKER__SECTION__KEY``)."""
    return ENV_PREFIX + "__".join(part.upper() for part in dotted.split("."))


def reference_rows() -> list[tuple[str, str, str]]:
    """``(dotted key, default as TOML-ish text, environment variable)`` for every leaf key."""
    return [
        (key, "unset" if value is None else json.dumps(value), env_var(key))
        for key, value in leaves(TaskerConfig())
        if key != "environment"
    ]


def markdown_table() -> str:
    """The rows as the key/default/variable columns of ``docs/configuration.md``."""
    lines = ["| key | default | environment variable |", "|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | `{e}` |" for k, d, e in reference_rows()]
    return "\n".join(lines)


__all__ = ["env_var", "markdown_table", "reference_rows"]
