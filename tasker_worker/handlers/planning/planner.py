"""From a validated request to timed, oriented paths in world coordinates (pure: no I/O)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Hashable
from typing import Any

import numpy as np

from tasker_worker.errors import StepFailed, StepValidationError
from tasker_worker.handlers.planning import engine
from tasker_worker.handlers.planning.cache import GRID_CACHE, GridCache, content_key
from tasker_worker.handlers.planning.engine import KernelKind, PreparedGrid
from tasker_worker.handlers.planning.grid import Grid, decode_cells, decode_occupancy, inflate, rasterize
from tasker_worker.handlers.planning.request import PlanRequest, Position
from tasker_worker.handlers.planning.search import SearchResult

#: Waypoints one step may return, all its paths together (about 80 bytes each in the outcome).
MAX_WAYPOINTS = 200_000


def build_grid(
    request: PlanRequest, max_cells: int, cache: GridCache | None = GRID_CACHE
) -> tuple[Grid, PreparedGrid, bool]:
    """The request's map frame (``Grid``, obstacles inflated by ``robot_radius``), its prepared
    grid, and whether the prepared grid came from ``cache``."""
    width, height, resolution, origin, key, decode = _source(request, max_cells)
    radius_cells = request.robot_radius / resolution

    def build() -> PreparedGrid:
        blocked = decode()
        if request.robot_radius > 0:
            blocked = inflate(blocked, radius_cells)
        return PreparedGrid(blocked)

    if cache is None:
        prepared, hit = build(), False
    else:
        prepared, hit = cache.get_or_build(
            (key, width, height, radius_cells if request.robot_radius > 0 else 0.0), build
        )
    grid = Grid(prepared.blocked, resolution, origin[0], origin[1], origin[2])
    return grid, prepared, hit


def _source(
    request: PlanRequest, max_cells: int
) -> tuple[int, int, float, tuple[float, float, float], Hashable, Callable[[], np.ndarray]]:
    """Size, resolution, origin, cache key and decoder of the request's map."""
    if request.grid is not None:
        spec = request.grid
        _check_size(spec.width, spec.height, max_cells)
        cells = spec.cells
        key: Hashable
        if isinstance(cells, str):
            key = ("bits64", content_key(cells))
            decode: Callable[[], np.ndarray] = lambda: decode_cells(cells, spec.width, spec.height)  # noqa: E731
        else:
            # Nested lists are decoded to be hashed (they are small maps: a big one is sent as base64).
            blocked = decode_cells(cells, spec.width, spec.height)
            key = ("bits", content_key(np.packbits(blocked).tobytes()))
            decode = blocked.copy
        origin = (spec.origin.x, spec.origin.y, spec.origin.yaw)
        return spec.width, spec.height, spec.resolution, origin, key, decode
    if request.occupancy is not None:
        occ = request.occupancy
        _check_size(occ.width, occ.height, max_cells)
        data = occ.data
        reading = (occ.format, occ.negate, occ.occupied_thresh, occ.free_thresh, occ.unknown)

        def decode_occ() -> np.ndarray:
            return decode_occupancy(
                data,
                occ.width,
                occ.height,
                fmt=occ.format,
                negate=occ.negate,
                occupied_thresh=occ.occupied_thresh,
                free_thresh=occ.free_thresh,
                unknown_blocked=occ.unknown == "occupied",
            )

        if isinstance(data, str):
            key = ("occupancy64", reading, content_key(data))
            decode = decode_occ
        else:
            blocked = decode_occ()
            key = ("bits", content_key(np.packbits(blocked).tobytes()))
            decode = blocked.copy
        origin = (occ.origin.x, occ.origin.y, occ.origin.yaw)
        return occ.width, occ.height, occ.resolution, origin, key, decode
    assert request.map is not None
    m = request.map
    width = math.ceil((m.bounds.max_x - m.bounds.min_x) / m.resolution)
    height = math.ceil((m.bounds.max_y - m.bounds.min_y) / m.resolution)
    _check_size(width, height, max_cells)
    rects = [(o.min_x, o.min_y, o.max_x, o.max_y) for o in m.obstacles if o.type == "rectangle"]
    circles = [(o.x, o.y, o.radius) for o in m.obstacles if o.type == "circle"]
    corner = (m.bounds.min_x, m.bounds.min_y)
    return (
        width,
        height,
        m.resolution,
        (corner[0], corner[1], 0.0),
        ("map", content_key(m.model_dump_json())),
        lambda: rasterize(width, height, m.resolution, corner, rects, circles),
    )


def _check_size(width: int, height: int, max_cells: int) -> None:
    cells = width * height
    if cells > max_cells:
        raise StepValidationError(f"grid {width}x{height} has {cells} cells; this worker accepts at most {max_cells}")


def _endpoint(grid: Grid, pos: Position, name: str) -> tuple[int, int]:
    row, col = grid.cell_of(pos.x, pos.y)
    if not grid.contains(row, col):
        raise StepValidationError(f"{name} ({pos.x:g}, {pos.y:g}) is outside the map")
    if grid.blocked[row, col]:
        raise StepValidationError(f"{name} ({pos.x:g}, {pos.y:g}) is inside an obstacle (after inflation)")
    return row, col


