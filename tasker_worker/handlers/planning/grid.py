"""Occupancy grids: decoding, rasterizing obstacles, inflating by the robot radius, and the
map frame (ROS conventions: cell (0, 0)'s lower-left corner at ``origin``, rotated by ``yaw``)."""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tasker_worker.errors import StepValidationError

#: Inflation radius limit in cells (the cost grows linearly with it).
MAX_INFLATION_CELLS = 256


@dataclass(frozen=True)
class Grid:
    """A map: ``blocked[row, col]`` with row = y and col = x in the map frame, whose origin
    (cell (0, 0)'s lower-left corner) is at world ``(origin_x, origin_y)`` and whose x axis
    points at ``yaw`` radians counterclockwise from the world's (ROS ``map_server``'s
    ``origin: [x, y, yaw]``)."""

    blocked: np.ndarray  # bool, shape (height, width)
    resolution: float  # metres per cell
    origin_x: float = 0.0
    origin_y: float = 0.0
    yaw: float = 0.0

    @property
    def height(self) -> int:
        """Rows."""
        return int(self.blocked.shape[0])

    @property
    def width(self) -> int:
        """Columns."""
        return int(self.blocked.shape[1])

    def local(self, x: float, y: float) -> tuple[float, float]:
        """Map-frame coordinates (metres from the origin along the map's axes) of a world point."""
        dx, dy = x - self.origin_x, y - self.origin_y
        if self.yaw == 0.0:
            return dx, dy
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return c * dx + s * dy, -s * dx + c * dy

    def cell_of(self, x: float, y: float) -> tuple[int, int]:
        """``(row, col)`` of the cell containing world point ``(x, y)``."""
        lx, ly = self.local(x, y)
        return int(np.floor(ly / self.resolution)), int(np.floor(lx / self.resolution))

    def center_of(self, row: int, col: int) -> tuple[float, float]:
        """World ``(x, y)`` of a cell's centre."""
        xy = self.world(np.array([[row + 0.5, col + 0.5]]))
        return float(xy[0, 0]), float(xy[0, 1])

    def world(self, rc: np.ndarray) -> np.ndarray:
        """World ``(x, y)`` rows of map-frame points given in cells as ``(row, col)`` rows
        (a cell's centre is ``(row + 0.5, col + 0.5)``)."""
        lx = rc[:, 1] * self.resolution
        ly = rc[:, 0] * self.resolution
        if self.yaw == 0.0:
            return np.stack([self.origin_x + lx, self.origin_y + ly], axis=1)
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.stack([self.origin_x + c * lx - s * ly, self.origin_y + s * lx + c * ly], axis=1)

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


OccupancyFormat = Literal["occupancy", "image"]


def decode_occupancy(
    data: object,
    width: int,
    height: int,
    *,
    fmt: OccupancyFormat = "occupancy",
    negate: bool = False,
    occupied_thresh: float = 0.65,
    free_thresh: float = 0.25,
    unknown_blocked: bool = True,
) -> np.ndarray:
    """Blocked cells (row 0 at the map's origin) of ROS occupancy data, thresholded as ROS does.

    ``fmt="occupancy"``: ``nav_msgs/OccupancyGrid.data``, ``width*height`` values row-major
    from the origin's row, -1 unknown or 0..100 (a list, or base64 of the int8 bytes). As
    ``map_saver`` reads them: ``v <= round(100 * free_thresh)`` free, ``v >=
    round(100 * occupied_thresh)`` occupied, anything else unknown.

    ``fmt="image"``: the greyscale pixels of a ``map_server`` map image (0..255, the image's
    top row first; a list or base64 of the bytes). As ``map_server`` loads them (trinary mode):
    ``occ = p / 255`` if ``negate`` else ``1 - p / 255``; ``occ > occupied_thresh`` occupied,
    ``occ < free_thresh`` free, anything else unknown; rows flipped so that row 0 is the
    bottom one.

    Unknown cells are blocked when ``unknown_blocked``.
    """
    count = width * height
    signed = fmt == "occupancy"
    lo, hi = (-1, 100) if signed else (0, 255)
    if isinstance(data, str):
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise StepValidationError("occupancy.data is not valid base64") from None
        if len(raw) != count:
            raise StepValidationError(f"occupancy.data holds {len(raw)} bytes; {width}x{height} cells need {count}")
        values = np.frombuffer(raw, dtype=np.int8 if signed else np.uint8).astype(np.int16)
    elif isinstance(data, list):
        if len(data) != count:
            raise StepValidationError(f"occupancy.data holds {len(data)} values; {width}x{height} cells need {count}")
        try:
            values = np.asarray(data, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise StepValidationError("occupancy.data must hold integers") from None
        if values.ndim != 1:
            raise StepValidationError("occupancy.data must be a flat list of integers")
    else:
        raise StepValidationError("occupancy.data must be a list of integers or a base64 string")
    if values.size and (values.min() < lo or values.max() > hi):
        raise StepValidationError(f"occupancy.data values must lie in {lo}..{hi} for format {fmt!r}")
    if signed:
        known = values >= 0
        # map_saver's order: the free test first (the two can meet after rounding)
        free = known & (values <= round(100 * free_thresh))
        occupied = known & ~free & (values >= round(100 * occupied_thresh))
        cells = (occupied | (~free & unknown_blocked)).reshape(height, width)
    else:
        shade = values / 255.0
        occ = shade if negate else 1.0 - shade
        occupied = occ > occupied_thresh
        free = occ < free_thresh
        cells = (occupied | (~free & unknown_blocked)).reshape(height, width)[::-1]
    return np.ascontiguousarray(cells)


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
