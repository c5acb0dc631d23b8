"""Planning beyond one path on a small grid: larger grids and mazes against the reference, the
search memory reused across searches, batches of pairs, the grid cache, ROS occupancy maps and
origins (world coordinates), the bounds, and all of it through a real worker."""

from __future__ import annotations

import base64
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasker_worker.errors import StepFailed, StepValidationError
from tasker_worker.handlers.planning import engine, planner
from tasker_worker.handlers.planning.cache import GridCache
from tasker_worker.handlers.planning.engine import PreparedGrid
from tasker_worker.handlers.planning.grid import decode_occupancy, encode_cells
from tasker_worker.handlers.planning.planner import plan
from tasker_worker.handlers.planning.request import MAX_PAIRS, PlanRequest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from planning import make_grid, make_maze, maze_goal
from reference import reference_cost

ALL = ("astar", "dijkstra", "theta_star")
NS = "planning"


@pytest.fixture(scope="module", autouse=True)
def _kernels() -> None:
    assert engine.load_kernels(wait=True), engine.kernels_state()


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


# --- larger grids, reused memory ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["open", "random", "maze"])
@pytest.mark.parametrize("kernel", ["compiled", "python"])
def test_larger_grids_and_mazes_match_the_reference(kind: str, kernel: Any) -> None:
    n = 97
    if kind == "open":
        blocked, start, goal = np.zeros((n, n), dtype=bool), (0, 0), (n - 1, n - 1)
    elif kind == "random":
        blocked, start, goal = make_grid(n), (0, 0), (n - 1, n - 1)
    else:
        blocked, start, goal = make_maze(n), (1, 1), maze_goal(n)
    ref = reference_cost(blocked, start, goal, 8)
    assert math.isfinite(ref)
    for fn in (engine.astar, engine.dijkstra):
        result = fn(blocked, start, goal, 8, kernel=kernel)
        assert result is not None and _close(result.cost, ref), (fn.__name__, result and result.cost, ref)
        assert result.path[0] == start and result.path[-1] == goal
    theta = engine.theta_star(blocked, start, goal, kernel=kernel)
    assert theta is not None and theta.cost <= ref + 1e-9
    if kind == "maze":  # one-cell corridors: no shortcut can see past a corner
        assert _close(theta.cost, ref)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(2, 40), st.integers(2, 40), st.integers(0, 2**32 - 1)), min_size=2, max_size=5))
def test_one_workspace_serves_grids_of_any_shape_in_turn(shapes: list[tuple[int, int, int]]) -> None:
    """Stamps left by a search on one grid (another width, another layout) never leak into the
    next: every search of the sequence still matches the reference."""
    for h, w, seed in shapes:
        blocked = np.random.default_rng(seed).random((h, w)) < 0.3
        blocked[0, 0] = blocked[-1, -1] = False
        grid = PreparedGrid(blocked)
        ref = reference_cost(blocked, (0, 0), (h - 1, w - 1), 8)
        for algorithm in ALL:
            [result], kind = engine.search_pairs(grid, algorithm, [((0, 0), (h - 1, w - 1))], kernel="compiled")
            assert kind == "compiled"
            if math.isinf(ref):
                assert result is None
            elif algorithm == "theta_star":
                assert result is not None and result.cost <= ref + 1e-9
            else:
                assert result is not None and _close(result.cost, ref)


def test_stamps_are_cleared_when_generations_run_out() -> None:
    blocked = make_grid(64)
    ref = reference_cost(blocked, (0, 0), (63, 63), 8)
    with engine.workspace(PreparedGrid(blocked).blk.size) as ws:
        ws.gen = engine._MAX_GEN - 2
        ws.stamp[: ws.capacity] = 3  # what an early search (generation 2) left: every node closed
        worn = ws
    # the next search takes this pooled workspace: its generations run out and start again at 2
    result = engine.astar(blocked, (0, 0), (63, 63))
    assert worn.gen == 2
    assert result is not None and _close(result.cost, ref)


# --- batches -----------------------------------------------------------------------------------


def _walled() -> np.ndarray:
    blocked = make_grid(40)
    blocked[20, 18:23] = True  # a cell walled in: (21, 20) can be reached by nobody
    blocked[22, 18:23] = True
    blocked[21, 18] = blocked[21, 22] = True
    blocked[21, 19:22] = False
    return blocked


