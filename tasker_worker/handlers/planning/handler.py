"""Glue: the ``path_plan`` handler for the worker (namespace ``planning``)."""

from __future__ import annotations

import functools
from typing import Any

from tasker_worker.config.models import PlanningConfig
from tasker_worker.handlers.context import StepContext
from tasker_worker.handlers.planning.planner import plan
from tasker_worker.handlers.planning.request import PlanRequest
from tasker_worker.handlers.registry import HandlerRegistry

HANDLER_NAME = "path_plan"


def capability(algorithm: str) -> str:
    """The capability a worker registers for an algorithm."""
    return f"planning:{algorithm}"


def required_capability(inputs: dict[str, Any]) -> str:
    """The capability a step needs (its algorithm; astar by default)."""
    algorithm = inputs.get("algorithm", "astar")
    return capability(algorithm if isinstance(algorithm, str) else "astar")


def path_plan(ctx: StepContext, step: Any, *, max_cells: int, algorithms: tuple[str, ...]) -> dict[str, Any]:
    """Plan the path a step asks for (sync: it runs in the worker's thread or process pool)."""
    request = PlanRequest.parse(ctx.inputs)
    return plan(request, max_cells=max_cells, algorithms=algorithms)


def make_handler(config: PlanningConfig) -> Any:
    """``path_plan`` bound to the worker's planning config (a partial, so that it pickles for
    the process pool)."""
    return functools.partial(path_plan, max_cells=config.max_cells, algorithms=tuple(config.algorithms))


def register_planning(registry: HandlerRegistry, config: PlanningConfig) -> None:
    """Register ``path_plan`` with the algorithms this worker offers as capabilities."""
    if registry.get(HANDLER_NAME) is None:
        registry.register(
            HANDLER_NAME,
            make_handler(config),
            timeout=config.timeout,
            capabilities=[capability(a) for a in config.algorithms],
            requires=required_capability,
        )
