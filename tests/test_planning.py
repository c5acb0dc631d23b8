"""Path planners: optimality against scipy.sparse.csgraph (the compiled kernels and the
pure-Python ones alike), Theta* bounds and collisions, request validation, and the path_plan
handler through a real worker. Batches, the grid cache and ROS maps: test_planning_maps.py."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasker_worker.errors import StepFailed, StepValidationError
from tasker_worker.handlers.planning import engine
from tasker_worker.handlers.planning.grid import decode_cells, encode_cells, inflate
from tasker_worker.handlers.planning.planner import plan
from tasker_worker.handlers.planning.request import PlanRequest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import itertools

from reference import reference_cost

ALL = ("astar", "dijkstra", "theta_star")


@st.composite
def grids(draw: Any) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    h = draw(st.integers(2, 24))
    w = draw(st.integers(2, 24))
    density = draw(st.floats(0.0, 0.45))
    seed = draw(st.integers(0, 2**32 - 1))
    blocked = np.random.default_rng(seed).random((h, w)) < density
    start = (draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1)))
    goal = (draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1)))
    blocked[start] = False
    blocked[goal] = False
    return blocked, start, goal


PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KERNELS = ("compiled", "python")


def test_the_compiled_kernels_load() -> None:
    """numba is a dependency: a machine where the kernels fail to load is a failure here, not a
    silent fallback to Python."""
    assert engine.load_kernels(wait=True), engine.kernels_state()


@pytest.mark.parametrize("kernel", KERNELS)
@PROPS
@given(grids(), st.sampled_from([4, 8]))
def test_astar_and_dijkstra_are_optimal(kernel: str, case: Any, connectivity: int) -> None:
    blocked, start, goal = case
    ref = reference_cost(blocked, start, goal, connectivity)
    a = engine.astar(blocked, start, goal, connectivity, kernel=kernel)
    d = engine.dijkstra(blocked, start, goal, connectivity, kernel=kernel)
    if math.isinf(ref):
        assert a is None and d is None
        return
    assert a is not None and d is not None
    assert abs(a.cost - ref) <= 1e-9 and abs(d.cost - ref) <= 1e-9
    assert a.expanded <= d.expanded
    for result in (a, d):
        assert result.path[0] == start and result.path[-1] == goal
        assert _path_cost(blocked, result.path, connectivity) == pytest.approx(result.cost, abs=1e-9)


def _path_cost(blocked: np.ndarray, path: list[tuple[int, int]], connectivity: int) -> float:
    total = 0.0
    for (r0, c0), (r1, c1) in itertools.pairwise(path):
        dr, dc = abs(r1 - r0), abs(c1 - c0)
        assert not blocked[r1, c1]
        if dr and dc:
            assert connectivity == 8 and dr == dc == 1
            assert not blocked[r0, c1] and not blocked[r1, c0], "diagonal move cuts a corner"
            total += math.sqrt(2)
        else:
            assert dr + dc == 1
            total += 1.0
    return total


@pytest.mark.parametrize("kernel", KERNELS)
@PROPS
@given(grids())
def test_theta_star_never_longer_and_collision_free(kernel: str, case: Any) -> None:
    blocked, start, goal = case
    ref = reference_cost(blocked, start, goal, 8)
    result = engine.theta_star(blocked, start, goal, kernel=kernel)
    if math.isinf(ref):
        assert result is None
        return
    assert result is not None
    assert result.cost <= ref + 1e-9
    length = sum(math.dist(a, b) for a, b in zip(result.path, result.path[1:], strict=False))
    assert length == pytest.approx(result.cost, abs=1e-9)
    for a, b in zip(result.path, result.path[1:], strict=False):
        assert _segment_free(blocked, a, b)


def _segment_free(blocked: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Dense sampling of the segment between cell centres (row = y, col = x)."""
    (r0, c0), (r1, c1) = a, b
    n = int(max(abs(r1 - r0), abs(c1 - c0)) * 50) + 2
    for k in range(n + 1):
        t = k / n
        y = r0 + 0.5 + (r1 - r0) * t
        x = c0 + 0.5 + (c1 - c0) * t
        # points exactly on a cell boundary belong to both cells
        rows = {math.floor(y - 1e-9), math.floor(y + 1e-9)}
        cols = {math.floor(x - 1e-9), math.floor(x + 1e-9)}
        for r in rows:
            for c in cols:
                if 0 <= r < blocked.shape[0] and 0 <= c < blocked.shape[1] and blocked[r, c]:
                    return False
    return True


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_cells_round_trip(w: int, h: int, seed: int) -> None:
    blocked = np.random.default_rng(seed).random((h, w)) < 0.5
    assert np.array_equal(decode_cells(encode_cells(blocked), w, h), blocked)
    assert np.array_equal(decode_cells(blocked.astype(int).tolist(), w, h), blocked)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 6.0))