@pytest.mark.parametrize("algorithm", ALL)
def test_a_batch_answers_each_pair_as_a_search_of_its_own(algorithm: Any) -> None:
    blocked = _walled()
    free = np.argwhere(~blocked)
    rng = np.random.default_rng(5)
    starts = [tuple(free[i]) for i in rng.choice(len(free), 4)]
    pairs = [(starts[k % 4], tuple(free[i])) for k, i in enumerate(rng.choice(len(free), 14))]
    pairs += [(starts[0], starts[0]), (starts[1], (21, 20))]  # start = goal; walled-in goal
    results, kind = engine.search_pairs(PreparedGrid(blocked), algorithm, pairs, kernel="compiled")
    assert kind == "compiled" and len(results) == len(pairs)
    for (s, t), result in zip(pairs, results, strict=True):
        ref = reference_cost(blocked, s, t, 8)
        if math.isinf(ref):
            assert result is None, (s, t)
            continue
        assert result is not None and result.path[0] == s and result.path[-1] == t
        if algorithm == "theta_star":
            assert result.cost <= ref + 1e-9
        else:
            assert _close(result.cost, ref), (s, t, result.cost, ref)
    assert results[-2] is not None and results[-2].cost == 0.0 and results[-2].path == [starts[0]]


def _request(blocked: np.ndarray, **extra: Any) -> dict[str, Any]:
    h, w = blocked.shape
    return {"grid": {"width": w, "height": h, "resolution": 0.5, "cells": encode_cells(blocked)}, **extra}


def _at(row: int, col: int, res: float = 0.5) -> dict[str, float]:
    return {"x": (col + 0.5) * res, "y": (row + 0.5) * res}


def test_a_batch_step_reports_each_pairs_trouble_and_plans_the_rest() -> None:
    blocked = _walled()
    free = [tuple(c) for c in np.argwhere(~blocked)[:3]]
    obstacle = tuple(np.argwhere(blocked)[0])
    pairs = [
        {"start": _at(*free[0]), "goal": _at(39, 39)},
        {"start": {"x": -3, "y": 0}, "goal": _at(39, 39)},
        {"start": _at(*free[1]), "goal": _at(*obstacle)},
        {"start": _at(*free[2]), "goal": _at(21, 20)},
        {"start": _at(*free[0]), "goal": _at(0, 0)},
    ]
    out = plan(PlanRequest.parse(_request(blocked, pairs=pairs)), max_cells=10_000, algorithms=ALL)
    paths = out["paths"]
    assert len(paths) == 5 and out["found"] == 2
    assert paths[0]["cost"] == pytest.approx(reference_cost(blocked, free[0], (39, 39), 8), abs=1e-9)
    assert paths[1]["error"]["reason"] == "validation_error" and "outside the map" in paths[1]["error"]["message"]
    assert paths[2]["error"]["reason"] == "validation_error" and "inside an obstacle" in paths[2]["error"]["message"]
    assert paths[3]["error"] == {"reason": "no_path", "message": "no path between start and goal"}
    assert "waypoints" in paths[4]
    assert out["kernel"] == "compiled" and out["algorithm"] == "astar"


def test_a_batch_is_bounded_and_exclusive_with_start_and_goal() -> None:
    blocked = np.zeros((4, 4), dtype=bool)
    pair = {"start": _at(0, 0), "goal": _at(3, 3)}
    with pytest.raises(StepValidationError, match="pairs"):
        PlanRequest.parse(_request(blocked, pairs=[pair] * (MAX_PAIRS + 1)))
    with pytest.raises(StepValidationError, match="pairs"):
        PlanRequest.parse(_request(blocked, pairs=[]))
    with pytest.raises(StepValidationError, match="not both"):
        PlanRequest.parse(_request(blocked, pairs=[pair], start=_at(0, 0), goal=_at(1, 1)))
    assert len(PlanRequest.parse(_request(blocked, pairs=[pair] * MAX_PAIRS)).endpoints) == MAX_PAIRS


def test_what_a_step_returns_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = make_maze(41)
    request = PlanRequest.parse(_request(blocked, start=_at(1, 1), goal=_at(*maze_goal(41))))
    out = plan(request, max_cells=10_000, algorithms=ALL)
    monkeypatch.setattr(planner, "MAX_WAYPOINTS", len(out["waypoints"]) - 1)
    with pytest.raises(StepFailed) as info:
        plan(request, max_cells=10_000, algorithms=ALL)
    assert info.value.reason == "result_too_large" and "turns" in info.value.message


