"""Glue: the ``path_plan`` handler for the worker (namespace ``planning``)."""

from __future__ import annotations

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


def make_handler(config: PlanningConfig) -> Any:
    """A sync (CPU-bound) handler bound to the worker's planning config."""
    algorithms = tuple(config.algorithms)
    max_cells = config.max_cells

    def path_plan(ctx: StepContext, step: Any) -> dict[str, Any]:
        request = PlanRequest.parse(ctx.inputs)
        return plan(request, max_cells=max_cells, algorithms=algorithms)

    return path_plan


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
