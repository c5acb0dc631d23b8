"""Reading every notification a statement sent, without waiting out a quiet window.

Notifications reach a listener in the order their transactions committed. So after the
statements under test have committed, the listening session notifies itself on a sentinel
channel: once the sentinel arrives, everything committed before it has arrived too, and
"no more notifications" is proven by a positive signal instead of a second of silence.
"""

from __future__ import annotations

from typing import Any

import psycopg

SENTINEL_CHANNEL = "tasker_test_sentinel"


def notifications_so_far(conn: psycopg.Connection[Any], timeout: float = 10.0) -> list[psycopg.Notify]:
    """Every notification ``conn`` (a listening autocommit session) received for transactions
    committed before this call, in order; fails if the sentinel does not come within ``timeout``."""
    conn.execute(f'LISTEN "{SENTINEL_CHANNEL}"')
    conn.execute("SELECT pg_notify(%s, '')", (SENTINEL_CHANNEL,))
    got: list[psycopg.Notify] = []
    for n in conn.notifies(timeout=timeout):
        if n.channel == SENTINEL_CHANNEL:
            return got
        got.append(n)
    raise AssertionError(f"the sentinel notification did not arrive within {timeout}s")
