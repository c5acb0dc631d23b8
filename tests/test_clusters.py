"""Namespaces on two PostgreSQL clusters (``[queues.namespaces.<ns>] database``): one worker
serves ``alpha`` on the primary (the test's database) and ``beta`` on a second embedded server
started by this module; clients route by namespace. Each step's outcome row lives next to its
queue, exactly once; the registry, supervision and mode control stay on the primary."""

from __future__ import annotations

import json
import time
import types
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from entrypoints import clean_env, cli
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict

from tasker_worker.api.app import create_app
from tasker_worker.api.context import ApiContext
from tasker_worker.config.loader import load_config
from tasker_worker.config.models import TaskerConfig
from tasker_worker.db import migrations
from tasker_worker.db.connection import open_pool
from tasker_worker.db.embedded import temporary_embedded
from tasker_worker.domain.steps import uuid7
from tasker_worker.errors import ConfigError, DatabaseError, UsageError
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.producer.client import AsyncClient, Client
from tasker_worker.runtime.worker import Worker
from tasker_worker.testing import fetch_value, make_config, running_worker, wait_until
from tasker_worker.testing.pytest_plugin import _create_database, _drop_database, _with_db

A, B = "alpha", "beta"
CLUSTER = "two"


@pytest.fixture(scope="module")
def second_server() -> Iterator[str]:
    """A second PostgreSQL server (embedded, in a temporary directory), stopped and deleted at
    the end of the module by this fixture."""
    with temporary_embedded(prefix="tasker-cluster2-") as (url, _):
        yield url


@pytest.fixture
def cluster2_url(second_server: str) -> Iterator[str]:
    """A fresh, empty database on the second server (nothing installed: auto_migrate does it)."""
    name = f"c2_{uuid.uuid4().hex[:12]}"
    _create_database(second_server, name, "template0")
    try:
        yield _with_db(second_server, name)
    finally:
        _drop_database(second_server, name)


def sharded(cluster2_url: str, **overrides: Any) -> TaskerConfig:
    """The test configuration with ``beta`` on cluster ``two`` (migrated at start)."""
    return make_config(
        namespaces=[A, B],
        overrides={
            f"databases.{CLUSTER}.url": cluster2_url,
            f"databases.{CLUSTER}.auto_migrate": True,
            f"queues.namespaces.{B}.database": CLUSTER,
            **overrides,
        },
    )


@contextmanager
def holding_notifications(url: str) -> Iterator[None]:
    """Notifications queued on the server of ``url`` and not consumed: a session LISTENs, then
    stays in a transaction (a backend reads its notifications only between transactions) while
    another sends more than a queue page of them (a usage under one page reads as 0)."""
    with psycopg.connect(url, autocommit=True) as held, psycopg.connect(url, autocommit=True) as sender:
        held.execute('LISTEN "tasker_test_held"')
        held.execute("BEGIN")
        held.execute("SELECT 1")
        for _ in range(40):
            sender.execute("SELECT pg_notify('tasker_test_held', repeat('x', 1000))")
        try:
            yield
        finally:
            held.execute("ROLLBACK")


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def outcomes(url: str) -> dict[str, str]:
    """step_uuid -> status of every outcome row of the database at ``url``."""
    return {str(u): s for u, s in query(url, "SELECT step_uuid, status FROM tasker.step_results")}


def counting_registry(state: types.SimpleNamespace) -> HandlerRegistry:
    """``record``: counts each run by step_uuid and the most steps running at once."""
    state.runs, state.running, state.most = {}, 0, 0
    registry = HandlerRegistry()

    async def record(ctx: Any, step: Any) -> dict[str, Any]:
        key = str(step.step_uuid)
        state.runs[key] = state.runs.get(key, 0) + 1
        state.running += 1
        state.most = max(state.most, state.running)
        try:
            await anyio.sleep(0.05)  # the work: long enough for the two clusters' steps to overlap
        finally:
            state.running -= 1
        return {"namespace": step.namespace}

    registry.register("record", record)
    return registry


# --- one worker, two clusters ------------------------------------------------------------------


