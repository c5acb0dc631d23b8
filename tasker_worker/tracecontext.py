"""The W3C trace context a producer hands to its steps (the ``otel`` extra), in a leaf module:
the producer side needs it without the runtime, and the runtime's spans continue it
(``runtime/tracing.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from opentelemetry import propagate
except ImportError:  # the otel extra is not installed
    propagate = None  # type: ignore[assignment]


def trace_headers(headers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``headers`` plus the current W3C trace context (unchanged without the otel extra): the
    headers of ``tasker.send_step(..., p_headers => ...)`` or of ``pgmq.send``."""
    out = dict(headers or {})
    if propagate is not None:
        propagate.inject(out)
    return out


__all__ = ["trace_headers"]
