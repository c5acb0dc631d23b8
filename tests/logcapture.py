"""The root logger's JSON lines, captured for a test and read back as dicts."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tasker_worker import logs


@contextmanager
def json_logs() -> Iterator[io.StringIO]:
    """The root logger routed to a buffer as JSON at INFO; the previous handlers restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()
    logs.configure_logging("INFO", "json", buffer)
    try:
        yield buffer
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    """Each captured line as a dict."""
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