def test_turns_keep_the_same_polyline_with_fewer_points() -> None:
    blocked = make_grid(48)
    base = _request(blocked, start=_at(0, 0), goal=_at(47, 47))
    cells = plan(PlanRequest.parse(base), max_cells=10_000, algorithms=ALL)
    turns = plan(PlanRequest.parse({**base, "waypoints": "turns"}), max_cells=10_000, algorithms=ALL)
    assert len(turns["waypoints"]) < len(cells["waypoints"])
    assert turns["length"] == pytest.approx(cells["length"], abs=1e-9)
    assert turns["waypoints"][-1]["t"] == pytest.approx(cells["waypoints"][-1]["t"], abs=1e-9)
    kept = {(w["x"], w["y"]) for w in cells["waypoints"]}
    assert all((w["x"], w["y"]) in kept for w in turns["waypoints"])


# --- the grid cache ---------------------------------------------------------------------------


def test_the_grid_cache_hits_on_the_same_content_only() -> None:
    cache = GridCache()
    blocked = np.random.default_rng(3).random((32, 32)) < 0.05
    blocked[:3, :3] = blocked[-3:, -3:] = False  # free after inflation too
    base = _request(blocked, start=_at(0, 0), goal=_at(31, 31))
    first = plan(PlanRequest.parse(base), max_cells=10_000, algorithms=ALL, cache=cache)
    again = plan(PlanRequest.parse(base), max_cells=10_000, algorithms=ALL, cache=cache)
    assert (first["grid_cache"], again["grid_cache"]) == ("miss", "hit")
    assert again["cost"] == first["cost"] and again["waypoints"] == first["waypoints"]
    other = blocked.copy()
    other[10, 10] = not other[10, 10]
    changes = [
        _request(other, start=_at(0, 0), goal=_at(31, 31)),  # one cell differs
        {**base, "robot_radius": 0.5},  # inflated by a cell
        {**base, "grid": {**base["grid"], "cells": blocked.astype(int).tolist()}},  # lists: keyed on the bits
    ]
    for inputs in changes:
        assert plan(PlanRequest.parse(inputs), max_cells=10_000, algorithms=ALL, cache=cache)["grid_cache"] == "miss"
    lists_again = plan(PlanRequest.parse(changes[2]), max_cells=10_000, algorithms=ALL, cache=cache)
    assert lists_again["grid_cache"] == "hit" and lists_again["cost"] == first["cost"]
    inflated = plan(PlanRequest.parse(changes[1]), max_cells=10_000, algorithms=ALL, cache=cache)
    assert inflated["grid_cache"] == "hit" and inflated["cost"] > first["cost"]
    assert cache.hits == 3 and len(cache) == 4