def test_inflation_matches_brute_force(seed: int, radius: float) -> None:
    blocked = np.random.default_rng(seed).random((20, 23)) < 0.05
    expected = np.zeros_like(blocked)
    for r, c in zip(*np.nonzero(blocked), strict=False):
        for rr in range(20):
            for cc in range(23):
                if (rr - r) ** 2 + (cc - c) ** 2 <= radius * radius + 1e-9:
                    expected[rr, cc] = True
    assert np.array_equal(inflate(blocked, radius), expected)


def grid_request(cells: Any, **extra: Any) -> dict[str, Any]:
    h = len(cells)
    w = len(cells[0])
    req = {
        "grid": {"width": w, "height": h, "resolution": 0.5, "origin": {"x": 0, "y": 0}, "cells": cells},
        "start": {"x": 0.25, "y": 0.25},
        "goal": {"x": w * 0.5 - 0.25, "y": h * 0.5 - 0.25},
    }
    req.update(extra)
    return req


def test_plan_result_shape_headings_and_timestamps() -> None:
    cells = [[0] * 6 for _ in range(4)]
    req = PlanRequest.parse(
        grid_request(cells, goal={"x": 2.75, "y": 0.25, "theta": 1.0}, max_speed=2.0, start_time=10.0)
    )
    out = plan(req, max_cells=1000, algorithms=ALL)
    wps = out["waypoints"]
    assert (wps[0]["x"], wps[0]["y"]) == (0.25, 0.25) and (wps[-1]["x"], wps[-1]["y"]) == (2.75, 0.25)
    assert out["length"] == pytest.approx(2.5) and out["cost"] == pytest.approx(5.0)
    assert wps[0]["theta"] == pytest.approx(0.0) and wps[-1]["theta"] == 1.0
    assert wps[0]["t"] == 10.0 and wps[-1]["t"] == pytest.approx(10.0 + 2.5 / 2.0)
    assert all(b["t"] >= a["t"] for a, b in itertools.pairwise(wps))
    assert out["algorithm"] == "astar" and out["expanded_nodes"] > 0 and out["planning_ms"] >= 0


def test_obstacle_map_position3d_and_inflation() -> None:
    req = PlanRequest.parse(
        {
            "map": {
                "bounds": {"min_x": 0, "min_y": 0, "max_x": 10, "max_y": 10},
                "resolution": 0.5,
                "obstacles": [
                    {"type": "rectangle", "min_x": 4, "min_y": 0, "max_x": 6, "max_y": 8},
                    {"type": "circle", "x": 8, "y": 8, "radius": 1},
                ],
            },
            "start": {"x": 1, "y": 1, "z": 3.0},
            "goal": {"x": 9, "y": 1, "z": -1.0},
            "algorithm": "theta_star",
            "robot_radius": 0.5,
        }
    )
    out = plan(req, max_cells=10_000, algorithms=ALL)
    assert out["dropped_z"] == {"start": 3.0, "goal": -1.0}
    assert max(w["y"] for w in out["waypoints"]) > 8  # around the wall's top end
    assert out["length"] > 8


