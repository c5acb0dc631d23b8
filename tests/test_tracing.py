"""OpenTelemetry (the otel extra): a step runs in a span that continues the producer's trace;
without the package, or with tracing off, the worker holds no tracer."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode
from psycopg.types.json import Jsonb

from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.runtime.tracing import trace_headers
from tasker_worker.testing import make_config, outcomes_at_least, running_worker, wait_until

NS = "traced"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


class _Recent(SpanExporter):
    """The last spans exported (bounded: other tests' steps are traced too once this is set)."""

    def __init__(self) -> None:
        self.spans: deque[ReadableSpan] = deque(maxlen=1000)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.spans.clear()


_EXPORTER = _Recent()


@pytest.fixture(scope="module")
def spans() -> Iterator[_Recent]:
    # The global provider can be set once per process; this module's spans are told apart by
    # their trace id, so sharing it with the rest of the run is harmless.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    yield _EXPORTER


@pytest.mark.anyio
async def test_a_step_continues_the_trace_in_its_headers(url: str, spans: _Recent) -> None:
    reg = HandlerRegistry()
    seen: list[str] = []

    @reg.handler("traced")
    async def traced(ctx: Any, step: Any) -> str:
        seen.append(format(trace.get_current_span().get_span_context().trace_id, "032x"))
        return "ok"

    @reg.handler("fails")
    async def fails(ctx: Any, step: Any) -> None:
        raise KeyError("boom")

    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT tasker.send_step(%s, 'traced', p_headers => %s)", (NS, Jsonb(headers)))
        conn.execute("SELECT tasker.send_step(%s, 'fails', p_attempt_limit => 1)", (NS,))
        step_uuid, correlation_id = conn.execute(
            f"SELECT message->>'step_uuid', message->>'correlation_id' FROM pgmq.q_worker_{NS}_queue"
            " WHERE message->>'handler' = 'traced'"
        ).fetchone() or ("", "")
    config = make_config(mode="Hybrid", namespaces=[NS])
    async with running_worker(url, config, registry=reg):
        await wait_until(outcomes_at_least(url, 2), timeout=30)
    mine = [s for s in spans.spans if s.attributes and s.attributes.get("tasker.namespace") == NS]
    [ok] = [s for s in mine if s.name == "tasker.step traced"]
    assert format(ok.context.trace_id, "032x") == TRACE_ID and seen == [TRACE_ID]  # current in the handler
    assert ok.parent is not None and format(ok.parent.span_id, "016x") == PARENT_SPAN_ID
    assert ok.kind is SpanKind.CONSUMER
    expected = {
        "tasker.handler": "traced",
        "tasker.attempt": 1,
        "tasker.step_uuid": step_uuid,
        "tasker.correlation_id": correlation_id,
    }
    assert {k: (ok.attributes or {}).get(k) for k in expected} == expected
    [failed] = [s for s in mine if s.name == "tasker.step fails"]
    assert failed.status.status_code is StatusCode.ERROR and failed.parent is None  # no traceparent: a new trace


def test_producers_pass_their_trace_context_on(spans: _Recent) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("producer") as span:
        headers = trace_headers({"origin": "billing"})
    context = span.get_span_context()
    parent = f"00-{format(context.trace_id, '032x')}-{format(context.span_id, '016x')}-"
    assert headers["origin"] == "billing" and headers["traceparent"].startswith(parent)


@pytest.mark.anyio
async def test_tracing_off_holds_no_tracer(url: str) -> None:
    config = make_config(namespaces=[NS], overrides={"worker.tracing": "off"})
    async with running_worker(url, config) as worker:
        assert worker.processor is not None and worker.processor.steps.tracer is None


def test_without_the_extra_the_worker_holds_no_tracer() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from tasker_worker.runtime import tracing\n"
        "assert not tracing.available() and tracing.step_tracer('auto') is None\n"
        "assert tracing.trace_headers({'a': 1}) == {'a': 1}\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=60)
    assert done.returncode == 0, done.stderr


def test_without_a_tracer_provider_the_worker_holds_no_tracer() -> None:
    """Spans nobody records would cost every step ~70 us: "auto" waits for a TracerProvider."""
    code = (
        "from tasker_worker.runtime import tracing\n"
        "assert tracing.available() and not tracing.configured()\n"
        "assert tracing.step_tracer('auto') is None\n"
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "trace.set_tracer_provider(TracerProvider())\n"
        "assert tracing.configured() and tracing.step_tracer('auto') is not None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=60)
    assert done.returncode == 0, done.stderr