def test_the_grid_cache_is_bounded_in_entries_and_bytes() -> None:
    grids = [PreparedGrid(make_grid(30, seed)) for seed in range(4)]
    size = grids[0].nbytes
    cache = GridCache(max_entries=2, max_bytes=10 * size)
    for i, g in enumerate(grids[:3]):
        cache.get_or_build(i, lambda g=g: g)
    assert len(cache) == 2 and cache.nbytes == 2 * size
    assert cache.get_or_build(0, lambda: grids[3])[1] is False  # 0 was the least recently used
    assert cache.get_or_build(2, lambda: grids[3])[1] is True
    by_bytes = GridCache(max_entries=100, max_bytes=2 * size + size // 2)
    for i, g in enumerate(grids):
        by_bytes.get_or_build(i, lambda g=g: g)
    assert len(by_bytes) == 2 and by_bytes.nbytes <= 2 * size + size // 2
    tiny = GridCache(max_entries=10, max_bytes=size - 1)
    assert tiny.get_or_build("x", lambda: grids[0]) == (grids[0], False) and len(tiny) == 0
    with pytest.raises(ValueError):
        GridCache(max_entries=-1)


# --- ROS maps ---------------------------------------------------------------------------------


def test_occupancy_values_are_thresholded_as_map_saver_reads_them() -> None:
    values = [-1, 0, 25, 26, 64, 65, 100]
    as_unknown_blocked = decode_occupancy(values, 7, 1)
    assert as_unknown_blocked.tolist() == [[True, False, False, True, True, True, True]]
    assert decode_occupancy(values, 7, 1, unknown_blocked=False).tolist() == [[False] * 5 + [True, True]]
    packed = base64.b64encode(np.array(values, dtype=np.int8).tobytes()).decode()
    assert np.array_equal(decode_occupancy(packed, 7, 1), as_unknown_blocked)
    strict = decode_occupancy(values, 7, 1, occupied_thresh=0.9, free_thresh=0.1, unknown_blocked=False)
    assert strict.tolist() == [[False] * 6 + [True]]


def test_image_pixels_are_thresholded_as_map_server_loads_them() -> None:
    # the image's top row first: [254 free, 0 occupied, 205 (map_saver's unknown grey)] over [254, 254, 254]
    pixels = [254, 0, 205, 254, 254, 254]
    cells = decode_occupancy(pixels, 3, 2, fmt="image")
    assert cells.tolist() == [[False, False, False], [False, True, False]]  # row 0 is the image's bottom row
    # 205 is occ 0.196: free under free_thresh 0.25 (as map_server reads it), unknown under 0.196
    ros1 = decode_occupancy(pixels, 3, 2, fmt="image", free_thresh=0.196)
    assert ros1.tolist() == [[False, False, False], [False, True, True]]
    negated = decode_occupancy(pixels, 3, 2, fmt="image", negate=True, unknown_blocked=False)
    assert negated.tolist() == [[True, True, True], [True, False, True]]  # 205 is occ 0.804 then
    packed = base64.b64encode(bytes(pixels)).decode()
    assert np.array_equal(decode_occupancy(packed, 3, 2, fmt="image"), cells)


@pytest.mark.parametrize(
    ("occupancy", "words"),
    [
        ({"data": [0, 0, 0]}, "holds 3 values"),
        ({"data": [0, 0, 0, 101]}, "-1..100"),
        ({"data": [0, 0, 0, -1], "format": "image"}, "0..255"),
        ({"data": "AAAA"}, "holds 3 bytes"),
        ({"data": "not base64!"}, "not valid base64"),
        ({"data": [0, 0, "x", 0]}, "integers"),
        ({"data": {"a": 1}}, "list of integers or a base64"),
        ({"data": [0] * 4, "free_thresh": 0.7}, "free_thresh must be smaller"),
        ({"data": [0] * 4, "occupied_thresh": 1.5}, "occupancy.occupied_thresh"),
        ({"data": [0] * 4, "origin": [0, 0, 0, 0]}, "[x, y, yaw]"),
        ({"data": [0] * 4, "origin": {"position": {"x": 0}, "orientation": {"x": 0.7, "w": 0.7}}}, "about z only"),
        ({"data": [0] * 4, "info": {"width": 2}}, "given twice"),
        ({"data": [0] * 4, "format": "png"}, "occupancy.format"),
    ],
)
def test_invalid_occupancy_maps_say_what_is_wrong(occupancy: dict[str, Any], words: str) -> None:
    inputs = {
        "occupancy": {"width": 2, "height": 2, "resolution": 1.0, **occupancy},
        "start": {"x": 0.5, "y": 0.5},
        "goal": {"x": 1.5, "y": 1.5},
    }
    with pytest.raises(StepValidationError) as info:
        plan(PlanRequest.parse(inputs), max_cells=100, algorithms=ALL)
    assert words in str(info.value)


def _world(origin: tuple[float, float, float], res: float, row: float, col: float) -> dict[str, float]:
    ox, oy, yaw = origin
    lx, ly = (col + 0.5) * res, (row + 0.5) * res
    return {"x": ox + math.cos(yaw) * lx - math.sin(yaw) * ly, "y": oy + math.sin(yaw) * lx + math.cos(yaw) * ly}


def _map_cell(origin: tuple[float, float, float], res: float, x: float, y: float) -> tuple[float, float]:
    ox, oy, yaw = origin
    dx, dy = x - ox, y - oy
    lx, ly = math.cos(yaw) * dx + math.sin(yaw) * dy, -math.sin(yaw) * dx + math.cos(yaw) * dy
    return ly / res - 0.5, lx / res - 0.5  # (row, col) of which a centre gives whole numbers


@pytest.mark.parametrize("algorithm", ALL)
@pytest.mark.parametrize("yaw", [0.0, math.pi / 2, -2.3])
def test_a_rotated_ros_map_plans_in_world_coordinates(algorithm: str, yaw: float) -> None:
    rng = np.random.default_rng(11)
    occupied = rng.random((12, 16)) < 0.25
    occupied[0, 0] = occupied[-1, -1] = False
    data = np.where(occupied, 100, 0)
    data[5, 3] = -1  # unknown: blocked by default
    origin = (2.0, -1.0, yaw)
    res = 0.25
    message = {  # a nav_msgs/OccupancyGrid as rosbridge sends it, origin as a Pose
        "header": {"frame_id": "map"},
        "info": {
            "width": 16,
            "height": 12,
            "resolution": res,
            "origin": {
                "position": {"x": origin[0], "y": origin[1], "z": 0.0},
                "orientation": {"x": 0.0, "y": 0.0, "z": math.sin(yaw / 2), "w": math.cos(yaw / 2)},
            },
        },
        "data": data.reshape(-1).tolist(),
    }
    start, goal = _world(origin, res, 0, 0), _world(origin, res, 11, 15)
    out = plan(
        PlanRequest.parse({"occupancy": message, "start": start, "goal": goal, "algorithm": algorithm}),
        max_cells=1000,
        algorithms=ALL,
    )
    assert out["grid"]["origin"] == pytest.approx([*origin[:2], yaw])
    wps = out["waypoints"]
    assert (wps[0]["x"], wps[0]["y"]) == (start["x"], start["y"])
    assert (wps[-1]["x"], wps[-1]["y"]) == (goal["x"], goal["y"])
    blocked = occupied | (data == -1)
    for w in wps:
        r, c = _map_cell(origin, res, w["x"], w["y"])
        assert r == pytest.approx(round(r), abs=1e-9) and c == pytest.approx(round(c), abs=1e-9)
        assert not blocked[round(r), round(c)]
    # the same map unrotated plans the same cost: the frame changes coordinates, not paths
    flat = plan(
        PlanRequest.parse(
            {
                "occupancy": {"width": 16, "height": 12, "resolution": res, "data": message["data"]},
                "start": _world((0, 0, 0), res, 0, 0),
                "goal": _world((0, 0, 0), res, 11, 15),
                "algorithm": algorithm,
            }
        ),
        max_cells=1000,
        algorithms=ALL,
    )
    assert out["cost"] == pytest.approx(flat["cost"], abs=1e-9)
    assert out["length"] == pytest.approx(flat["length"], abs=1e-9)
    heading = math.atan2(wps[1]["y"] - wps[0]["y"], wps[1]["x"] - wps[0]["x"])
    assert wps[0]["theta"] == pytest.approx(heading)


def test_origin_forms_agree_and_the_old_shape_still_works() -> None:
    blocked = make_grid(20)
    cells = encode_cells(blocked)
    goal_local = (19.5 * 0.5, 19.5 * 0.5)
    results = []
    for origin in ({"x": 1.0, "y": 2.0}, [1.0, 2.0], [1.0, 2.0, 0.0], {"position": {"x": 1.0, "y": 2.0}}):
        inputs = {
            "grid": {"width": 20, "height": 20, "resolution": 0.5, "origin": origin, "cells": cells},
            "start": {"x": 1.25, "y": 2.25},
            "goal": {"x": 1.0 + goal_local[0], "y": 2.0 + goal_local[1]},
        }
        results.append(plan(PlanRequest.parse(inputs), max_cells=1000, algorithms=ALL))
    assert all(r["waypoints"] == results[0]["waypoints"] for r in results)
    assert results[0]["grid"]["origin"] == [1.0, 2.0, 0.0]


def test_before_the_kernels_are_ready_steps_plan_in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = make_grid(40)
    inputs = _request(blocked, start=_at(0, 0), goal=_at(39, 39))
    compiled = plan(PlanRequest.parse(inputs), max_cells=10_000, algorithms=ALL)
    monkeypatch.setattr(engine, "_kernels_now", lambda cells: None)
    python = plan(PlanRequest.parse(inputs), max_cells=10_000, algorithms=ALL)
    assert (compiled["kernel"], python["kernel"]) == ("compiled", "python")
    assert python["cost"] == pytest.approx(compiled["cost"], abs=1e-9)


# --- through the runtime ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_batches_and_ros_maps_through_a_worker(url: str) -> None:
    from tasker_worker.testing import fetch, fetch_value, make_config, running_worker, send_steps, wait_until

    blocked = make_grid(64)
    pairs = [{"start": _at(0, 0), "goal": _at(63, 63)}, {"start": _at(0, 0), "goal": {"x": 99, "y": 99}}]
    occupancy = {
        "width": 64,
        "height": 64,
        "resolution": 0.5,
        "origin": [-3.0, 4.0, 0.5],
        "data": base64.b64encode(np.where(blocked, 100, 0).astype(np.int8).tobytes()).decode(),
    }
    requests = [
        _request(blocked, pairs=pairs, algorithm="dijkstra"),
        {
            "occupancy": occupancy,
            "start": _world((-3.0, 4.0, 0.5), 0.5, 0, 0),
            "goal": _world((-3.0, 4.0, 0.5), 0.5, 63, 63),
        },
        {"occupancy": {**occupancy, "free_thresh": 0.9}, "start": {"x": 0, "y": 0}, "goal": {"x": 1, "y": 1}},
    ]
    config = make_config(mode="Hybrid", namespaces=[NS], overrides={"worker.executor": "thread"})

    async def all_done() -> bool:
        return bool(await fetch_value(url, "SELECT count(*) FROM tasker.step_results") >= len(requests))

    async with running_worker(url, config):
        await send_steps(url, NS, "path_plan", requests)
        await wait_until(all_done, timeout=60)
    rows = await fetch(url, "SELECT status, result, error FROM tasker.step_results ORDER BY finished_at")
    by_status: dict[str, list[Any]] = {}
    for status, result, error in rows:
        by_status.setdefault(status, []).append(result or error)
    assert sorted(by_status) == ["dead_lettered", "succeeded"]
    batch, ros = sorted(by_status["succeeded"], key=lambda r: "paths" not in r)
    ref = reference_cost(blocked, (0, 0), (63, 63), 8)
    assert batch["found"] == 1 and batch["paths"][0]["cost"] == pytest.approx(ref, abs=1e-9)
    assert batch["paths"][1]["error"]["reason"] == "validation_error"
    assert ros["cost"] == pytest.approx(ref, abs=1e-9) and ros["grid"]["origin"] == [-3.0, 4.0, 0.5]
    [bad] = by_status["dead_lettered"]
    assert bad["reason"] == "validation_error" and "free_thresh must be smaller" in bad["message"]


# --- the guide's examples ----------------------------------------------------------------------


def _doc_examples() -> list[Any]:
    text = (Path(__file__).resolve().parent.parent / "docs" / "planning.md").read_text()
    return [
        pytest.param(json.loads(code), id=f"example-{i}")
        for i, code in enumerate(re.findall(r"^```json\n(.*?)^```", text, re.S | re.M))
    ]


@pytest.mark.parametrize("inputs", _doc_examples())
def test_the_guides_examples_plan(inputs: dict[str, Any]) -> None:
    out = plan(PlanRequest.parse(inputs), max_cells=10_000, algorithms=ALL)
    paths = out.get("paths", [out])
    assert any("waypoints" in p for p in paths)
    for p in paths:
        if "waypoints" in p:
            assert (p["waypoints"][-1]["x"], p["waypoints"][-1]["y"]) != (
                p["waypoints"][0]["x"],
                p["waypoints"][0]["y"],
            )


def test_the_guide_has_its_examples() -> None:
    assert len(_doc_examples()) == 3


def test_a_child_that_cannot_compile_leaves_the_kernels_to_this_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    python = sys.executable
    with caplog.at_level("INFO", logger="tasker_worker.handlers.planning.engine"):
        monkeypatch.setattr(sys, "executable", "/nonexistent/python")
        engine._compile_in_child()  # logs, never raises
        monkeypatch.setattr(sys, "executable", python)
        monkeypatch.setattr(engine, "_COMPILE", "raise SystemExit('no compiler today')")
        engine._compile_in_child()
    assert "No such file" in caplog.text and "no compiler today" in caplog.text
    mark = engine._compiled_mark()
    assert mark is not None and mark.name.startswith("kernels-") and mark.exists()  # this session's load left it