def test_no_path_is_a_recorded_failure() -> None:
    cells = [[0, 1, 0], [0, 1, 0], [0, 1, 0]]
    req = PlanRequest.parse(grid_request(cells, start={"x": 0.25, "y": 0.25}, goal={"x": 1.25, "y": 0.25}))
    with pytest.raises(StepFailed) as info:
        plan(req, max_cells=100, algorithms=ALL)
    assert info.value.reason == "no_path"


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        (grid_request([[0, 0], [0, 0]], start={"x": -5, "y": 0}), "start (-5, 0) is outside the map"),
        (grid_request([[0, 1], [0, 0]], goal={"x": 0.75, "y": 0.25}), "goal (0.75, 0.25) is inside an obstacle"),
        (grid_request([[0, 0], [0, 0]], algorithm="rrt"), "algorithm"),
        (grid_request([[0, 0], [0, 0]], connectivity=6), "connectivity"),
        (grid_request([[0, 0], [0, 0]], robot_radius=-1), "robot_radius"),
        (grid_request([[0, 0], [0, 0]], start={"x": float("nan"), "y": 0}), "start.x: must be a finite number"),
        (
            {
                "grid": {"width": -3, "height": 2, "resolution": 1, "cells": []},
                "start": {"x": 0, "y": 0},
                "goal": {"x": 0, "y": 0},
            },
            "grid.width",
        ),
        (
            {
                "grid": {"width": 2, "height": 2, "resolution": float("nan"), "cells": [[0, 0], [0, 0]]},
                "start": {"x": 0, "y": 0},
                "goal": {"x": 0, "y": 0},
            },
            "grid.resolution",
        ),
        (
            {
                "grid": {"width": 3000, "height": 3000, "resolution": 1, "cells": "AA=="},
                "start": {"x": 0, "y": 0},
                "goal": {"x": 1, "y": 1},
            },
            "accepts at most",
        ),
        (grid_request([[0, 0], [0]]), "rows of"),
        ({"start": {"x": 0, "y": 0}, "goal": {"x": 1, "y": 1}}, "exactly one of grid, map or occupancy"),
        (grid_request([[0, 0], [0, 0]], robot_radius=1e9), "robot_radius covers"),
    ],
)
def test_invalid_requests_say_what_is_wrong(inputs: dict[str, Any], words: str) -> None:
    with pytest.raises(StepValidationError) as info:
        plan(PlanRequest.parse(inputs), max_cells=1_000_000, algorithms=("astar", "dijkstra", "theta_star"))
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_algorithm_not_offered_is_a_validation_error() -> None:
    req = PlanRequest.parse(grid_request([[0, 0], [0, 0]], algorithm="dijkstra"))
    with pytest.raises(StepValidationError, match="not offered"):
        plan(req, max_cells=100, algorithms=("astar",))


# --- through the runtime ---------------------------------------------------------------------

NS = "planning"
QUEUE = "worker_planning_queue"


@pytest.fixture
def url(db_url: str) -> str:
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('planning')")
    return db_url


def random_grid_request(n: int, seed: int, algorithm: str = "astar") -> dict[str, Any]:
    blocked = np.random.default_rng(seed).random((n, n)) < 0.2
    blocked[0, 0] = blocked[-1, -1] = False
    return {
        "grid": {"width": n, "height": n, "resolution": 1.0, "cells": encode_cells(blocked)},
        "start": {"x": 0.5, "y": 0.5},
        "goal": {"x": n - 0.5, "y": n - 0.5},
        "algorithm": algorithm,
    }


@pytest.mark.anyio
async def test_path_plan_steps_through_a_worker(url: str) -> None:
    from tasker_worker.testing import fetch, make_config, running_worker, send_steps, wait_until

    config = make_config(mode="Hybrid", namespaces=[NS], overrides={"worker.executor": "thread"})
    requests = [random_grid_request(32, seed, alg) for seed in range(6) for alg in ALL]
    requests.append(
        {
            "grid": {"width": 3, "height": 3, "resolution": 1, "cells": [[0, 1, 0], [0, 1, 0], [0, 1, 0]]},
            "start": {"x": 0.5, "y": 0.5},
            "goal": {"x": 2.5, "y": 0.5},
        }
    )  # no path
    requests.append(
        {
            "grid": {"width": -1, "height": 3, "resolution": 1, "cells": []},
            "start": {"x": 0, "y": 0},
            "goal": {"x": 0, "y": 0},
        }
    )  # invalid
    requests.append(
        {
            "grid": {"width": 100000, "height": 100000, "resolution": 1, "cells": "AA=="},
            "start": {"x": 0, "y": 0},
            "goal": {"x": 0, "y": 0},
        }
    )  # enormous
    async with running_worker(url, config):
        await send_steps(url, NS, "path_plan", requests)
        await wait_until(lambda: _total(url, len(requests)), timeout=60)
    rows = await fetch(url, "SELECT status, error->>'reason', result FROM tasker.step_results")
    by_status: dict[str, int] = {}
    for status, _, _ in rows:
        by_status[status] = by_status.get(status, 0) + 1
    assert by_status == {"succeeded": 18, "failed": 1, "dead_lettered": 2}
    assert {r[1] for r in rows if r[0] == "failed"} == {"no_path"}
    assert {r[1] for r in rows if r[0] == "dead_lettered"} == {"validation_error"}
    for status, _, result in rows:
        if status == "succeeded":
            assert result["waypoints"] and result["length"] > 0