@pytest.mark.anyio
async def test_one_worker_runs_both_clusters_steps_exactly_once_each_outcome_on_its_own_cluster(
    db_url: str, cluster2_url: str
) -> None:
    """Steps sent by a client to ``alpha`` (primary) and ``beta`` (cluster two) all run once,
    within the worker's one concurrency (2, shared by both clusters); each outcome row is on the
    cluster of its queue; the registry row on the primary lists both namespaces."""
    config = sharded(cluster2_url, **{"event_system.max_concurrent_processors": 2})
    state = types.SimpleNamespace()
    async with running_worker(db_url, config, registry=counting_registry(state)) as worker:
        assert [c.name for c in worker.clusters] == ["primary", CLUSTER]
        async with AsyncClient(db_url, config=config) as client:
            refs = [await client.send_step(ns, "record", {"i": i}) for i in range(8) for ns in (A, B)]
            for ref in refs:
                result = await client.wait_for(ref.step_uuid, timeout=30, namespace=ref.namespace)
                assert result.succeeded and result.result == {"namespace": ref.namespace}
            # Without a namespace the outcome is found on whichever cluster holds it.
            found = await client.get_result(refs[1].step_uuid)
            assert found is not None and found.namespace == B
            listed = await client.list_results(limit=1000)
            assert sorted(str(r.step_uuid) for r in listed) == sorted(str(r.step_uuid) for r in refs)
        [(namespaces,)] = query(db_url, "SELECT namespaces FROM tasker.workers")
        assert sorted(namespaces) == [A, B]
        assert query(cluster2_url, "SELECT count(*) FROM tasker.workers") == [(0,)]
        status = worker.status()
        assert status["clusters"][CLUSTER]["namespaces"] == [B]
        assert status["queues"] == [f"worker_{A}_queue", f"worker_{B}_queue"]
    sent = {ns: {str(r.step_uuid) for r in refs if r.namespace == ns} for ns in (A, B)}
    assert set(outcomes(db_url)) == sent[A] and set(outcomes(db_url).values()) == {"succeeded"}
    assert set(outcomes(cluster2_url)) == sent[B] and set(outcomes(cluster2_url).values()) == {"succeeded"}
    assert state.runs == dict.fromkeys(sent[A] | sent[B], 1), "every step ran exactly once"
    assert state.most <= 2, f"{state.most} steps ran at once: the concurrency is the worker's, not per cluster"
    assert query(cluster2_url, f"SELECT count(*) FROM pgmq.q_worker_{B}_queue") == [(0,)]
    assert query(db_url, "SELECT to_regclass(%s)", (f"pgmq.q_worker_{B}_queue",)) == [(None,)]


@pytest.mark.anyio
async def test_one_step_uuid_on_two_clusters_is_two_steps_each_recorded_on_its_own(
    db_url: str, cluster2_url: str
) -> None:
    """Dedup is per cluster (the outcome row lives next to its queue): a step_uuid sent to a
    namespace of each cluster runs once on each and is recorded on each, though one worker
    holds both at once."""
    config = sharded(cluster2_url)
    state = types.SimpleNamespace()
    step_uuid = uuid.uuid4()
    async with running_worker(db_url, config, registry=counting_registry(state)):
        async with AsyncClient(db_url, config=config) as client:
            for ns in (A, B):
                await client.send_step(ns, "record", {}, step_uuid=step_uuid)
            for ns in (A, B):
                assert (await client.wait_for(step_uuid, timeout=20, namespace=ns)).namespace == ns
    assert outcomes(db_url) == outcomes(cluster2_url) == {str(step_uuid): "succeeded"}
    assert state.runs == {str(step_uuid): 2}


@pytest.mark.anyio
async def test_each_cluster_has_its_own_listener_and_a_mode_switch_reaches_both(db_url: str, cluster2_url: str) -> None:
    """Hybrid with a poll too slow to matter: a step sent to ``beta`` after start is claimed on
    the notification of cluster two's own listener; ``mode set`` switches both clusters."""
    config = sharded(
        cluster2_url,
        **{"event_system.deployment_mode": "Hybrid", "event_system.fallback_poller.polling_interval": "1h"},
    )
    state = types.SimpleNamespace()
    async with running_worker(db_url, config, registry=counting_registry(state)) as worker:
        async with AsyncClient(db_url, config=config) as client:
            for ns in (B, A):
                ref = await client.send_step(ns, "record", {})
                await client.wait_for(ref.step_uuid, timeout=30, namespace=ns)
        assert query(cluster2_url, "SELECT source FROM tasker.step_results") == [("event",)]
        assert query(db_url, "SELECT source FROM tasker.step_results") == [("event",)]
        assert await worker.set_mode("PollingOnly")
        assert [c.event_system.mode.value for c in worker.clusters] == ["PollingOnly", "PollingOnly"]
        assert all(c.event_system.listener is None for c in worker.clusters)


