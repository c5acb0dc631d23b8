"""The ``path_plan`` request: validated with pydantic, errors turned into one readable line."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasker_worker.errors import StepValidationError
from tasker_worker.handlers.planning.grid import OccupancyFormat

Algorithm = Literal["astar", "dijkstra", "theta_star"]
MAX_SIDE = 100_000
#: (start, goal) pairs one step may plan on its map.
MAX_PAIRS = 1000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Position(_Model):
    """Position2D ``{x, y, theta?}`` or Position3D ``{x, y, z}`` (projected to 2D)."""

    x: float
    y: float
    theta: float | None = None
    z: float | None = None


class Origin(_Model):
    """Pose of the grid's corner (cell (0, 0)'s lower-left) in the world: ``{x, y}`` or
    ``{x, y, yaw}``, ROS ``map_server``'s ``[x, y, yaw]`` (or ``[x, y]``), or a ROS ``Pose``
    (``{position: {x, y, z}, orientation: {x, y, z, w}}``, a rotation about z only, as
    ``nav_msgs/MapMetaData.origin``). ``yaw`` is counterclockwise, in radians."""

    x: float = 0.0
    y: float = 0.0
    yaw: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _ros_forms(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if len(value) not in (2, 3):
                raise ValueError(f"origin as a list is [x, y, yaw] (or [x, y]), not {len(value)} numbers")
            return dict(zip(("x", "y", "yaw"), value, strict=False))
        if isinstance(value, dict) and ("position" in value or "orientation" in value):
            return _pose_origin(value)
        return value


def _pose_origin(pose: dict[str, Any]) -> dict[str, Any]:
    """``{x, y, yaw}`` of a ROS ``Pose`` dict (a planar map: rotation about z only)."""
    extra = set(pose) - {"position", "orientation"}
    if extra:
        raise ValueError(f"a Pose origin has position and orientation only, not {', '.join(sorted(extra))}")
    position = pose.get("position") or {}
    orientation = pose.get("orientation") or {"w": 1.0}
    if not isinstance(position, dict) or not isinstance(orientation, dict):
        raise ValueError("a Pose origin's position and orientation are objects")
    try:
        qx, qy, qz, qw = (float(orientation.get(k, 0.0)) for k in ("x", "y", "z", "w"))
        x, y = float(position.get("x", 0.0)), float(position.get("y", 0.0))
    except (TypeError, ValueError):
        raise ValueError("a Pose origin holds numbers") from None
    norm = math.sqrt(qx * qx + qy * qy + qz * qz + qw * qw)
    if not all(math.isfinite(v) for v in (x, y, norm)) or norm == 0.0:
        raise ValueError("origin.orientation must be a finite, non-zero quaternion")
    qx, qy, qz, qw = qx / norm, qy / norm, qz / norm, qw / norm
    if abs(qx) > 1e-6 or abs(qy) > 1e-6:
        raise ValueError("origin.orientation must be a rotation about z only (a planar map)")
    return {"x": x, "y": y, "yaw": math.atan2(2.0 * (qw * qz + qx * qy), 1.0 - 2.0 * (qy * qy + qz * qz))}


class GridSpec(_Model):
    """An occupancy grid."""

    width: int = Field(gt=0, le=MAX_SIDE)
    height: int = Field(gt=0, le=MAX_SIDE)
    resolution: float = Field(gt=0)
    origin: Origin = Field(default_factory=Origin)
    #: Nested lists or base64 bits, checked by ``grid.decode_cells`` (fast for big grids).
    cells: Any


class Bounds(_Model):
    """The map's extent in world coordinates."""

    min_x: float
    min_y: float
    max_x: float
    max_y: float

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if not (self.max_x > self.min_x and self.max_y > self.min_y):
            raise ValueError("bounds must have max_x > min_x and max_y > min_y")
        return self


class Rectangle(_Model):
    """An axis-aligned rectangle obstacle."""

    type: Literal["rectangle"] = "rectangle"
    min_x: float
    min_y: float
    max_x: float
    max_y: float


class Circle(_Model):
    """A circular obstacle."""

    type: Literal["circle"] = "circle"
    x: float
    y: float
    radius: float = Field(ge=0)


class ObstacleMap(_Model):
    """A map described by obstacles in world coordinates, rasterized at ``resolution``."""

    bounds: Bounds
    resolution: float = Field(gt=0)
    obstacles: list[Rectangle | Circle] = Field(default_factory=list, max_length=10_000)