async def _total(url: str, n: int) -> bool:
    from tasker_worker.testing import fetch_value

    return bool(await fetch_value(url, "SELECT count(*) FROM tasker.step_results") >= n)


@pytest.mark.anyio
async def test_step_needing_a_missing_algorithm(url: str) -> None:
    """Rejected and released for a capable worker; dead-lettered when none is running."""
    from tasker_worker.testing import fetch, fetch_value, make_config, running_worker, send_steps, wait_until

    astar_only = make_config(mode="Hybrid", namespaces=[NS], overrides={"handlers.planning.algorithms": ["astar"]})
    theta_only = make_config(mode="Hybrid", namespaces=[NS], overrides={"handlers.planning.algorithms": ["theta_star"]})
    async with running_worker(url, astar_only) as lacking:
        await send_steps(url, NS, "path_plan", [random_grid_request(16, 1, "theta_star")])
        await wait_until(lambda: _total(url, 1), timeout=20)
    assert lacking.status()["counters"]["rejections"] >= 1
    reason = await fetch_value(url, f"SELECT headers->'tasker_dlq'->>'reason' FROM pgmq.q_{QUEUE}_dlq")
    assert reason == "no_capable_worker"

    # A lacking worker leaves a step it gave back to the capable one (it does not claim it
    # again for LEAVE_REJECTED_S): each step is rejected at most once, never dead-lettered.
    async with running_worker(url, astar_only) as lacking, running_worker(url, theta_only) as capable:
        await send_steps(url, NS, "path_plan", [random_grid_request(16, s, "theta_star") for s in range(2, 6)])
        await wait_until(lambda: _total(url, 5), timeout=30)
        done_by = await fetch(url, "SELECT worker_id, status FROM tasker.step_results WHERE status = 'succeeded'")
        assert {w for w, _ in done_by} == {capable.worker_id}
        assert len(done_by) == 4
        assert lacking.worker_id != capable.worker_id
    assert lacking.status()["counters"]["rejections"] <= 4


@pytest.mark.anyio
async def test_a_step_given_back_reaches_a_capable_event_driven_worker(url: str) -> None:
    """EventDrivenOnly has no poller: a step given back by a lacking worker is announced again
    for when it is ready, so that the capable worker comes for it."""
    from tasker_worker.testing import fetch, make_config, running_worker, send_steps, wait_until

    def edo(algorithm: str) -> Any:
        return make_config(
            mode="EventDrivenOnly", namespaces=[NS], overrides={"handlers.planning.algorithms": [algorithm]}
        )

    async with running_worker(url, edo("astar")) as lacking, running_worker(url, edo("theta_star")) as capable:
        # One at a time, each a fair race between the two for its notification, until the
        # lacking worker has won (and given back) two: at most 40 (missing 40 races in a row
        # has odds of 2**-40).
        sent = 0
        while lacking.status()["counters"]["rejections"] < 2 and sent < 40:
            await send_steps(url, NS, "path_plan", [random_grid_request(16, sent, "theta_star")])
            sent += 1
            await wait_until(lambda n=sent: _total(url, n), timeout=30)
    rows = await fetch(url, "SELECT worker_id, status, error->>'reason' FROM tasker.step_results")
    assert lacking.status()["counters"]["rejections"] >= 2, f"the lacking worker claimed none of {sent} steps"
    assert len(rows) == sent and {r[0] for r in rows} == {capable.worker_id}
    assert {(r[1], r[2]) for r in rows} <= {("succeeded", None), ("failed", "no_path")}


@pytest.mark.anyio
async def test_process_pool_executor_runs_planning(url: str) -> None:
    from tasker_worker.testing import fetch, make_config, running_worker, send_steps, wait_until

    config = make_config(
        mode="Hybrid", namespaces=[NS], overrides={"worker.executor": "process", "worker.executor_workers": 2}
    )
    async with running_worker(url, config):
        await send_steps(url, NS, "path_plan", [random_grid_request(24, s) for s in range(4)])
        await wait_until(lambda: _total(url, 4), timeout=60)
    rows = await fetch(url, "SELECT status FROM tasker.step_results")
    assert [r[0] for r in rows] == ["succeeded"] * 4
