"""``[database] read_url`` against a real streaming standby (``tests/replication.py``): the reads
of the CLI, the API and the dashboard go to the standby, with its staleness shown; writes,
claims, heartbeats, LISTEN and the supervision lock never do.

The proof that a read went to the standby: its replay is paused (``pg_wal_replay_pause()``), so
what the primary commits meanwhile is missing there and only there. The proof that a write
did not: it succeeds (the standby refuses every write) and is found on the primary."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import psycopg
import pytest
from replication import ReplicatedCluster

from tasker_worker.api.app import ApiContext, create_app
from tasker_worker.cli.main import main
from tasker_worker.db.connection import READ_APPLICATION_NAME, open_pool, open_read_pool
from tasker_worker.producer.client import AsyncClient
from tasker_worker.testing import running_worker, wait_until
from tasker_worker.testing.pytest_plugin import resolve_test_config

pytestmark = pytest.mark.heavy

NS = "replica"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ReplicatedCluster]:
    """A primary and an asynchronous standby for the module's tests, stopped after them."""
    with ReplicatedCluster(synchronous=False) as pair:
        with psycopg.connect(pair.url, autocommit=True) as conn:
            conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
        pair.wait_replayed()
        yield pair


@pytest.fixture
def paused(cluster: ReplicatedCluster) -> Iterator[ReplicatedCluster]:
    """The standby with its replay paused for the test (resumed after it, also on failure)."""
    cluster.wait_replayed()
    cluster.pause_replay()
    try:
        yield cluster
    finally:
        cluster.resume_replay()


def sessions(url: str) -> set[str]:
    """The application names of tasker's sessions on the server of ``url``."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT DISTINCT application_name FROM pg_stat_activity WHERE application_name LIKE 'tasker%%'"
        ).fetchall()
    return {str(name).split(":")[0] for (name,) in rows}


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``tasker-worker ARGV`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_reads_come_from_the_standby_and_writes_go_to_the_primary(
    paused: ReplicatedCluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = paused
    monkeypatch.setenv("TASKER_DATABASE_URL", cluster.url)
    monkeypatch.setenv("TASKER_DATABASE_READ_URL", cluster.read_url)
    monkeypatch.setenv("TASKER__DATABASE__AUTO_MIGRATE", "false")
    step = str(uuid.uuid4())

    # A write with a read URL configured: on the primary (the standby would refuse it).
    code, out, err = cli(capsys, "queue", "send", NS, "--handler", "noop", "--step-uuid", step)
    assert code == 0, err
    assert (
        cluster.primary.value(
            f"SELECT count(*) FROM pgmq.q_worker_{NS}_queue WHERE message->>'step_uuid' = %s", (step,)
        )
        == 1
    )

    # The reads go to the standby, which has not replayed the send, and say how stale they are.
    code, out, err = cli(capsys, "steps", "show", step, "--namespace", NS)
    assert code == 1 and "no outcome and no message found" in out, (out, err)
    assert "database.read_url" in err and "replay paused" in err, err
    code, out, err = cli(capsys, "status")
    assert code == 0 and "replay paused" in err, (out, err)
    code, out, err = cli(capsys, "steps", "list", "--namespace", NS)
    assert code == 0 and "a standby" in err, (out, err)

    cluster.resume_replay()
    code, out, err = cli(capsys, "steps", "show", step, "--namespace", NS)
    assert code == 0 and "queued" in out and "caught up" in err, (out, err)
    cluster.pause_replay()  # as the fixture left it


@asynccontextmanager
async def api_on(cluster: ReplicatedCluster, config: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The API app over a pool on the pair's URL and a read pool on the standby."""
    pool = await open_pool(cluster.url, config.database, max_size=2)
    read_pool = await open_read_pool(config.database, max_size=2)
    assert read_pool is not None
    try:
        ctx = ApiContext(pool, config, read_pool=read_pool)
        transport = httpx.ASGITransport(app=create_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
    finally:
        await pool.close()
        await read_pool.close()


@pytest.mark.anyio
async def test_a_worker_never_uses_the_read_url_and_the_api_reads_from_the_standby(
    paused: ReplicatedCluster,
) -> None:
    cluster = paused
    config = resolve_test_config(
        cluster.url,
        {
            "database.read_url": cluster.read_url,
            "event_system.deployment_mode": "Hybrid",
            "worker.namespaces": [NS],
            "api.dashboard": True,
        },
    ).config
    async with running_worker(cluster.url, config), AsyncClient(cluster.url) as producer:
        ref = await producer.send_step(NS, "noop", {"n": 1})
        done = await producer.wait_for(ref.step_uuid, timeout=30)
        assert done.succeeded

        async with api_on(cluster, config) as api:
            # Read from the standby, paused before the step was sent: not there yet.
            missing = await api.get(f"/api/steps/{ref.step_uuid}")
            assert missing.status_code == 404, missing.text
            listed = (await api.get(f"/api/steps?namespace={NS}")).json()
            assert listed["count"] == 0, listed
            health = (await api.get("/health/detailed")).json()
            assert health["read_replica"]["standby"] and health["read_replica"]["paused"], health
            page = await api.get(f"/steps/{ref.step_uuid}")
            assert "read from a standby" in page.text and "replay paused" in page.text, page.text[-800:]

            # Everything of the worker and of the API's writes is on the primary; the standby
            # carries the API's reads alone.
            on_standby = sessions(cluster.read_url)
            assert on_standby == {READ_APPLICATION_NAME}, on_standby
            on_primary = sessions(cluster.primary.url())
            assert {"tasker-worker", "tasker-listener", "tasker-supervisor"} <= on_primary, on_primary
            assert READ_APPLICATION_NAME not in on_primary, on_primary

            cluster.resume_replay()
            found = await api.get(f"/api/steps/{ref.step_uuid}")
            assert found.status_code == 200 and found.json()["status"] == "succeeded", found.text
            # The API looks at the standby again every REPLICA_STATE_TTL_S.
            health = await wait_until(partial(_caught_up, api), timeout=10)
            assert health["read_replica"]["lag_s"] == 0.0, health
            cluster.pause_replay()  # as the fixture left it


async def _caught_up(api: httpx.AsyncClient) -> dict[str, Any] | None:
    body: dict[str, Any] = (await api.get("/health/detailed")).json()
    return body if not body["read_replica"]["paused"] and body["read_replica"]["caught_up"] else None
