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
    it). The compiled kernels load on the first planning step a process runs, not when the
    worker starts: loading them costs seconds of CPU and about 120 MB, which a worker that never
    plans should not pay (``docs/planning.md``)."""
    from tasker_worker.handlers.planning.handler import register_planning

    register_planning(worker.registry, worker.config.handlers.planning)


#: The handler module's name, as ``[worker] handler_modules`` lists it.
MODULE = __name__
