"""From a validated request to a timed, oriented path (pure: no I/O)."""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from typing import Any

import numpy as np

from tasker_worker.errors import StepFailed, StepValidationError
from tasker_worker.handlers.planning.grid import Grid, decode_cells, inflate, rasterize
from tasker_worker.handlers.planning.request import PlanRequest, Position
from tasker_worker.handlers.planning.search import SearchResult, astar, dijkstra, theta_star


def build_grid(request: PlanRequest, max_cells: int) -> Grid:
    """The occupancy grid of a request, obstacles inflated by ``robot_radius``."""
    if request.grid is not None:
        spec = request.grid
        cells = spec.width * spec.height
        _check_size(cells, max_cells, f"{spec.width}x{spec.height}")
        blocked = decode_cells(spec.cells, spec.width, spec.height)
        grid = Grid(blocked, spec.resolution, spec.origin.x, spec.origin.y)
    else:
        assert request.map is not None
        m = request.map
        width = math.ceil((m.bounds.max_x - m.bounds.min_x) / m.resolution)
        height = math.ceil((m.bounds.max_y - m.bounds.min_y) / m.resolution)
        _check_size(width * height, max_cells, f"{width}x{height}")
        rects = [(o.min_x, o.min_y, o.max_x, o.max_y) for o in m.obstacles if o.type == "rectangle"]
        circles = [(o.x, o.y, o.radius) for o in m.obstacles if o.type == "circle"]
        blocked = rasterize(width, height, m.resolution, (m.bounds.min_x, m.bounds.min_y), rects, circles)
        grid = Grid(blocked, m.resolution, m.bounds.min_x, m.bounds.min_y)
    if request.robot_radius > 0:
        grid = Grid(
            inflate(grid.blocked, request.robot_radius / grid.resolution), grid.resolution, grid.origin_x, grid.origin_y
        )
    return grid


def _check_size(cells: int, max_cells: int, shape: str) -> None:
    if cells > max_cells:
        raise StepValidationError(f"grid {shape} has {cells} cells; this worker accepts at most {max_cells}")


def _endpoint(grid: Grid, pos: Position, name: str) -> tuple[int, int]:
    row, col = grid.cell_of(pos.x, pos.y)
    if not grid.contains(row, col):
        raise StepValidationError(f"{name} ({pos.x:g}, {pos.y:g}) is outside the map")
    if grid.blocked[row, col]:
        raise StepValidationError(f"{name} ({pos.x:g}, {pos.y:g}) is inside an obstacle (after inflation)")
    return row, col


def plan(request: PlanRequest, *, max_cells: int, algorithms: Collection[str]) -> dict[str, Any]:
    """Plan a path; raise ``StepValidationError`` for a bad request, ``StepFailed(no_path)``."""
    if request.algorithm not in algorithms:
        raise StepValidationError(
            f"algorithm {request.algorithm!r} is not offered here (offered: {', '.join(algorithms)})"
        )
    t0 = time.perf_counter()
    grid = build_grid(request, max_cells)
    start = _endpoint(grid, request.start, "start")
    goal = _endpoint(grid, request.goal, "goal")
    result: SearchResult | None
    if request.algorithm == "astar":
        result = astar(grid.blocked, start, goal, request.connectivity)
    elif request.algorithm == "dijkstra":
        result = dijkstra(grid.blocked, start, goal, request.connectivity)
    else:
        result = theta_star(grid.blocked, start, goal)
    planning_ms = (time.perf_counter() - t0) * 1000.0
    if result is None:
        raise StepFailed("no path between start and goal", reason="no_path", algorithm=request.algorithm)
    return _describe(grid, request, result, planning_ms)


def _describe(grid: Grid, request: PlanRequest, result: SearchResult, planning_ms: float) -> dict[str, Any]:
    centres = [grid.center_of(r, c) for r, c in result.path]
    # The exact start and goal lie inside their (free, convex) cells, so joining them to their
    # cell centres keeps every segment collision-free.
    points = [(request.start.x, request.start.y), *centres, (request.goal.x, request.goal.y)]
    deduped = [points[0]]
    for p in points[1:]:
        if p != deduped[-1]:
            deduped.append(p)
    pts = np.array(deduped, dtype=float)
    seg = np.diff(pts, axis=0)
    seg_len = np.hypot(seg[:, 0], seg[:, 1])
    cumulative = np.concatenate([[0.0], np.cumsum(seg_len)])
    headings = np.arctan2(seg[:, 1], seg[:, 0])
    waypoints = []
    for i, (x, y) in enumerate(pts):
        if i < len(headings):
            theta = float(headings[i])  # facing along the segment it starts
        elif request.goal.theta is not None:
            theta = float(request.goal.theta)
        elif len(headings):
            theta = float(headings[-1])
        else:
            theta = float(request.start.theta or 0.0)
        waypoints.append(
            {
                "x": float(x),
                "y": float(y),
                "theta": theta,
                "t": float(request.start_time + cumulative[i] / request.max_speed),
            }
        )
    out: dict[str, Any] = {
        "waypoints": waypoints,
        "length": float(cumulative[-1]),
        "cost": float(result.cost),
        "cost_m": float(result.cost * grid.resolution),
        "expanded_nodes": result.expanded,
        "planning_ms": round(planning_ms, 3),
        "algorithm": request.algorithm,
        "connectivity": 8 if request.algorithm == "theta_star" else request.connectivity,
        "grid": {"width": grid.width, "height": grid.height, "resolution": grid.resolution},
    }
    dropped = {k: p.z for k, p in (("start", request.start), ("goal", request.goal)) if p.z is not None}
    if dropped:
        out["dropped_z"] = dropped
    return out
