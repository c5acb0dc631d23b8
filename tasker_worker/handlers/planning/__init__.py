"""Built-in path planners: grid A*, Dijkstra and any-angle Theta* in numpy/Python.

``request``, ``grid``, ``search`` and ``planner`` are pure domain code (no I/O); ``handler``
is the glue that registers ``path_plan`` with a worker.
"""
