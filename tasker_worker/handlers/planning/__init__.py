"""Built-in path planners: grid A*, Dijkstra and any-angle Theta* (``docs/planning.md``).

``request`` (the step's inputs), ``grid`` (maps and frames), ``cache`` (prepared grids across
steps), ``engine`` (running searches), ``kernels`` (the compiled searches), ``search`` (the same
in pure Python) and ``planner`` are domain code with no I/O; ``handler`` is the glue that
registers ``path_plan`` with a worker.
"""

from typing import Any


def register(worker: Any) -> None:
    """Register ``path_plan`` with ``worker`` (or a ``HandlerHarness``): this package is a handler
    module like any other (``[worker] handler_modules``, where the default configuration lists
    it). A worker that runs also starts loading the compiled kernels at once, so that its first
    planning steps find them ready."""
    from tasker_worker.handlers.planning.handler import register_planning

    register_planning(worker.registry, worker.config.handlers.planning)
    on_start = getattr(worker, "on_start", None)
    if on_start is not None:
        on_start(_load_kernels)


async def _load_kernels(worker: Any) -> None:
    """Start loading the kernels in the background (a compile happens once per install)."""
    from tasker_worker.handlers.planning.engine import load_kernels

    load_kernels(wait=False)


#: The handler module's name, as ``[worker] handler_modules`` lists it.
MODULE = __name__
