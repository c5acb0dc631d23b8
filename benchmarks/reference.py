"""Reference shortest paths with scipy.sparse.csgraph (test and benchmark only).

Builds the same graph the planners search: 4- or 8-connected free cells, straight moves cost 1,
diagonal moves cost sqrt(2) and may not cut a corner (both orthogonal neighbours free).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra


def grid_graph(blocked: np.ndarray, connectivity: int = 8) -> csr_matrix:
    """The planners' move graph as a sparse matrix over ``row * width + col``."""
    h, w = blocked.shape
    free = ~blocked
    idx = np.arange(h * w).reshape(h, w)
    rows, cols, costs = [], [], []

    def add(src_mask: np.ndarray, src: np.ndarray, dst: np.ndarray, cost: float) -> None:
        rows.append(src[src_mask])
        cols.append(dst[src_mask])
        costs.append(np.full(int(src_mask.sum()), cost))

    # right and down (and their reverses)
    m = free[:, :-1] & free[:, 1:]
    add(m, idx[:, :-1], idx[:, 1:], 1.0)
    add(m, idx[:, 1:], idx[:, :-1], 1.0)
    m = free[:-1, :] & free[1:, :]
    add(m, idx[:-1, :], idx[1:, :], 1.0)
    add(m, idx[1:, :], idx[:-1, :], 1.0)
    if connectivity == 8:
        s2 = math.sqrt(2.0)
        # down-right: (r, c) -> (r+1, c+1) needs (r, c+1) and (r+1, c) free
        m = free[:-1, :-1] & free[1:, 1:] & free[:-1, 1:] & free[1:, :-1]
        add(m, idx[:-1, :-1], idx[1:, 1:], s2)
        add(m, idx[1:, 1:], idx[:-1, :-1], s2)
        # down-left: (r, c+1) -> (r+1, c) needs (r, c) and (r+1, c+1) free
        add(m, idx[:-1, 1:], idx[1:, :-1], s2)
        add(m, idx[1:, :-1], idx[:-1, 1:], s2)
    n = h * w
    return csr_matrix((np.concatenate(costs), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


def reference_cost(blocked: np.ndarray, start: tuple[int, int], goal: tuple[int, int], connectivity: int = 8) -> float:
    """Optimal cost from start to goal (``inf`` when unreachable), graph building included."""
    w = blocked.shape[1]
    graph = grid_graph(blocked, connectivity)
    dist = dijkstra(graph, directed=True, indices=start[0] * w + start[1])
    return float(dist[goal[0] * w + goal[1]])
