"""OpenTelemetry spans around steps: the ``otel`` extra (``pip install tasker-worker[otel]``).

With ``opentelemetry-api`` importable and ``[worker] tracing = "auto"``, each step's handler
runs in a span ``tasker.step <handler>`` (kind CONSUMER) carrying the namespace, handler, attempt,
step_uuid and correlation_id, continuing the W3C trace context (``traceparent``,
``tracestate``) found in the message's headers. Where the spans go is the application's
OpenTelemetry configuration (a TracerProvider and its exporters), which must be in place when
the worker starts: without one, without the package, or with ``tracing = "off"``, the worker
holds no tracer and the step path does not look at headers at all.

Producers hand their current trace context to a step with ``trace_headers`` (the headers of
``tasker.send_step(..., p_headers => ...)`` or of ``pgmq.send``), in the leaf module
``tasker_worker.tracecontext`` (also importable from here).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tasker_worker import __version__
from tasker_worker.domain.steps import StepMessage
from tasker_worker.handlers.context import StepContext
from tasker_worker.tracecontext import trace_headers  # where it always was, for callers

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind
except ImportError:  # the otel extra is not installed
    propagate = trace = SpanKind = None  # type: ignore[assignment,misc]


def available() -> bool:
    """Whether ``opentelemetry-api`` is importable."""
    return trace is not None


class StepTracer:
    """Opens the span of each step run."""

    def __init__(self) -> None:
        assert trace is not None, "the otel extra is not installed"
        self._tracer = trace.get_tracer("tasker_worker", __version__)

    @contextmanager
    def span(self, ctx: StepContext, step: StepMessage) -> Iterator[Any]:
        """The span of one run of ``step``; an exception leaves it with an error status."""
        parent = propagate.extract(ctx.headers) if ctx.headers else None
        attributes: dict[str, str | int] = {
            "tasker.namespace": step.namespace,
            "tasker.handler": step.handler,
            "tasker.attempt": ctx.attempt,
            "tasker.step_uuid": str(step.step_uuid),
            "tasker.correlation_id": str(step.correlation_id),
            "tasker.queue": ctx.queue,
            "messaging.system": "pgmq",
            "messaging.message.id": str(ctx.msg_id),
        }
        with self._tracer.start_as_current_span(
            f"tasker.step {step.handler}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            yield span


def configured() -> bool:
    """Whether the application has set a TracerProvider (the API's default is a proxy that
    records nothing)."""
    if trace is None:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def step_tracer(mode: str) -> StepTracer | None:
    """The tracer ``[worker] tracing`` asks for: None when off, when the extra is missing, or
    when no TracerProvider is set when the worker starts. Spans that nobody records would still
    cost a step about 70 us of worker CPU (context switches, header parsing), so "auto" means
    "when something records them" (``benchmarks/drain.py``, alternated runs)."""
    if mode == "off" or not configured():
        return None
    return StepTracer()


__all__ = ["StepTracer", "available", "configured", "step_tracer", "trace_headers"]