@pytest.mark.anyio
async def test_shutdown_gives_back_the_running_steps_of_every_cluster_within_the_one_budget(
    db_url: str, cluster2_url: str
) -> None:
    """Handlers that never finish on both clusters: at shutdown both messages go back to their
    own cluster's queue (no outcome row anywhere), within ``shutdown_timeout``."""
    config = sharded(cluster2_url, **{"worker.shutdown_timeout": "2s"})
    started: dict[str, anyio.Event] = {A: anyio.Event(), B: anyio.Event()}
    registry = HandlerRegistry()

    async def hang(ctx: Any, step: Any) -> None:
        started[step.namespace].set()
        await anyio.sleep_forever()

    registry.register("hang", hang)
    async with AsyncClient(db_url, config=config) as client:
        worker = Worker(config, database_url=db_url, registry=registry)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(30):
                await worker.ready.wait()
                for ns in (A, B):
                    await client.send_step(ns, "hang", {})
                for event in started.values():
                    await event.wait()
            began = time.monotonic()
            worker.request_shutdown("test")
            with anyio.fail_after(10):
                await worker.stopped.wait()
            took = time.monotonic() - began
    assert took < 2.0 + 1.0, f"shutdown took {took:.1f}s with a 2s budget"
    for url, ns in ((db_url, A), (cluster2_url, B)):
        assert query(url, "SELECT count(*) FROM tasker.step_results") == [(0,)]
        assert query(url, f"SELECT count(*) FROM pgmq.q_worker_{ns}_queue WHERE vt <= clock_timestamp()") == [(1,)]


@pytest.mark.anyio
async def test_a_cluster_lost_while_running_costs_only_its_own_namespaces(
    db_url: str, cluster2_url: str, second_server: str
) -> None:
    """Cluster two's database disappears under a running worker (its sessions terminated):
    ``alpha`` steps on the primary still run; the worker keeps running and stops cleanly."""
    config = sharded(cluster2_url, **{"event_system.deployment_mode": "Hybrid"})
    state = types.SimpleNamespace()
    async with running_worker(db_url, config, registry=counting_registry(state)) as worker:
        _drop_database(second_server, conninfo_to_dict(cluster2_url)["dbname"])
        async with AsyncClient(db_url, config=config) as client:
            refs = [await client.send_step(A, "record", {"i": i}) for i in range(5)]
            for ref in refs:
                assert (await client.wait_for(ref.step_uuid, timeout=30, namespace=A)).succeeded
        assert not worker.stopped.is_set()
    assert set(outcomes(db_url)) == {str(r.step_uuid) for r in refs}


@pytest.mark.anyio
async def test_the_api_sends_to_the_namespaces_cluster_and_metrics_cover_every_cluster(
    db_url: str, cluster2_url: str
) -> None:
    """``POST /api/namespaces/beta/steps`` lands on cluster two; ``/metrics`` has its queue's
    depth, ``tasker_cluster_up`` for both, and the running worker's per-cluster listener gauge;
    ``/api/queues`` names each queue's cluster."""
    config = sharded(cluster2_url, **{"event_system.deployment_mode": "Hybrid", "api.token": None})
    async with running_worker(db_url, config) as worker:
        pool = await open_pool(db_url, config.database, max_size=2)
        ctx = ApiContext.for_worker(pool, config, worker)
        try:
            transport = httpx.ASGITransport(app=create_app(ctx))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                sent = await http.post(
                    f"/api/namespaces/{B}/steps",
                    json={"handler": "nobody_has_it", "delay": 3600, "step_uuid": str(uuid.uuid4())},
                )
                assert sent.status_code == 201, sent.text
                step = await http.get(f"/api/steps/{sent.json()['step_uuid']}")
                assert step.json()["queue"] == f"worker_{B}_queue", step.text
                queues = (await http.get("/api/queues")).json()
                with holding_notifications(cluster2_url):
                    text = (await http.get("/metrics")).text
        finally:
            await ctx.close()
            await pool.close()
    assert _depth(cluster2_url, B) == 1
    assert {(q["queue"], q.get("cluster")) for q in queues["queues"]} >= {(f"worker_{B}_queue", CLUSTER)}
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("tasker_cluster_up", (("cluster", CLUSTER),))] == 1.0
    assert samples[("tasker_cluster_up", (("cluster", "primary"),))] == 1.0
    assert samples[("tasker_queue_depth", (("queue", f"worker_{B}_queue"),))] == 1.0
    listener = ("tasker_worker_cluster_listener_up", (("cluster", CLUSTER), ("worker_id", worker.worker_id)))
    assert samples[listener] == 1.0
    # Cluster two's own NOTIFY queue (its producers take its own commit lock), held by a listener.
    assert samples[("tasker_cluster_notification_queue_usage", (("cluster", CLUSTER),))] > 0


