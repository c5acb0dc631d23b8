"""Structured logs: the fields, the two formats, and a real worker's lines about a failing step."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from logcapture import json_logs, lines

from tasker_worker import logs
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.testing import make_config, outcome_counter, running_worker, send_steps, wait_until


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    with json_logs() as buffer:
        yield buffer


def test_json_lines_carry_context_and_extra_fields(captured: io.StringIO) -> None:
    log = logging.getLogger("tasker_worker.test")
    with logs.log_context(worker_id="w-1", worker_name="blue"):
        log.warning("step %s retried", "abc", extra={"msg_id": 7, "handler": "resize", "execution_ms": 1.5})
    log.info("outside")
    first, second = lines(captured)
    assert first["message"] == "step abc retried" and first["level"] == "WARNING"
    assert {k: first[k] for k in ("worker_id", "worker_name", "msg_id", "handler", "execution_ms")} == {
        "worker_id": "w-1",
        "worker_name": "blue",
        "msg_id": 7,
        "handler": "resize",
        "execution_ms": 1.5,
    }
    assert "worker_id" not in second


def test_auto_format_is_text_on_a_terminal_and_json_elsewhere() -> None:
    assert isinstance(logs.pick_formatter("auto", _Tty()), logs.KeyValueFormatter)
    assert isinstance(logs.pick_formatter("auto", io.StringIO()), logs.JsonFormatter)
    record = logging.makeLogRecord(
        {"msg": "hello", "levelname": "INFO", "name": "x", "queue": "worker_a_queue", "error_detail": "a b"}
    )
    text = logs.KeyValueFormatter().format(record)
    assert text.endswith('hello  queue=worker_a_queue error_detail="a b"')


def test_configure_twice_does_not_double_lines(captured: io.StringIO) -> None:
    logs.configure_logging("INFO", "json", captured)
    logging.getLogger("tasker_worker.test").warning("once")
    assert [line["message"] for line in lines(captured)] == ["once"]


def test_error_fields_are_one_line() -> None:
    fields = logs.error_fields(ValueError("first line\nsecond line"))
    assert fields == {"error_type": "ValueError", "error_detail": "first line"}


@pytest.mark.anyio
async def test_worker_lines_about_a_failing_step_carry_its_fields(db_url: str, captured: io.StringIO) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('logs')")
    reg = HandlerRegistry()

    @reg.handler("explodes")
    async def explodes(ctx: Any, step: Any) -> None:
        raise KeyError("no such key")

    config = make_config(
        namespaces=["logs"],
        overrides={"retry.max_attempts": 2, "retry.base_delay": "10ms", "retry.max_delay": "20ms"},
    )
    async with running_worker(db_url, config, registry=reg) as worker:
        [body] = await send_steps(db_url, "logs", "explodes", [{}])
        await wait_until(outcome_counter(db_url), timeout=20)
    records = lines(captured)
    retry = next(r for r in records if "retrying" in r["message"])
    dead = next(r for r in records if r["message"].startswith("dead-lettering"))
    for record in (retry, dead):
        assert record["worker_id"] == worker.worker_id
        assert record["worker_name"] == config.worker.name
        assert record["step_uuid"] == body["step_uuid"]
        assert record["correlation_id"] == body["correlation_id"]
        assert (record["namespace"], record["queue"], record["handler"]) == ("logs", "worker_logs_queue", "explodes")
        assert record["error_type"] == "KeyError" and "no such key" in record["error_detail"]
        assert record["source"] in ("event", "poll") and isinstance(record["msg_id"], int)
    assert (retry["attempt"], dead["attempt"]) == (1, 2)
