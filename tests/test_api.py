"""The HTTP API on a real PostgreSQL: every route, every error status, the token check,
``/metrics`` through prometheus-client's parser, and the OpenAPI document."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasker_worker.api.app import ApiContext, create_app
from tasker_worker.db.connection import open_pool
from tasker_worker.domain.clock import ManualClock
from tasker_worker.testing import make_config, outcomes_at_least, running_worker, wait_until

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def body(worker_id: str = "api-1", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "worker_id": worker_id,
        "name": "planner",
        "hostname": "host-b",
        "pid": 77,
        "namespaces": ["planning"],
        "capabilities": ["handler:path_plan"],
        "cpu_cores": 4,
        "memory_total": 2**33,
    }
    data.update(extra)
    return data


async def make_client(
    db_url: str, token: str | None, **ctx: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, ApiContext]]:
    config = make_config(overrides={"api.token": token} if token else {})
    pool = await open_pool(db_url, config.database, max_size=4)
    context = ApiContext(pool, config, **ctx)
    transport = httpx.ASGITransport(app=create_app(context))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, context
    finally:
        await pool.close()


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async for client, _ in make_client(db_url, TOKEN):
        yield client


@pytest.fixture
async def open_api(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async for client, _ in make_client(db_url, None):
        yield client


def assert_error(resp: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    data = resp.json()
    # Failures of ours (500) or of the database (503) carry an error id instead of the cause.
    assert set(data) == ({"error", "detail", "error_id"} if status in (500, 503) else {"error", "detail"}), data
    if error:
        assert data["error"] == error
    return data


async def test_register_get_list_heartbeat_deregister(api: httpx.AsyncClient) -> None:
    resp = await api.post("/api/workers", json=body(), headers=AUTH)
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "pending" and resp.headers["location"] == "/api/workers/api-1"

    assert (await api.get("/api/workers/api-1")).json()["hostname"] == "host-b"
    resp = await api.post("/api/workers/api-1/heartbeat", json={"cpu_percent": 3.5, "active_steps": 1}, headers=AUTH)
    assert resp.status_code == 200 and resp.json()["status"] == "pending"
    resp = await api.post("/api/workers/api-1/heartbeat", headers=AUTH)  # an empty heartbeat is fine
    assert resp.status_code == 200

    beats = (await api.get("/api/workers/api-1/heartbeats", params={"limit": 1})).json()
    assert beats["count"] == 1 and beats["heartbeats"][0]["cpu_percent"] is None
    assert (await api.get("/api/workers/api-1/heartbeats")).json()["count"] == 2

    listed = (await api.get("/api/workers", params={"status": "pending"})).json()
    assert [w["worker_id"] for w in listed["workers"]] == ["api-1"]
    assert (await api.get("/api/workers", params={"status": "active"})).json()["count"] == 0

    resp = await api.post("/api/workers/api-1/mode", json={"mode": "PollingOnly"}, headers=AUTH)
    assert resp.status_code == 202 and resp.json() == {"worker_id": "api-1", "requested_mode": "PollingOnly"}
    shown = (await api.get("/api/workers/api-1")).json()
    assert (shown["deployment_mode"], shown["requested_mode"]) == ("Hybrid", "PollingOnly")
    assert (await api.post("/api/workers/api-1/mode", json={"mode": "Sometimes"}, headers=AUTH)).status_code == 400
    assert (await api.post("/api/workers/nobody/mode", json={"mode": "Hybrid"}, headers=AUTH)).status_code == 404

    resp = await api.request("DELETE", "/api/workers/api-1", json={"reason": "maintenance"}, headers=AUTH)
    assert resp.status_code == 200 and resp.json()["deregister_reason"] == "maintenance"
    assert (await api.get("/api/workers")).json()["count"] == 0  # deregistered hidden by default
    assert (await api.get("/api/workers", params={"include_deregistered": "true"})).json()["count"] == 1


async def test_error_statuses(api: httpx.AsyncClient) -> None:
    assert (await api.post("/api/workers", json=body(), headers=AUTH)).status_code == 201
    assert_error(await api.post("/api/workers", json=body(), headers=AUTH), 409, "conflict")
    assert_error(await api.post("/api/workers", content=b"{nope", headers=AUTH), 400, "invalid_json")
    assert_error(await api.post("/api/workers", json=[1, 2], headers=AUTH), 400, "invalid_request")
    assert_error(await api.post("/api/workers", headers=AUTH), 400, "invalid_request")
    bad = assert_error(await api.post("/api/workers", json=body(pid=-1, extra=1), headers=AUTH), 400)
    assert {d["field"] for d in bad["detail"]} == {"pid", "extra"}
    assert_error(await api.post("/api/workers", json=body(name=" padded"), headers=AUTH), 400)
    assert_error(await api.post("/api/workers/ghost/heartbeat", json={}, headers=AUTH), 404, "not_found")
    assert_error(await api.post("/api/workers/api-1/heartbeat", json={"cpu_percent": -1}, headers=AUTH), 400)
    assert_error(await api.get("/api/workers/ghost"), 404, "not_found")
    assert_error(await api.get("/api/workers/ghost/heartbeats"), 404, "not_found")
    assert_error(await api.request("DELETE", "/api/workers/ghost", headers=AUTH), 404, "not_found")
    assert_error(await api.get("/api/workers", params={"status": "sleeping"}), 400, "invalid_request")
    assert_error(await api.get("/api/workers", params={"limit": "many"}), 400)
    assert_error(await api.get("/api/workers", params={"limit": 0}), 400)
    assert_error(await api.get("/no/such/route"), 404, "not_found")
    assert_error(await api.put("/api/workers", headers=AUTH), 405)
    assert (await api.request("DELETE", "/api/workers/api-1", headers=AUTH)).status_code == 200
    assert_error(await api.request("DELETE", "/api/workers/api-1", headers=AUTH), 409, "invalid_transition")
    assert_error(await api.post("/api/workers/api-1/heartbeat", json={}, headers=AUTH), 409, "heartbeat_failed")
    assert_error(await api.post("/api/workers", content=b"x" * (2 << 20), headers=AUTH), 413)
    assert_error(await api.post("/api/workers", content=b" " * (65 << 10), headers=AUTH), 413)
    assert_error(await api.get("/api/workers", params={"limit": 10_001}), 400)
    assert_error(await api.get("/api/workers/api-1/heartbeats", params={"limit": 10**9}), 400)


async def test_registration_is_validated_as_the_config_and_cli_are(api: httpx.AsyncClient) -> None:
    """A worker registered through the API obeys the naming rules of the config and the CLI:
    400 naming the field, and nothing stored."""
    cases = {
        "namespaces": ["BAD NS!"],
        "deployment_mode": "Nope",
        "capabilities": ["x" * 201],
    }
    for field, value in cases.items():
        bad = assert_error(await api.post("/api/workers", json=body(**{field: value}), headers=AUTH), 400)
        assert [d["field"].split(".")[0] for d in bad["detail"]] == [field], bad  # namespaces.0: the item
    bad = assert_error(await api.post("/api/workers", json=body(namespaces=["ok", "a" * 31]), headers=AUTH), 400)
    assert "30" in bad["detail"][0]["message"]
    assert (await api.get("/api/workers")).json()["count"] == 0
    ok = await api.post("/api/workers", json=body(deployment_mode="PollingOnly", namespaces=["ok_2"]), headers=AUTH)
    assert ok.status_code == 201 and ok.json()["deployment_mode"] == "PollingOnly"


async def test_mutating_routes_need_the_token(api: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        assert_error(await api.post("/api/workers", json=body(), headers=headers), 401, "unauthorized")
        assert_error(await api.post("/api/workers/api-1/heartbeat", json={}, headers=headers), 401)
        assert_error(await api.request("DELETE", "/api/workers/api-1", headers=headers), 401)
    assert (await api.get("/api/workers")).json()["count"] == 0  # nothing was registered
    assert (await api.get("/api/workers")).status_code == 200  # reads need no token


async def test_without_a_token_mutations_are_open(open_api: httpx.AsyncClient) -> None:
    assert (await open_api.post("/api/workers", json=body())).status_code == 201


async def test_healthy_and_stats(db_url: str) -> None:
    clock = ManualClock()
    async for api, ctx in make_client(db_url, None, clock=clock):
        for i in range(3):
            assert (await api.post("/api/workers", json=body(f"s{i}"))).status_code == 201
        await api.post("/api/workers/s0/heartbeat", json={"active_steps": 2})
        await api.post("/api/workers/s1/heartbeat", json={})
        from tasker_worker.domain.workers import WorkerStatus

        await ctx.lifecycle.transition("s0", WorkerStatus.ACTIVE)
        await ctx.lifecycle.transition("s1", WorkerStatus.ACTIVE)
        clock.advance(ctx.config.registry.stale_timeout.total_seconds() + 1)
        await api.post("/api/workers/s1/heartbeat", json={})  # only s1 is fresh now
        healthy = (await api.get("/api/workers/healthy")).json()
        assert [w["worker_id"] for w in healthy["workers"]] == ["s1"]
        stats = (await api.get("/api/workers/stats")).json()
        assert stats["by_status"] == {"pending": 1, "active": 2, "offline": 0, "deregistered": 0}
        assert stats["live_cpu_cores"] == 12 and stats["total"] == 3
        # Seed 004's spelling of the states is understood beside ours.
        seed = (await api.get("/api/workers", params={"status": "HEALTHY"})).json()
        assert sorted(w["worker_id"] for w in seed["workers"]) == ["s0", "s1"]
        assert (await api.get("/api/workers", params={"status": "STARTING"})).json()["count"] == 1
        assert_error(await api.get("/api/workers", params={"status": "SLEEPY"}), 400, "invalid_request")
        await api.post("/api/workers/s2/heartbeat", json={"cpu_percent": 150.0, "memory_used": 2**32})
        stats = (await api.get("/api/workers/stats")).json()
        assert stats["live_cpu_percent"] == 150.0 and stats["cpu_utilization"] == round(150 / (100 * 12), 4)
        assert stats["live_memory_used"] == 2**32 and stats["memory_utilization"] == round(2**32 / (3 * 2**33), 4)
        assert "throughput_per_s" in stats


async def test_queues_and_health_routes(open_api: httpx.AsyncClient, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('hq')")
        conn.execute("SELECT pgmq.send('worker_hq_queue', '{}'::jsonb) FROM generate_series(1, 3)")
        conn.execute("SELECT pgmq.send('worker_hq_queue_dlq', '{}'::jsonb)")
    queues = (await open_api.get("/api/queues")).json()["queues"]
    hq = next(q for q in queues if q["queue"] == "worker_hq_queue")
    assert hq["depth"] == 3 and hq["dlq"]["depth"] == 1 and hq["oldest_age_s"] is not None
    assert not any(q["queue"].endswith("_dlq") for q in queues)

    assert (await open_api.get("/health/live")).json() == {"status": "alive"}
    assert (await open_api.get("/health/ready")).json() == {"status": "ready"}
    detailed = await open_api.get("/health/detailed")
    assert detailed.status_code == 200
    data = detailed.json()
    assert data["status"] == "healthy", data["reasons"]
    names = {c["name"] for c in data["checks"]}
    assert {"database", "mvcc_horizon", "notify_queue", "queue worker_hq_queue"} <= names


async def test_detailed_health_degrades_on_an_old_transaction(db_url: str) -> None:
    async for api, ctx in make_client(db_url, None):
        # The limit from the config would take minutes; judge an open transaction against 0s.
        ctx.config.api.max_xmin_age = timedelta(0)
        with psycopg.connect(db_url) as holder:
            holder.execute("SELECT txid_current()")  # holds a snapshot open (not autocommit)
            data = (await api.get("/health/detailed")).json()
            holder.rollback()
        assert data["status"] == "degraded"
        assert any(r.startswith("mvcc_horizon") for r in data["reasons"])


async def test_health_with_the_database_gone(db_url: str) -> None:
    async for api, ctx in make_client(db_url, None):
        await ctx.pool.close()
        resp = await api.get("/health/ready")
        assert resp.status_code == 503 and resp.json()["status"] == "not_ready"
        resp = await api.get("/health/detailed")
        assert resp.status_code == 503 and resp.json()["status"] == "unhealthy"
        assert (await api.get("/health/live")).status_code == 200
        # A route that needs the database says so, in the JSON error shape.
        down = assert_error(await api.get("/api/workers"), 503, "database_unavailable")
        assert "closed" not in down["detail"] and down["error_id"]  # the cause stays in the log
        metrics = {f.name: f for f in text_string_to_metric_families((await api.get("/metrics")).text)}
        assert metrics["tasker_database_up"].samples[0].value == 0.0


async def test_unexpected_errors_are_json_500(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A 500 says nothing of its cause (which may name hosts, tables or data) but an error id;
    the log line carrying the cause carries the same id."""
    async for _api, ctx in make_client(db_url, None):

        async def explode(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug near password=hunter2")

        ctx.views.list = explode  # type: ignore[method-assign]
        transport = httpx.ASGITransport(app=create_app(ctx), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            data = assert_error(await client.get("/api/workers"), 500, "internal_error")
        assert "hunter2" not in str(data) and "RuntimeError" not in str(data)
        [logged] = [r for r in caplog.records if getattr(r, "error_id", None) == data["error_id"]]
        assert "hunter2" in logged.getMessage() and logged.exc_info is not None


def test_an_api_reachable_from_other_machines_needs_a_token() -> None:
    """Bound to anything but loopback without [api] token, the API refuses to start, naming the key."""
    from tasker_worker.api.server import bind
    from tasker_worker.errors import ConfigError

    for host in ("0.0.0.0", "::", "my-host.example"):
        with pytest.raises(ConfigError, match=r"\[api\] token"):
            bind(make_config(overrides={"api.host": host, "api.port": 0}).api)
    for host, token in (("127.0.0.1", None), ("0.0.0.0", TOKEN)):
        sock = bind(make_config(overrides={"api.host": host, "api.port": 0, "api.token": token}).api)
        sock.close()


async def test_metrics_parse_with_prometheus_client(open_api: httpx.AsyncClient, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('mq')")
        conn.execute("SELECT pgmq.send('worker_mq_queue', '{}'::jsonb) FROM generate_series(1, 4)")
    await open_api.post("/api/workers", json=body("m1"))
    resp = await open_api.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    assert families["tasker_database_up"].samples[0].value == 1.0
    depth = {s.labels["queue"]: s.value for s in families["tasker_queue_depth"].samples}
    assert depth["worker_mq_queue"] == 4.0
    workers = {s.labels["status"]: s.value for s in families["tasker_workers"].samples}
    assert workers["pending"] == 1.0 and workers["active"] == 0.0
    assert families["tasker_database_notification_queue_usage"].type == "gauge"
    assert "tasker_dlq_depth" in families and "tasker_queue_oldest_message_age_seconds" in families


async def test_openapi_document_lists_every_route(open_api: httpx.AsyncClient) -> None:
    doc = (await open_api.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    for path, method in [
        ("/api/workers", "post"),
        ("/api/workers", "get"),
        ("/api/workers/{worker_id}", "delete"),
        ("/api/workers/{worker_id}/heartbeat", "post"),
        ("/api/workers/{worker_id}/heartbeats", "get"),
        ("/api/workers/healthy", "get"),
        ("/api/workers/stats", "get"),
        ("/api/queues", "get"),
        ("/health/live", "get"),
        ("/health/ready", "get"),
        ("/health/detailed", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths[path], (path, method)
    assert set(paths["/api/workers"]["post"]["responses"]) >= {"201", "400", "401", "409", "500"}
    schemas = doc["components"]["schemas"]
    assert "WorkerRegistration" in schemas and "WorkerStatus" in schemas
    assert "$defs" not in schemas["WorkerView"]


async def test_steps_over_http_with_the_sql_validation_and_idempotency(api: httpx.AsyncClient, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('web')")
    chosen = str(uuid.uuid4())
    submission = {"handler": "noop", "inputs": {"a": 1}, "step_uuid": chosen, "notify": True}
    assert_error(await api.post("/api/namespaces/web/steps", json=submission), 401, "unauthorized")
    first = await api.post("/api/namespaces/web/steps", json=submission, headers=AUTH)
    assert first.status_code == 201 and first.json()["step_uuid"] == chosen, first.text
    again = await api.post("/api/namespaces/web/steps", json=submission, headers=AUTH)
    assert again.status_code == 200 and again.json()["msg_id"] == first.json()["msg_id"]
    pending = (await api.get(f"/api/steps/{chosen}")).json()
    assert pending["status"] == "pending" and pending["msg_id"] == first.json()["msg_id"]
    for bad, error in (
        ({"handler": "bad handler"}, "invalid_request"),
        ({"handler": "noop", "attempt_limit": 0}, "invalid_request"),
        ({"handler": "noop", "headers": {"tasker_claim": 1}}, "invalid_request"),
        ({"handler": "noop", "surprise": 1}, "invalid_request"),
    ):
        assert_error(await api.post("/api/namespaces/web/steps", json=bad, headers=AUTH), 400, error)
    assert_error(await api.post("/api/namespaces/BAD NS/steps", json={"handler": "noop"}, headers=AUTH), 400)
    assert_error(await api.post("/api/namespaces/nosuch/steps", json={"handler": "noop"}, headers=AUTH), 404)
    assert_error(await api.get("/api/steps/not-a-uuid"), 400, "invalid_request")
    assert_error(await api.get(f"/api/steps/{uuid.uuid4()}"), 404, "not_found")

    async with running_worker(db_url, make_config(namespaces=["web"])):
        await wait_until(outcomes_at_least(db_url, 1), timeout=30)
    done = (await api.get(f"/api/steps/{chosen}")).json()
    assert done["status"] == "succeeded" and done["handler"] == "noop"
    listed = (await api.get("/api/steps", params={"namespace": "web", "status": "succeeded"})).json()
    assert [s["step_uuid"] for s in listed["steps"]] == [chosen]
    assert_error(await api.get("/api/steps", params={"status": "sleeping"}), 400, "invalid_request")
    assert_error(await api.get("/api/steps", params={"limit": "5000"}), 400)