@pytest.mark.anyio
async def test_a_cluster_down_at_start_is_an_error_naming_it_and_nothing_registers(db_url: str) -> None:
    """A worker whose ``beta`` lives on a cluster that does not answer does not start: the error
    names the cluster, the key that sets its URL and the namespace on it; no registry row."""
    config = make_config(
        namespaces=[A, B],
        overrides={
            "databases.gone.url": "postgresql://postgres@127.0.0.1:9/tasker",
            "databases.gone.connect_timeout": "1s",
            f"queues.namespaces.{B}.database": "gone",
        },
    )
    worker = Worker(config, database_url=db_url)
    with pytest.raises(DatabaseError) as caught, anyio.fail_after(30):
        await worker.run()
    message = str(caught.value)
    assert "cluster gone (databases.gone.url" in message and f"holds namespace {B}" in message, message
    assert "cannot connect to PostgreSQL" in message
    assert await fetch_value(db_url, "SELECT count(*) FROM tasker.workers") == 0


# --- clients route by namespace ------------------------------------------------------------------


def _queues_on_both(db_url: str, cluster2_url: str) -> None:
    """Both clusters migrated, each with a ``beta`` queue: a send that goes to the wrong one
    succeeds there, so only where it lands tells routing from no routing."""
    anyio.run(migrations.migrate, cluster2_url)
    for url in (db_url, cluster2_url):
        query(url, "SELECT tasker.create_namespace_queue(%s)", (B,))
    query(db_url, "SELECT tasker.create_namespace_queue(%s)", (A,))


def _depth(url: str, ns: str) -> int:
    return int(query(url, f"SELECT count(*) FROM pgmq.q_worker_{ns}_queue")[0][0])


def test_a_client_send_to_beta_lands_on_cluster_two_and_is_cancelled_there(db_url: str, cluster2_url: str) -> None:
    """``Client`` (blocking) and ``AsyncClient`` send ``beta`` steps to cluster two, ``alpha``
    steps to the primary; a cancel, a look-up by step_uuid and ``find_queued`` go where the step is."""
    _queues_on_both(db_url, cluster2_url)
    config = sharded(cluster2_url)
    with Client(db_url, config=config) as client:
        ref = client.send_step(B, "record", {}, step_uuid=uuid.uuid4(), delay=3600)
        batch = client.send_steps(B, "record", [{}, {}])
        client.send_step(A, "record", {})
        assert (_depth(cluster2_url, B), _depth(db_url, B), _depth(db_url, A)) == (3, 0, 1)
        queued = client.find_queued(ref.step_uuid)
        assert queued is not None and queued["state"] == "delayed" and queued["msg_id"] == ref.msg_id
        assert client.cancel(B, ref.step_uuid, by="test") == "cancelled"
        result = client.get_result(ref.step_uuid)
        assert result is not None and result.status.value == "cancelled"
    assert outcomes(cluster2_url) == {str(ref.step_uuid): "cancelled"} and outcomes(db_url) == {}
    assert len(batch) == 2

    async def sends() -> None:
        async with AsyncClient(db_url, config=config) as client:
            await client.send_step(B, "record", {})
            await client.send_steps(B, "record", [{}])

    anyio.run(sends)
    assert (_depth(cluster2_url, B), _depth(db_url, B)) == (4, 0)


