"""The testing toolkit for handler authors.

- ``HandlerHarness`` (``testing.memory``): handlers against scripted step messages with an
  in-memory queue and a manual clock — the runtime's own retry, dead-letter, timeout and
  circuit rules, no database, milliseconds per test.
- ``running_worker``, ``send_steps``, ``wait_until``, ... (``testing.db``): a real worker on a
  real database, for integration tests.
- The pytest plugin (``testing.pytest_plugin``, loaded automatically): fixtures
  ``tasker_db_url`` (a fresh migrated database per test, embedded PostgreSQL by default) and
  ``tasker_worker`` (a running worker to enqueue to and await outcomes from).
"""

from tasker_worker.domain.clock import ManualClock
from tasker_worker.testing.db import (
    fetch,
    fetch_value,
    make_config,
    outcome_counter,
    outcomes_at_least,
    running_worker,
    send_steps,
    wait_until,
)
from tasker_worker.testing.memory import HandlerHarness, MemoryMessage, RunRecord, StepOutcome

__all__ = [
    "HandlerHarness",
    "ManualClock",
    "MemoryMessage",
    "RunRecord",
    "StepOutcome",
    "fetch",
    "fetch_value",
    "make_config",
    "outcome_counter",
    "outcomes_at_least",
    "running_worker",
    "send_steps",
    "wait_until",
]
