"""Behind a real PgBouncer in transaction pooling mode (Debian's 1.18: no prepared statements
across clients, no session state): a PollingOnly worker with ``[database] pooler =
"transaction"`` drains exactly once, and without the setting it stops at start with an error
that names it."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from pgbouncer import binary, running_pgbouncer
from psycopg import conninfo

from tasker_worker.errors import ConfigError
from tasker_worker.runtime.worker import Worker
from tasker_worker.testing import (
    fetch,
    fetch_value,
    make_config,
    outcome_counter,
    running_worker,
    send_steps,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    binary() is None, reason="pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)"
)


@pytest.fixture
def bouncer(pg_admin_url: str) -> Iterator[str]:
    """PgBouncer with two server connections per database: fewer than the worker's clients, so
    every client's statements are spread over server sessions it does not own."""
    with running_pgbouncer(pg_admin_url, pool_size=2) as url:
        yield url


def _through(bouncer: str, db_url: str) -> str:
    return conninfo.make_conninfo(bouncer, dbname=conninfo.conninfo_to_dict(db_url)["dbname"])


@pytest.mark.anyio
async def test_polling_worker_behind_pgbouncer_drains_exactly_once(db_url: str, bouncer: str) -> None:
    url = _through(bouncer, db_url)
    config = make_config(
        mode="PollingOnly",
        namespaces=["pooled"],
        concurrency=16,
        overrides={
            "database.pooler": "transaction",
            "database.pool_min_size": 4,
            "database.pool_max_size": 6,
            # Migrating through the pooler too: advisory locks per transaction, nothing prepared.
            "database.auto_migrate": True,
            "event_system.fallback_poller.batch_size": 10,
        },
    )
    async with running_worker(url, config) as worker:
        # The producer connects directly (psycopg prepares a statement run five times).
        bodies = await send_steps(db_url, "pooled", "noop", [{"i": i} for i in range(150)])
        bodies += await send_steps(db_url, "pooled", "noop", [{"i": i} for i in range(150)], batch=True)
        count = outcome_counter(db_url, "succeeded")

        async def all_done() -> bool:
            return await count() >= len(bodies)

        await wait_until(all_done, timeout=60)
        supervision = worker.supervision
    outcomes = await fetch(db_url, "SELECT step_uuid::text, count(*) FROM tasker.step_results GROUP BY 1")
    assert sorted(r[0] for r in outcomes) == sorted(b["step_uuid"] for b in bodies)
    assert {r[1] for r in outcomes} == {1}
    assert await fetch_value(db_url, "SELECT count(*) FROM pgmq.q_worker_pooled_queue") == 0
    assert await fetch_value(db_url, "SELECT count(DISTINCT status) FROM tasker.step_results") == 1
    # No session advisory lock through a pooler: this worker did not campaign for supervision.
    assert supervision is None
    # It registered, heartbeat and deregistered through the pooler like any worker.
    row = await fetch(db_url, "SELECT status, deployment_mode FROM tasker.workers")
    assert row == [("deregistered", "PollingOnly")]


@pytest.mark.anyio
async def test_without_the_setting_the_worker_stops_at_start_naming_it(db_url: str, bouncer: str) -> None:
    config = make_config(mode="PollingOnly", namespaces=["pooled"])
    with pytest.raises(ConfigError) as info:
        await Worker(config, database_url=_through(bouncer, db_url)).run()
    assert "database.pooler" in str(info.value) and "transaction" in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.anyio
async def test_prepared_statements_through_a_pooler_stop_the_worker_naming_the_setting(
    pg_admin_url: str, db_url: str
) -> None:
    """A PgBouncer that drops the session options instead of refusing them: the worker starts,
    and its first prepared statement that lands on a server session another client prepared on
    stops it with the same error (one server connection: every client shares it)."""
    await fetch(db_url, "SELECT tasker.create_namespace_queue('pooled')")
    await send_steps(db_url, "pooled", "noop", [{"i": i} for i in range(50)], batch=True)
    config = make_config(
        mode="PollingOnly", namespaces=["pooled"], overrides={"database.pool_min_size": 2, "registry.enabled": False}
    )
    with running_pgbouncer(pg_admin_url, pool_size=1, ignore_options=True) as bouncer:
        worker = Worker(config, database_url=_through(bouncer, db_url))
        with pytest.raises(ConfigError) as info, anyio.fail_after(60):
            await worker.run()
    assert "database.pooler" in str(info.value) and "prepared statement" in str(info.value)


def test_listening_modes_are_refused_behind_a_pooler() -> None:
    for mode in ("Hybrid", "EventDrivenOnly"):
        with pytest.raises(ConfigError) as info:
            make_config(mode=mode, overrides={"database.pooler": "transaction"})
        assert "PollingOnly" in str(info.value) and "LISTEN" in str(info.value)
