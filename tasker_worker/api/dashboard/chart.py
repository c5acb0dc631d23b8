"""Small SVG charts drawn on the server: the page shows them without JavaScript, and what
reaches the template is numbers and points only, never text taken from the database."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Sparkline:
    """A line over a fixed box: ``points`` for ``<polyline points=...>`` and the peak it is scaled to."""

    width: int
    height: int
    points: str
    peak: float
    last: float

    @property
    def empty(self) -> bool:
        """Nothing to draw (no values, or all zero)."""
        return self.peak <= 0


def sparkline(values: Sequence[float], *, width: int = 160, height: int = 32, floor: float = 0.0) -> Sparkline:
    """Scale ``values`` (oldest first) into a ``width`` x ``height`` box, the largest value (or
    ``floor``, when larger) touching the top; one value is drawn as a flat line."""
    clean = [max(0.0, float(v)) for v in values]
    peak = max([floor, *clean]) if clean else floor
    if not clean:
        return Sparkline(width, height, "", peak, 0.0)
    if len(clean) == 1:
        clean = clean * 2
    step = width / (len(clean) - 1)
    inner = height - 2  # a stroke at the very edge would be cut in half
    points = []
    for i, value in enumerate(clean):
        y = height - 1 - (value / peak * inner if peak > 0 else 0.0)
        points.append(f"{i * step:.1f},{y:.1f}")
    return Sparkline(width, height, " ".join(points), peak, clean[-1])