def test_wait_for_without_a_namespace_says_to_give_one_when_no_cluster_knows_the_step(
    db_url: str, cluster2_url: str
) -> None:
    _queues_on_both(db_url, cluster2_url)
    with Client(db_url, config=sharded(cluster2_url)) as client, pytest.raises(UsageError, match="namespace"):
        client.wait_for(uuid.uuid4(), timeout=1)


def test_the_cli_migrates_every_cluster_and_sends_to_the_namespaces_cluster(
    db_url: str, cluster2_url: str, tmp_path: Path
) -> None:
    """``db migrate`` installs the schema on cluster two too; ``queue create``/``queue send``
    put ``beta``'s queue and step there; ``steps show`` finds the step (it asks each cluster)."""
    env = clean_env(
        tmp_path,
        TASKER_DATABASE_URL=db_url,
        TASKER__DATABASES__TWO__URL=cluster2_url,
        TASKER__QUEUES__NAMESPACES__BETA__DATABASE=CLUSTER,
    )
    done = cli(env, "db", "migrate")
    assert done.returncode == 0, done.stderr
    assert "two: applied" in done.stdout and "primary: up to date" in done.stdout, done.stdout
    assert query(cluster2_url, "SELECT to_regnamespace('tasker') IS NOT NULL") == [(True,)]
    assert cli(env, "queue", "create", B).returncode == 0
    sent = cli(env, "queue", "send", B, "--handler", "noop", "--json", "--step-uuid", str(uuid.uuid4()))
    assert sent.returncode == 0, sent.stderr
    [ref] = json.loads(sent.stdout)
    assert query(cluster2_url, f"SELECT count(*) FROM pgmq.q_worker_{B}_queue") == [(1,)]
    shown = cli(env, "steps", "show", ref["step_uuid"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["queue"] == f"worker_{B}_queue"
    listed = cli(env, "queue", "list", "--json")
    assert {(q["queue_name"], q["cluster"]) for q in json.loads(listed.stdout)} >= {(f"worker_{B}_queue", CLUSTER)}


# --- notifications at many producers (migration 0020) on each cluster ---------------------------


def listener_rows(url: str) -> list[tuple[Any, ...]]:
    """``(namespace, worker_id, alive, draining)`` of every listener row of the database at ``url``."""
    return query(
        url,
        "SELECT namespace, worker_id, alive_until > clock_timestamp(),"
        " coalesce(draining_until > clock_timestamp(), false) FROM tasker.queue_listeners ORDER BY 1",
    )


async def unannounced_beta(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """The wakeups of ``beta`` that ``conn`` (listening on cluster two) received up to now: a
    sentinel sent after them marks the end."""
    await conn.execute('LISTEN "tasker_test_sentinel"')
    await conn.execute("SELECT pg_notify('tasker_test_sentinel', '')")
    got = []
    async for note in conn.notifies(timeout=10):
        if note.channel == "tasker_test_sentinel":
            break
        got.append(json.loads(note.payload))
    return [w for w in got if w.get("namespace") == B]


@pytest.mark.anyio
async def test_listener_rows_and_drain_leases_are_kept_on_the_cluster_of_their_namespace(
    db_url: str, cluster2_url: str
) -> None:
    """The send trigger of cluster two reads cluster two's ``tasker.queue_listeners``: the worker
    keeps its row for ``beta`` there (and ``alpha``'s on the primary), and while it drains
    ``beta`` its lease is there, so a send to ``beta`` is not announced; the lease ends with the
    backlog and the rows go with the worker."""
    gate = anyio.Event()
    registry = HandlerRegistry()

    async def gated(ctx: Any, step: Any) -> None:
        await gate.wait()

    async def quick(ctx: Any, step: Any) -> None:
        return None

    registry.register("gated", gated)
    registry.register("quick", quick)
    config = sharded(
        cluster2_url,
        **{
            # Nothing polls: what runs was claimed on a notification or by the drain's own claims.
            "event_system.deployment_mode": "EventDrivenOnly",
            "event_system.max_concurrent_processors": 1,
            "worker.prefetch": 0,
        },
    )
    async with running_worker(db_url, config, registry=registry) as worker:
        me = worker.worker_id
        await wait_until(lambda: listener_rows(cluster2_url) == [(B, me, True, False)], timeout=10)
        assert listener_rows(db_url) == [(A, me, True, False)]
        async with AsyncClient(db_url, config=config) as client:
            for i in range(2):
                await client.send_step(B, "gated", {"i": i})
            # One runs, one waits: its claim came back full, so it drains beta, on cluster two.
            await wait_until(lambda: listener_rows(cluster2_url) == [(B, me, True, True)], timeout=10)
            assert listener_rows(db_url) == [(A, me, True, False)]
            async with await psycopg.AsyncConnection.connect(cluster2_url, autocommit=True) as lc:
                await lc.execute(f'LISTEN "pgmq_message_ready.{B}"')
                late = await client.send_step(B, "quick", {})
                assert await unannounced_beta(lc) == []  # every listener of beta drains it
            gate.set()
            assert (await client.wait_for(late.step_uuid, timeout=30, namespace=B)).succeeded
        await wait_until(lambda: listener_rows(cluster2_url) == [(B, me, True, False)], timeout=10)
        assert worker.status()["counters"]["missed_wakeups"] == 0
    assert sorted(outcomes(cluster2_url).values()) == ["succeeded"] * 3
    assert listener_rows(cluster2_url) == listener_rows(db_url) == []


@pytest.mark.anyio
async def test_notify_false_of_a_namespace_is_written_on_its_cluster_and_the_cli_finds_it_there(
    db_url: str, cluster2_url: str, tmp_path: Path
) -> None:
    """``[queues.namespaces.beta] notify = false``: the worker writes the switch on cluster two
    (whose send trigger reads it), beta's sends are not announced and the worker polls beta
    (EventDrivenOnly: it polls only what is quiet); ``queue notify beta`` reads and turns the
    switch on cluster two."""
    config = sharded(
        cluster2_url,
        **{
            "event_system.deployment_mode": "EventDrivenOnly",
            "event_system.fallback_poller.polling_interval": "200ms",
            f"queues.namespaces.{B}.notify": False,
        },
    )
    state = types.SimpleNamespace()
    async with running_worker(db_url, config, registry=counting_registry(state)) as worker:
        assert query(cluster2_url, "SELECT namespace, notify, changed_by FROM tasker.queue_notify") == [
            (B, False, f"worker {worker.worker_id}")
        ]
        assert query(db_url, "SELECT count(*) FROM tasker.queue_notify") == [(0,)]
        async with AsyncClient(db_url, config=config) as client:
            async with await psycopg.AsyncConnection.connect(cluster2_url, autocommit=True) as lc:
                await lc.execute(f'LISTEN "pgmq_message_ready.{B}"')
                for ns in (B, A):
                    ref = await client.send_step(ns, "record", {})
                    assert (await client.wait_for(ref.step_uuid, timeout=30, namespace=ns)).succeeded
                assert await unannounced_beta(lc) == []
    assert query(cluster2_url, "SELECT source FROM tasker.step_results") == [("poll",)]
    assert query(db_url, "SELECT source FROM tasker.step_results") == [("event",)]

    env = clean_env(
        tmp_path,
        TASKER_DATABASE_URL=db_url,
        TASKER__DATABASES__TWO__URL=cluster2_url,
        TASKER__QUEUES__NAMESPACES__BETA__DATABASE=CLUSTER,
    )
    shown = cli(env, "queue", "notify", B)
    assert shown.returncode == 0 and "beta: notify off" in shown.stdout, shown.stdout + shown.stderr
    turned = cli(env, "queue", "notify", B, "on")
    assert turned.returncode == 0 and "beta: notify on" in turned.stdout, turned.stdout + turned.stderr
    assert query(cluster2_url, "SELECT count(*) FROM tasker.queue_notify") == [(0,)]  # on: the default
    changes = "SELECT count(*) FROM tasker.events WHERE event_type = 'QueueNotifyChanged'"
    assert query(cluster2_url, changes) == [(2,)]  # the worker's off, the CLI's on
    assert query(db_url, changes) == [(0,)]


# --- configuration -------------------------------------------------------------------------------


def _load(environ: dict[str, str]) -> TaskerConfig:
    return load_config(None, "development", environ=environ).config


def test_clusters_are_named_by_databases_or_given_by_url_and_a_shard_inherits_the_pool_keys() -> None:
    config = _load(
        {
            "TASKER__DATABASE__POOL_MAX_SIZE": "12",
            "TASKER__DATABASES__TWO__URL": "postgresql://h2/app",
            "TASKER__DATABASES__TWO__POOL_MIN_SIZE": "0",
            "TASKER__QUEUES__NAMESPACES__BETA__DATABASE": "two",
            "TASKER__QUEUES__NAMESPACES__GAMMA__DATABASE": "postgresql://u:secret@h3:5433/app",
            "TASKER__QUEUES__NAMESPACES__DELTA__DATABASE": "postgresql://h2/app",
            "TASKER__QUEUES__NAMESPACES__ALPHA__DATABASE": "primary",
        }
    )
    assert [config.cluster_of(ns) for ns in ("alpha", "beta", "gamma", "delta", "other")] == [
        "primary",
        "two",
        "app@h3:5433",
        "two",
        "primary",
    ]
    two = config.clusters()["two"].settings
    assert (two.url, two.pool_min_size, two.pool_max_size) == ("postgresql://h2/app", 0, 12)
    assert "secret" not in "".join(config.clusters())
    assert config.sharded and not TaskerConfig().sharded


@pytest.mark.parametrize(
    ("environ", "key", "says"),
    [
        (
            {"TASKER__QUEUES__NAMESPACES__BETA__DATABASE": "shard9"},
            "queues.namespaces.beta.database",
            "[databases.shard9]",
        ),
        ({"TASKER__QUEUES__NAMESPACES__BETA__DATABASE": "Shard 9"}, "queues.namespaces.beta.database", "neither"),
        ({"TASKER__DATABASES__PRIMARY__URL": "postgresql://h/x"}, "databases.primary", "[database]"),
        ({"TASKER__DATABASES__TWO__URL": "h2"}, "databases.two.url", "PostgreSQL URL"),
        (
            {"TASKER_DATABASE_URL": "postgresql://h/x", "TASKER__DATABASES__TWO__URL": "postgresql://h/x"},
            "databases.two.url",
            "same URL as database.url",
        ),
        (
            {"TASKER__DATABASES__TWO__URL": "postgresql://h2/x", "TASKER__DATABASES__TWO__POOL_MIN_SIZE": "20"},
            "databases.two",
            "pool_min_size",
        ),
        (
            {"TASKER__DATABASES__TWO__URL": "postgresql://h2/x", "TASKER__DATABASES__TWO__POOLER": "transaction"},
            "databases.two.pooler",
            "needs LISTEN on every cluster",
        ),
    ],
)
def test_a_wrong_cluster_setting_is_a_config_error_naming_its_key(environ: dict[str, str], key: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(environ)
    assert caught.value.key == key and says in str(caught.value), str(caught.value)


def test_one_cluster_builds_what_it_always_built(db_url: str) -> None:
    """Nothing mapped elsewhere: one event system, one step path with its own slots, no
    routing in the clients (the hot path has no extra hop)."""

    async def check() -> None:
        config = make_config(namespaces=[A])
        async with running_worker(db_url, config) as worker:
            assert len(worker.clusters) == 1 and not worker.clusters[0].processor.shares_slots
            assert "clusters" not in worker.status()
        async with AsyncClient(db_url, config=config) as client:
            assert client._clusters is None

    anyio.run(check)


@pytest.mark.anyio
async def test_outcomes_on_a_secondary_cluster_are_pruned_by_its_own_housekeeping(
    db_url: str, cluster2_url: str
) -> None:
    """Retention of cluster two's outcome rows is run by a worker serving it, elected there:
    it creates cluster two's day partitions of the outcome table (migration 0021) and drops a
    day past the horizon there."""
    config = sharded(
        cluster2_url, **{"retention.interval": "100ms", "retention.outcomes": "1d", "retry.max_releases": 0}
    )
    today = f"step_results_{time.strftime('%Y%m%d', time.gmtime())}"
    two_days_ago = time.time() - 2 * 86400
    past_day = f"step_results_{time.strftime('%Y%m%d', time.gmtime(two_days_ago))}"
    async with running_worker(db_url, config, registry=counting_registry(types.SimpleNamespace())) as worker:

        def days() -> set[str]:
            return {
                r[0] for r in query(cluster2_url, "SELECT name FROM tasker.history_partitions() WHERE kind = 'day'")
            }

        # The worker's start migrated cluster two, and the migration made its day partitions:
        # dropped, so that only the housekeeping can make today's again.
        for made in days():
            query(cluster2_url, f"DROP TABLE tasker.{made}")

        async def partitioned() -> bool:
            return today in days()

        await wait_until(partitioned, timeout=20)  # made by cluster two's housekeeping
        # A step made two days ago (its step_uuid's time files its outcome under that day),
        # recorded now (into the default partition: that day has none), its day created (the row
        # moves in; created after the row, or retention could drop the day while still empty),
        # then aged past the horizon: its day goes whole.
        async with AsyncClient(db_url, config=config) as client:
            ref = await client.send_step(B, "record", {}, step_uuid=uuid7(two_days_ago))
            await client.wait_for(ref.step_uuid, timeout=30, namespace=B)
        created = query(cluster2_url, "SELECT tasker.create_history_partition(%s::date, 10000)", (past_day[-8:],))
        assert created == [(True,)]
        assert query(cluster2_url, "SELECT tableoid::regclass::text FROM tasker.step_results") == [
            (f"tasker.{past_day}",)
        ]
        query(cluster2_url, "UPDATE tasker.step_results SET finished_at = finished_at - interval '2 days'")

        async def pruned() -> bool:
            return await fetch_value(cluster2_url, "SELECT count(*) FROM tasker.step_results") == 0

        await wait_until(pruned, timeout=20)
        assert past_day not in days()
        housekeeping = worker.clusters[1].housekeeping
        assert housekeeping is not None and housekeeping.is_leader


@pytest.mark.anyio
async def test_the_apis_reads_go_to_the_read_url_for_the_primary_and_to_each_other_cluster_itself(
    db_url: str, cluster2_url: str
) -> None:
    """``[database] read_url`` is the primary's: with it set, ``GET /api/steps/{uuid}`` reads the
    primary's steps from the read pool and ``beta``'s from cluster two. The read pool here is a
    database of its own with nothing in it, so a step found through it would be a read that went
    to the primary."""
    config = sharded(cluster2_url, **{"api.token": None})
    replica = f"rr_{uuid.uuid4().hex[:12]}"
    admin = conninfo_to_dict(db_url)
    admin_url = _with_db(db_url, "postgres") if admin.get("dbname") else db_url
    _create_database(admin_url, replica, "template0")
    replica_url = _with_db(db_url, replica)
    try:
        await migrations.migrate(cluster2_url)
        await migrations.migrate(replica_url)
        query(db_url, "SELECT tasker.create_namespace_queue(%s)", (A,))
        query(cluster2_url, "SELECT tasker.create_namespace_queue(%s)", (B,))
        pool = await open_pool(db_url, config.database, max_size=2)
        read_pool = await open_pool(replica_url, config.database, max_size=2)
        ctx = ApiContext(pool, config, read_pool=read_pool)
        try:
            transport = httpx.ASGITransport(app=create_app(ctx))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                found = {}
                for ns in (A, B):
                    sent = await http.post(
                        f"/api/namespaces/{ns}/steps",
                        json={"handler": "nobody_has_it", "delay": 3600, "step_uuid": str(uuid.uuid4())},
                    )
                    assert sent.status_code == 201, sent.text
                    found[ns] = await http.get(f"/api/steps/{sent.json()['step_uuid']}")
                flow = await http.get(f"/api/queues/{B}/flow")
        finally:
            await ctx.close()
            await read_pool.close()
            await pool.close()
    finally:
        _drop_database(admin_url, replica)
    assert _depth(db_url, A) == 1 and _depth(cluster2_url, B) == 1
    assert found[A].status_code == 404, found[A].text  # read where the primary's reads go
    assert found[B].status_code == 200 and found[B].json()["queue"] == f"worker_{B}_queue", found[B].text
    assert flow.status_code == 200 and flow.json()["namespace"] == B, flow.text
