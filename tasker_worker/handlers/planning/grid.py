"""Occupancy grids: decoding, rasterizing obstacles, inflating by the robot radius."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

from tasker_worker.errors import StepValidationError

#: Inflation radius limit in cells (the cost grows linearly with it).
MAX_INFLATION_CELLS = 256


@dataclass(frozen=True)
class Grid:
    """A map: ``blocked[row, col]`` with row = y and col = x, cell (0, 0) at ``origin``."""

    blocked: np.ndarray  # bool, shape (height, width)
    resolution: float  # metres per cell
    origin_x: float = 0.0
    origin_y: float = 0.0

    @property
    def height(self) -> int:
        """Rows."""
        return int(self.blocked.shape[0])

    @property
    def width(self) -> int:
        """Columns."""
        return int(self.blocked.shape[1])

    def cell_of(self, x: float, y: float) -> tuple[int, int]:
        """``(row, col)`` of the cell containing world point ``(x, y)``."""
        return (
            int(np.floor((y - self.origin_y) / self.resolution)),
            int(np.floor((x - self.origin_x) / self.resolution)),
        )

    def center_of(self, row: int, col: int) -> tuple[float, float]:
        """World ``(x, y)`` of a cell's centre."""
        return (self.origin_x + (col + 0.5) * self.resolution, self.origin_y + (row + 0.5) * self.resolution)

    def contains(self, row: int, col: int) -> bool:
        """Whether the cell is on the map."""
        return 0 <= row < self.height and 0 <= col < self.width


def decode_cells(cells: object, width: int, height: int) -> np.ndarray:
    """Nested lists (``height`` rows of ``width`` values, non-zero = occupied) or a base64
    string of ``width*height`` bits packed row-major, most significant bit first."""
    if isinstance(cells, str):
        try:
            raw = base64.b64decode(cells, validate=True)
        except (binascii.Error, ValueError):
            raise StepValidationError("grid.cells is not valid base64") from None
        needed = (width * height + 7) // 8
        if len(raw) != needed:
            raise StepValidationError(f"grid.cells holds {len(raw)} bytes; {width}x{height} bits need {needed}")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[: width * height]
        return bits.reshape(height, width).astype(bool)
    if isinstance(cells, list):
        if len(cells) != height or any(not isinstance(r, list) or len(r) != width for r in cells):
            raise StepValidationError(f"grid.cells must be {height} rows of {width} values")
        try:
            arr = np.asarray(cells, dtype=float)
        except (TypeError, ValueError):
            raise StepValidationError("grid.cells must hold numbers") from None
        if not np.all(np.isfinite(arr)):
            raise StepValidationError("grid.cells must hold finite numbers")
        return np.asarray(arr != 0)
    raise StepValidationError("grid.cells must be nested lists or a base64 string")


def encode_cells(blocked: np.ndarray) -> str:
    """Inverse of ``decode_cells`` for the base64 form."""
    return base64.b64encode(np.packbits(blocked.astype(np.uint8).ravel()).tobytes()).decode()


def rasterize(
    width: int,
    height: int,
    resolution: float,
    origin: tuple[float, float],
    rectangles: list[tuple[float, float, float, float]],
    circles: list[tuple[float, float, float]],
) -> np.ndarray:
    """Cells whose centres fall inside any obstacle (world coordinates)."""
    xs = origin[0] + (np.arange(width) + 0.5) * resolution
    ys = origin[1] + (np.arange(height) + 0.5) * resolution
    blocked = np.zeros((height, width), dtype=bool)
    for min_x, min_y, max_x, max_y in rectangles:
        cols = (xs >= min_x) & (xs <= max_x)
        rows = (ys >= min_y) & (ys <= max_y)
        blocked |= rows[:, None] & cols[None, :]
    for cx, cy, r in circles:
        blocked |= ((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) <= r * r
    return blocked


def inflate(blocked: np.ndarray, radius_cells: float) -> np.ndarray:
    """Grow obstacles by a disk of ``radius_cells`` (cell-centre distance).

    For each row offset ``dy`` the disk is a horizontal run of half-width ``w(dy)``: one
    running-window pass per distinct width, then a vertical shift per ``dy``, so the cost is
    O(radius * cells) instead of O(radius^2 * cells).
    """
    if radius_cells > MAX_INFLATION_CELLS:
        raise StepValidationError(
            f"robot_radius covers {radius_cells:.0f} cells; at most {MAX_INFLATION_CELLS} are supported "
            "(use a coarser resolution)"
        )
    r = int(np.floor(radius_cells + 1e-9))
    if r <= 0 or not blocked.any():
        return blocked.copy()
    height, width = blocked.shape
    counts = np.zeros((height, width + 1), dtype=np.int32)
    np.cumsum(blocked, axis=1, out=counts[:, 1:])
    horizontal: dict[int, np.ndarray] = {}
    out = np.zeros_like(blocked)
    for dy in range(-r, r + 1):
        w = int(np.floor(np.sqrt(max(0.0, radius_cells * radius_cells - dy * dy)) + 1e-9))
        run = horizontal.get(w)
        if run is None:
            lo = np.clip(np.arange(width) - w, 0, width)
            hi = np.clip(np.arange(width) + w + 1, 0, width)
            run = (counts[:, hi] - counts[:, lo]) > 0
            horizontal[w] = run
        # out[row] |= run[row + dy]
        if dy >= 0:
            out[: height - dy] |= run[dy:]
        else:
            out[-dy:] |= run[: height + dy]
    return out
