"""Durations written as strings: ``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"``, ``"1m30s"``."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|s|m|h|d)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> timedelta:
    """Parse a duration string; raise ``ValueError`` with an example on anything else."""
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError(f'durations are strings like "5s" or "250ms", got {value!r}')
    text = value.strip().replace(" ", "")
    pos = 0
    seconds = 0.0
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None:
            raise ValueError(f'cannot read duration {value!r}: use e.g. "5s", "250ms", "2m"')
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(f'cannot read duration {value!r}: use e.g. "5s", "250ms", "2m"')
    return timedelta(seconds=seconds)


_FORMAT_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def format_duration(value: timedelta) -> str:
    """A duration the way people write it (inverse of ``parse_duration``): the largest units
    that divide it exactly, ``"7d"``, ``"1h"``, ``"1m30s"``, ``"250ms"`` (``"0s"`` for zero)."""
    ms = round(value.total_seconds() * 1000)
    if ms == 0:
        return "0s"
    parts = []
    for unit, size in _FORMAT_UNITS:
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
