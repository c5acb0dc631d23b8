"""The dashboard over HTTP on a real PostgreSQL (no browser: tests/test_dashboard_browser.py
drives chromium through the same pages): every page renders what the database holds, values
are escaped, actions need the operator token and change nothing without it, reads are bounded."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb
from test_api import make_client

from tasker_worker.api.app import ApiContext, create_app
from tasker_worker.api.dashboard import reads
from tasker_worker.api.dashboard.chart import sparkline
from tasker_worker.db.connection import open_pool
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.domain.workers import WorkerRegistration, WorkerStatus
from tasker_worker.testing import make_config

pytestmark = pytest.mark.anyio

NS = "dash"
QUEUE = f"worker_{NS}_queue"
TOKEN = "operator-s3cret"
HOSTILE_HANDLER = "<script>window.__pwned=1</script>"
HOSTILE_ERROR = '<img src=x onerror="window.__pwned=2"> went wrong'


@pytest.fixture
async def web(url: str) -> AsyncIterator[tuple[httpx.AsyncClient, ApiContext]]:
    async for pair in make_client(url, TOKEN):
        yield pair


def sql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def dead_letter(url: str, *, handler: str = "gate", message: str = "closed", reason: str = "gate_closed") -> str:
    """A dead letter as a worker leaves one (its step's failed outcome row included)."""
    step_uuid = str(uuid.uuid4())
    body = {"step_uuid": step_uuid, "namespace": NS, "handler": handler, "inputs": {}}
    error = {"type": "NonRetryableError", "reason": reason, "message": message}
    headers = {"tasker_dlq": {"status": "dead_lettered", "reason": reason, "attempts": 1, "error": error}}
    sql(url, "SELECT pgmq.send(%s, %s, %s)", (f"{QUEUE}_dlq", Jsonb(body), Jsonb(headers)))
    sql(
        url,
        "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, handler, status, error, attempts,"
        " worker_id, finished_at) VALUES (%s, %s, %s, 1, %s, 'dead_lettered', %s, 1, 'w-1', clock_timestamp())",
        (step_uuid, NS, QUEUE, handler, Jsonb(error)),
    )
    return step_uuid


def dlq_ids(url: str) -> list[int]:
    return [r[0] for r in sql(url, f"SELECT msg_id FROM pgmq.q_{QUEUE}_dlq ORDER BY msg_id")]


async def register(ctx: ApiContext, worker_id: str = "w-dash") -> str:
    registration = WorkerRegistration(
        worker_id=worker_id,
        name="planner",
        hostname="host-a",
        pid=42,
        namespaces=[NS],
        cpu_cores=2,
        memory_total=2**30,
    )
    await ctx.lifecycle.register(registration)
    return worker_id


async def test_every_page_renders_what_the_database_holds(url: str, web: tuple[httpx.AsyncClient, ApiContext]) -> None:
    client, ctx = web
    sql(url, "SELECT tasker.send_step(%s, 'noop', '{}'::jsonb) FROM generate_series(1, 3)", (NS,))
    step_uuid = dead_letter(url, message="the gate is closed")
    worker_id = await register(ctx)

    page = await client.get("/")
    assert page.status_code == 200
    row = _row(page.text, f'data-namespace="{NS}"')
    assert re.search(r'class="num depth">3<', row), row
    assert f'href="/dlq/{NS}">1<' in row  # the DLQ's size, linked to its page
    assert "Fleet health" in page.text

    workers = await client.get("/workers")
    assert worker_id in _row(workers.text, f'data-worker="{worker_id}"')
    assert "Hybrid" in _row(workers.text, f'data-worker="{worker_id}"') or "PollingOnly" in workers.text
    one = await client.get(f"/workers/{worker_id}")
    assert one.status_code == 200 and "WorkerRegistered" in one.text and "Heartbeats" in one.text

    dlq = await client.get(f"/dlq/{NS}")
    assert "gate_closed" in dlq.text and "the gate is closed" in dlq.text

    failures = await client.get("/steps")
    assert step_uuid in failures.text and "gate_closed" in failures.text
    found = await client.get("/steps", params={"step_uuid": step_uuid}, follow_redirects=True)
    assert found.status_code == 200 and "dead_lettered" in found.text and "Requeue…" in found.text

    modes = await client.get("/modes")
    assert f"<option>{NS}</option>" in modes.text and worker_id in modes.text

    for path in ("/", "/workers", "/steps", "/dlq", f"/dlq/{NS}", "/modes"):
        resp = await client.get(path)
        assert resp.status_code == 200, path
        assert "script-src 'self'" in resp.headers["content-security-policy"]
        partial = await client.get(path, headers={"X-Tasker-Partial": "1"})
        assert partial.status_code == 200 and "<html" not in partial.text and "<h1" in partial.text, path


async def test_every_value_is_escaped(url: str, web: tuple[httpx.AsyncClient, ApiContext]) -> None:
    client, ctx = web
    step_uuid = dead_letter(url, handler=HOSTILE_HANDLER, message=HOSTILE_ERROR, reason="<b>bold</b>")
    await register(ctx, worker_id="<i>w<i>")
    pages = [
        await client.get(f"/dlq/{NS}"),
        await client.get("/steps"),
        await client.get(f"/steps/{step_uuid}"),
        await client.get(f"/dlq/{NS}/requeue", params={"msg_id": dlq_ids(url)[0]}),
        await client.get("/workers"),
    ]
    for page in pages:
        assert page.status_code == 200, page.url
        assert "<script>window" not in page.text and "<img src=x" not in page.text and "<b>bold" not in page.text
        assert "<i>w" not in page.text
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in pages[0].text
    assert "&lt;img src=x onerror=&#34;window.__pwned=2&#34;&gt;" in pages[0].text
    assert "&lt;i&gt;w&lt;i&gt;" in pages[4].text


async def test_actions_without_the_operator_token_are_refused_and_change_nothing(
    url: str, web: tuple[httpx.AsyncClient, ApiContext]
) -> None:
    client, ctx = web
    dead_letter(url)
    worker_id = await register(ctx)
    before = dlq_ids(url)
    requeue = {"confirm": "yes", "msg_id": str(before[0])}
    for token in (None, "", "wrong", TOKEN + "x"):
        form = requeue if token is None else {**requeue, "token": token}
        resp = await client.post(f"/dlq/{NS}/requeue", data=form)
        assert resp.status_code == 401, resp.text
        assert "nothing was changed" in resp.text
        resp = await client.post(
            "/modes", data={"namespace": NS, "mode": "PollingOnly", **({} if token is None else {"token": token})}
        )
        assert resp.status_code == 401
        resp = await client.post("/modes", data={"worker_id": worker_id, "mode": "PollingOnly", "token": token or ""})
        assert resp.status_code == 401
    assert dlq_ids(url) == before
    assert sql(url, "SELECT count(*) FROM tasker.events WHERE event_type = 'DeadLetterRequeued'") == [(0,)]
    assert sql(url, "SELECT requested_mode FROM tasker.workers") == [(None,)]
    # The right token without the confirmation does nothing either.
    resp = await client.post(f"/dlq/{NS}/requeue", data={"msg_id": str(before[0]), "token": TOKEN})
    assert resp.status_code == 400 and dlq_ids(url) == before


async def test_actions_are_switched_off_without_a_configured_token(url: str) -> None:
    dead_letter(url)
    before = dlq_ids(url)
    async for client, _ in make_client(url, None):
        page = await client.get(f"/dlq/{NS}/requeue", params={"all": "1"})
        assert "Actions are switched off" in page.text and " disabled>" in page.text
        resp = await client.post(f"/dlq/{NS}/requeue", data={"confirm": "yes", "all": "1", "token": "anything"})
        assert resp.status_code == 403
    assert dlq_ids(url) == before


async def test_a_requeue_from_the_page_is_recorded_as_an_event_of_the_step(
    url: str, web: tuple[httpx.AsyncClient, ApiContext]
) -> None:
    client, _ = web
    first = dead_letter(url)
    second = dead_letter(url)
    [first_id, second_id] = dlq_ids(url)
    resp = await client.post(f"/dlq/{NS}/requeue", data={"confirm": "yes", "msg_id": str(first_id), "token": TOKEN})
    assert resp.status_code == 303 and resp.headers["location"] == f"/dlq/{NS}?requeued=1&remaining=0"
    assert dlq_ids(url) == [second_id]
    [(msg_id, step)] = sql(url, f"SELECT msg_id, message->>'step_uuid' FROM pgmq.q_{QUEUE}")
    assert step == first
    # The failed outcome is gone (the next run records its own); the requeue is on record.
    assert sql(url, "SELECT count(*) FROM tasker.step_results WHERE step_uuid = %s", (first,)) == [(0,)]
    [(data, queue, new_id)] = sql(
        url,
        "SELECT data, queue_name, msg_id FROM tasker.events WHERE event_type = 'DeadLetterRequeued' AND step_uuid = %s",
        (first,),
    )
    assert (queue, new_id) == (QUEUE, msg_id)
    assert data["by"] == "dashboard" and data["dlq_msg_id"] == first_id and data["reason"] == "gate_closed"
    page = await client.get(f"/steps/{first}")
    assert "DeadLetterRequeued" in page.text and "queued" in page.text
    flash = await client.get(resp.headers["location"])
    assert "Requeued 1 dead letter to their queue" in flash.text
    # All: the rest, by the same form.
    resp = await client.post(f"/dlq/{NS}/requeue", data={"confirm": "yes", "all": "1", "token": TOKEN})
    assert resp.status_code == 303 and dlq_ids(url) == []
    assert sql(url, "SELECT count(*) FROM tasker.events WHERE event_type = 'DeadLetterRequeued'") == [(2,)]
    assert second in {r[0] for r in sql(url, f"SELECT message->>'step_uuid' FROM pgmq.q_{QUEUE}")}


async def test_a_mode_switch_from_the_page_asks_the_workers(
    url: str, web: tuple[httpx.AsyncClient, ApiContext]
) -> None:
    client, ctx = web
    worker_id = await register(ctx)
    await ctx.lifecycle.transition(worker_id, WorkerStatus.ACTIVE, reason="test")
    resp = await client.post("/modes", data={"namespace": NS, "mode": "PollingOnly", "token": TOKEN})
    assert resp.status_code == 303 and resp.headers["location"] == "/modes?asked=1&mode=PollingOnly"
    assert sql(url, "SELECT requested_mode FROM tasker.workers") == [("PollingOnly",)]
    resp = await client.post("/modes", data={"worker_id": worker_id, "mode": "EventDrivenOnly", "token": TOKEN})
    assert resp.status_code == 303 and resp.headers["location"].startswith(f"/workers/{worker_id}?asked=1")
    assert sql(url, "SELECT requested_mode FROM tasker.workers") == [("EventDrivenOnly",)]
    bad = await client.post("/modes", data={"worker_id": worker_id, "mode": "Sometimes", "token": TOKEN})
    assert bad.status_code == 400
    gone = await client.post("/modes", data={"worker_id": "nobody", "mode": "Hybrid", "token": TOKEN})
    assert gone.status_code == 404


async def test_unknown_things_get_a_page_saying_so(web: tuple[httpx.AsyncClient, ApiContext]) -> None:
    client, _ = web
    assert (await client.get("/workers/nobody")).status_code == 404
    assert (await client.get("/steps/not-a-uuid")).status_code == 400
    assert (await client.get("/steps", params={"step_uuid": "nope"})).status_code == 400
    missing = await client.get(f"/steps/{uuid.uuid4()}")
    assert missing.status_code == 404 and "no message is known" in missing.text
    assert (await client.get("/dlq/nosuchns")).status_code == 404
    assert (await client.get("/dlq/Bad-Name")).status_code == 400
    assert (await client.get(f"/dlq/{NS}/requeue")).status_code == 400
    assert (await client.get("/static/dashboard.css")).status_code == 200
    # The pages are for people: the JSON API's OpenAPI document leaves them out.
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/api/workers" in paths and not {"/", "/workers", "/dlq/{namespace}/requeue", "/modes"} & set(paths)


async def test_the_glance_counts_up_to_its_cap_and_a_requeue_of_all_moves_a_bounded_slice(url: str) -> None:
    sql(url, "SELECT tasker.send_step(%s, 'noop', '{}'::jsonb) FROM generate_series(1, 5)", (NS,))
    for _ in range(3):
        dead_letter(url)
    config = make_config()
    pool = await open_pool(url, config.database, max_size=2)
    try:
        client = QueueClient(pool)
        glance = {q: (depth, visible, capped) for q, depth, visible, capped, _ in await client.queue_glance(3)}
        assert glance[QUEUE] == (3, 3, True)
        assert glance[f"{QUEUE}_dlq"] == (3, 3, False)
        oldest = dlq_ids(url)[:2]
        moved = await client.requeue_dead_letters(QUEUE, actor="test", limit=2)
        assert [old for old, _ in moved] == oldest
    finally:
        await pool.close()
    assert len(dlq_ids(url)) == 1
    # Bounded: on a queue of 200, a glance capped at 3 reads a handful of rows, not the table.
    sql(url, "SELECT tasker.send_step(%s, 'noop', '{}'::jsonb) FROM generate_series(1, 195)", (NS,))
    with psycopg.connect(url) as conn:  # one transaction: pg_stat_xact_* counts what it read
        conn.execute("SELECT * FROM tasker.queue_glance(3)").fetchall()
        [(seq, idx)] = conn.execute(
            "SELECT coalesce(seq_tup_read, 0), coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables"
            " WHERE schemaname = 'pgmq' AND relname = %s",
            (f"q_{QUEUE}",),
        ).fetchall()
    assert seq + idx <= 3 * (3 + 1) + 1, (seq, idx)


async def test_one_overview_serves_every_request_within_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    gathered: list[int] = []

    async def fake_gather(ctx: Any) -> Any:
        gathered.append(1)
        return len(gathered)

    monkeypatch.setattr(reads, "gather_overview", fake_gather)
    cache = reads.OverviewCache(ttl_s=60)
    assert [await cache.get(None) for _ in range(5)] == [1] * 5  # type: ignore[arg-type]
    cache.ttl_s = 0
    assert await cache.get(None) == 2  # type: ignore[arg-type]


def test_a_sparkline_scales_to_its_peak() -> None:
    line = sparkline([0, 5, 10], width=100, height=22)
    assert line.points == "0.0,21.0 50.0,11.0 100.0,1.0" and line.peak == 10 and line.last == 10
    assert sparkline([0, 0], floor=1.0).points.endswith(",31.0") and not sparkline([0, 0], floor=1.0).empty
    assert sparkline([]).empty and sparkline([3]).points.count(",") == 2
    assert sparkline([-4, 2]).points.startswith("0.0,31.0")  # negative values are drawn as zero


def _row(html: str, marker: str) -> str:
    start = html.index(marker)
    return html[start : html.index("</tr>", start)]


def test_the_chart_counts_the_current_bucket_over_the_seconds_it_has_run() -> None:
    bucket = reads.BUCKET_S
    now = datetime.fromtimestamp(bucket * 1000 + 10, UTC)  # 10 s into bucket 1000
    rows = [("a", 1000, 20, 5), ("a", 999, 30, 0), ("a", 1000 - reads.BUCKETS, 99, 99), ("b", 998, 3, 3)]
    series = reads.series_of(rows, now)
    a = series["a"]
    assert len(a.outcomes) == reads.BUCKETS and sum(a.outcomes) == 50  # the bucket before the window is left out
    assert a.per_s()[-1] == 2.0 and a.per_s()[-2] == 30 / bucket
    assert a.last_minute() == (50 / (bucket + 10), 5 / 50)
    assert series["b"].error_shares()[-3] == 1.0 and series["b"].last_minute() == (0.0, None)


def test_a_dead_letter_of_any_shape_is_listed() -> None:
    at = datetime.now(UTC)
    odd = reads.DeadLetter.from_peek((1, at, 0, "not an object", None))
    assert (odd.msg_id, odd.handler, odd.reason, odd.error_message) == (1, None, None, None)
    junk = reads.DeadLetter.from_peek((2, at, 1, {"handler": 5, "step_uuid": None}, {"tasker_dlq": "junk"}))
    assert (junk.handler, junk.step_uuid, junk.attempts) == ("5", None, None)
    full = reads.DeadLetter.from_peek(
        (3, at, 2, {"handler": "h"}, {"tasker_dlq": {"reason": "r", "attempts": 3, "error": {"message": "m" * 5000}}})
    )
    assert (full.reason, full.attempts, len(full.error_message or "")) == ("r", 3, 2000)


async def test_the_dashboard_can_be_left_out(url: str) -> None:
    config = make_config(overrides={"api.dashboard": False})
    pool = await open_pool(url, config.database, max_size=2)
    try:
        app = create_app(ApiContext(pool, config))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.get("/")).status_code == 404
            assert (await client.get("/static/dashboard.js")).status_code == 404
            assert (await client.get("/health/live")).status_code == 200
    finally:
        await pool.close()


async def test_with_the_database_gone_a_page_says_so_and_keeps_trying(url: str) -> None:
    async for client, ctx in make_client(url, TOKEN):
        await ctx.pool.close()
        for path in ("/", "/workers", f"/dlq/{NS}", "/modes"):
            resp = await client.get(path)
            assert resp.status_code == 503, path
            assert "The database is unavailable" in resp.text and 'data-refresh="5"' in resp.text
            assert "closed" not in resp.text  # the cause stays in the log
