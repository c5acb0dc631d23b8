"""The ``path_plan`` request: validated with pydantic, errors turned into one readable line."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasker_worker.errors import StepValidationError

Algorithm = Literal["astar", "dijkstra", "theta_star"]
MAX_SIDE = 100_000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Position(_Model):
    """Position2D ``{x, y, theta?}`` or Position3D ``{x, y, z}`` (projected to 2D)."""

    x: float
    y: float
    theta: float | None = None
    z: float | None = None


class Origin(_Model):
    """World coordinates of the grid's corner (cell (0, 0)'s lower-left)."""

    x: float = 0.0
    y: float = 0.0


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


class PlanRequest(_Model):
    """``inputs`` of a ``path_plan`` step: exactly one of ``grid`` or ``map``."""

    grid: GridSpec | None = None
    map: ObstacleMap | None = None
    start: Position
    goal: Position
    algorithm: Algorithm = "astar"
    connectivity: Literal[4, 8] = 8
    robot_radius: float = Field(default=0.0, ge=0)
    max_speed: float = Field(default=1.0, gt=0)
    start_time: float = 0.0

    @model_validator(mode="after")
    def _one_map(self) -> PlanRequest:
        if (self.grid is None) == (self.map is None):
            raise ValueError("give exactly one of grid or map")
        return self

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
