"""Retry and reconnect delays: exponential with a cap and jitter."""

from __future__ import annotations

import random
from datetime import timedelta


def backoff_delay(
    attempt: int,
    base: timedelta,
    cap: timedelta,
    jitter: float = 0.2,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before try ``attempt + 1``: ``base * 2**(attempt-1)``, capped, plus up
    to ``jitter`` of itself at random (so a fleet does not retry in lockstep)."""
    attempt = max(1, attempt)
    raw = base.total_seconds() * float(2 ** min(attempt - 1, 30))
    delay = min(raw, cap.total_seconds())
    if jitter > 0:
        delay += delay * jitter * float((rng or random).random())
    return min(delay, cap.total_seconds() * (1 + jitter))