def plan(
    request: PlanRequest,
    *,
    max_cells: int,
    algorithms: Collection[str],
    cache: GridCache | None = GRID_CACHE,
    kernel: KernelKind | None = None,
) -> dict[str, Any]:
    """Plan the request's path, or its ``pairs``.

    One pair (``start`` and ``goal``): raises ``StepValidationError`` for a bad request and
    ``StepFailed(no_path)``. A batch (``pairs``): a bad map still raises, but each pair's own
    trouble (an endpoint off the map or in an obstacle, no path) is that pair's ``error``.
    """
    if request.algorithm not in algorithms:
        raise StepValidationError(
            f"algorithm {request.algorithm!r} is not offered here (offered: {', '.join(algorithms)})"
        )
    t0 = time.perf_counter()
    grid, prepared, hit = build_grid(request, max_cells, cache)
    endpoints = request.endpoints
    batch = request.pairs is not None
    cells: list[tuple[tuple[int, int], tuple[int, int]]] = []
    planned: list[int] = []
    errors: dict[int, dict[str, str]] = {}
    for i, (start, goal) in enumerate(endpoints):
        try:
            cells.append((_endpoint(grid, start, "start"), _endpoint(grid, goal, "goal")))
            planned.append(i)
        except StepValidationError as exc:
            if not batch:
                raise
            errors[i] = {"reason": exc.reason, "message": exc.message}
    found, kind = engine.search_pairs(
        prepared, request.algorithm, cells, connectivity=request.connectivity, kernel=kernel
    )
    results: list[SearchResult | None] = [None] * len(endpoints)
    for i, result in zip(planned, found, strict=True):
        results[i] = result
        if result is None:
            if not batch:
                raise StepFailed("no path between start and goal", reason="no_path", algorithm=request.algorithm)
            errors[i] = {"reason": "no_path", "message": "no path between start and goal"}
    points = [
        None if r is None else _polyline(grid, start, goal, r, request.waypoints)
        for (start, goal), r in zip(endpoints, results, strict=True)
    ]
    total = sum(len(p) for p in points if p is not None)
    if total > MAX_WAYPOINTS:
        raise StepFailed(
            f"the paths hold {total} waypoints; a step returns at most {MAX_WAYPOINTS} "
            '(ask for "waypoints": "turns", fewer pairs, or a coarser map)',
            reason="result_too_large",
        )
    paths: list[dict[str, Any]] = []
    for i, (start, goal) in enumerate(endpoints):
        pts, result = points[i], results[i]
        if pts is None or result is None:
            paths.append({"error": errors[i]})
        else:
            paths.append(_describe(grid, request, start, goal, result, pts))
    planning_ms = (time.perf_counter() - t0) * 1000.0
    common: dict[str, Any] = {
        "planning_ms": round(planning_ms, 3),
        "algorithm": request.algorithm,
        "connectivity": 8 if request.algorithm == "theta_star" else request.connectivity,
        "grid": {
            "width": grid.width,
            "height": grid.height,
            "resolution": grid.resolution,
            "origin": [grid.origin_x, grid.origin_y, grid.yaw],
        },
        "kernel": kind,
        "grid_cache": "hit" if hit else "miss",
    }
    if batch:
        return {"paths": paths, "found": sum(r is not None for r in results), **common}
    return {**paths[0], **common}


def _polyline(grid: Grid, start: Position, goal: Position, result: SearchResult, mode: str) -> np.ndarray:
    """World points of a path: the exact start, the cells' centres (every one, or where the
    path turns), the exact goal; no point twice in a row."""
    cells = result.cells
    if mode == "turns" and len(cells) > 2:
        d = np.diff(cells, axis=0)
        a, b = d[:-1], d[1:]
        # integer cross and dot products: exact, whatever the map's rotation
        straight = (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] == 0) & ((a * b).sum(axis=1) > 0)
        keep = np.concatenate([[True], ~straight, [True]])
        cells = cells[keep]
    centres = grid.world(cells + 0.5)
    # The exact start and goal lie inside their (free, convex) cells, so joining them to their
    # cell centres keeps every segment collision-free.
    pts = np.concatenate([[[start.x, start.y]], centres, [[goal.x, goal.y]]])
    moved = np.any(pts[1:] != pts[:-1], axis=1)
    return np.asarray(pts[np.concatenate([[True], moved])], dtype=float)


def _describe(
    grid: Grid, request: PlanRequest, start: Position, goal: Position, result: SearchResult, pts: np.ndarray
) -> dict[str, Any]:
    seg = np.diff(pts, axis=0)
    seg_len = np.hypot(seg[:, 0], seg[:, 1])
    cumulative = np.concatenate([[0.0], np.cumsum(seg_len)])
    # facing along the segment each point starts; the last point faces the goal's theta when
    # given, else keeps the last heading (or the start's theta on a path with no segment)
    headings = np.arctan2(seg[:, 1], seg[:, 0]).tolist()
    if goal.theta is not None:
        last = float(goal.theta)
    elif headings:
        last = headings[-1]
    else:
        last = float(start.theta or 0.0)
    headings.append(last)
    times = (request.start_time + cumulative / request.max_speed).tolist()
    waypoints = [
        {"x": x, "y": y, "theta": theta, "t": t} for (x, y), theta, t in zip(pts.tolist(), headings, times, strict=True)
    ]
    out: dict[str, Any] = {
        "waypoints": waypoints,
        "length": float(cumulative[-1]),
        "cost": float(result.cost),
        "cost_m": float(result.cost * grid.resolution),
        "expanded_nodes": result.expanded,
    }
    dropped = {k: p.z for k, p in (("start", start), ("goal", goal)) if p.z is not None}
    if dropped:
        out["dropped_z"] = dropped
    return out