class OccupancySpec(_Model):
    """A ROS occupancy map: ``nav_msgs/OccupancyGrid`` data or ``map_server`` image pixels,
    with ``map_server``'s thresholds (``grid.decode_occupancy`` says how each is read).

    The fields of an ``OccupancyGrid`` message's ``info`` (``width``, ``height``,
    ``resolution``, ``origin``) may come inside ``info`` as ROS sends them; its ``header`` is
    ignored.
    """

    width: int = Field(gt=0, le=MAX_SIDE)
    height: int = Field(gt=0, le=MAX_SIDE)
    resolution: float = Field(gt=0)
    origin: Origin = Field(default_factory=Origin)
    #: A flat list of ``width*height`` integers or base64 of the bytes (checked when decoded).
    data: Any
    format: OccupancyFormat = "occupancy"
    negate: bool = False
    occupied_thresh: float = Field(default=0.65, ge=0, le=1)
    free_thresh: float = Field(default=0.25, ge=0, le=1)
    #: How cells neither free nor occupied are planned: as obstacles (the default) or as free.
    unknown: Literal["occupied", "free"] = "occupied"

    @model_validator(mode="before")
    @classmethod
    def _message_layout(cls, value: Any) -> Any:
        if isinstance(value, dict) and ("info" in value or "header" in value):
            value = dict(value)
            value.pop("header", None)
            info = value.pop("info", None)
            if info is not None:
                if not isinstance(info, dict):
                    raise ValueError("occupancy.info must be an object (nav_msgs/MapMetaData)")
                for key in ("width", "height", "resolution", "origin"):
                    if key in info:
                        if key in value:
                            raise ValueError(f"occupancy.{key} is given twice (in info and beside it)")
                        value[key] = info[key]
        return value

    @model_validator(mode="after")
    def _thresholds(self) -> OccupancySpec:
        if not self.free_thresh < self.occupied_thresh:
            raise ValueError("free_thresh must be smaller than occupied_thresh")
        return self


class Pair(_Model):
    """One (start, goal) pair of a batch."""

    start: Position
    goal: Position


class PlanRequest(_Model):
    """``inputs`` of a ``path_plan`` step: exactly one of ``grid``, ``map`` or ``occupancy``,
    and either ``start`` and ``goal`` or ``pairs`` (a batch on the one map)."""

    grid: GridSpec | None = None
    map: ObstacleMap | None = None
    occupancy: OccupancySpec | None = None
    start: Position | None = None
    goal: Position | None = None
    pairs: list[Pair] | None = Field(default=None, min_length=1, max_length=MAX_PAIRS)
    algorithm: Algorithm = "astar"
    connectivity: Literal[4, 8] = 8
    robot_radius: float = Field(default=0.0, ge=0)
    max_speed: float = Field(default=1.0, gt=0)
    start_time: float = 0.0
    #: ``cells``: a waypoint per cell of the path; ``turns``: only where the path turns (the
    #: same polyline, fewer points).
    waypoints: Literal["cells", "turns"] = "cells"

    @model_validator(mode="after")
    def _one_map(self) -> PlanRequest:
        if sum(m is not None for m in (self.grid, self.map, self.occupancy)) != 1:
            raise ValueError("give exactly one of grid, map or occupancy")
        if self.pairs is None:
            if self.start is None or self.goal is None:
                raise ValueError("give start and goal, or pairs")
        elif self.start is not None or self.goal is not None:
            raise ValueError("give start and goal, or pairs, not both")
        return self

    @property
    def endpoints(self) -> list[tuple[Position, Position]]:
        """The (start, goal) pairs to plan: ``pairs``, or the one of ``start`` and ``goal``."""
        if self.pairs is not None:
            return [(p.start, p.goal) for p in self.pairs]
        assert self.start is not None and self.goal is not None
        return [(self.start, self.goal)]

    @classmethod
    def parse(cls, inputs: dict[str, Any]) -> PlanRequest:
        """Validate, raising ``StepValidationError`` with what is wrong."""
        try:
            return cls.model_validate(inputs)
        except ValidationError as exc:
            problems = []
            for err in exc.errors()[:4]:
                where = ".".join(str(p) for p in err["loc"]) or "inputs"
                msg = err["msg"]
                value = err.get("input")
                if isinstance(value, float) and not math.isfinite(value):
                    msg = "must be a finite number"
                problems.append(f"{where}: {msg}")
            raise StepValidationError("invalid planning request: " + "; ".join(problems)) from None
