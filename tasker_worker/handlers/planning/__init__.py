"""Built-in path planners: grid A*, Dijkstra and any-angle Theta* (``docs/planning.md``).

``request`` (the step's inputs), ``grid`` (maps and frames), ``cache`` (prepared grids across
steps), ``engine`` (running searches), ``kernels`` (the compiled searches), ``search`` (the same
in pure Python) and ``planner`` are domain code with no I/O; ``handler`` is the glue that
registers ``path_plan`` with a worker.
"""
