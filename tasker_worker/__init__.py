"""tasker-worker: a PostgreSQL (pgmq) worker runtime.

The public names for handler authors and producers are re-exported here lazily so that
``import tasker_worker`` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tasker_worker.domain.results import StepRef, StepResult
    from tasker_worker.handlers.context import StepContext
    from tasker_worker.handlers.registry import HandlerRegistry
    from tasker_worker.producer.client import AsyncClient, Client
    from tasker_worker.runtime.worker import Worker

__all__ = [
    "AsyncClient",
    "Client",
    "HandlerRegistry",
    "StepContext",
    "StepRef",
    "StepResult",
    "Worker",
    "__version__",
]

_LAZY = {
    "Worker": "tasker_worker.runtime.worker",
    "StepContext": "tasker_worker.handlers.context",
    "HandlerRegistry": "tasker_worker.handlers.registry",
    "AsyncClient": "tasker_worker.producer.client",
    "Client": "tasker_worker.producer.client",
    "StepRef": "tasker_worker.domain.results",
    "StepResult": "tasker_worker.domain.results",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)
