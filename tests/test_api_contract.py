"""The HTTP API proven by its ecosystem's own tool: schemathesis fuzzes a live ``tasker-worker
api`` (a real database, a token) from the server's own ``/openapi.json`` with every check, and
finds nothing. Then the cases it found before the document was made from the models the server
parses with, one by one, in process: each is now documented or refused as documented."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from entrypoints import clean_env, running_api

from tasker_worker.api.app import ApiContext, api_operations, create_app
from tasker_worker.api.openapi import build
from tasker_worker.db.connection import open_pool
from tasker_worker.testing import make_config

CONFIG = Path(__file__).resolve().parent / "contract" / "schemathesis.toml"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
TOKEN = "contract-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Fixed, so that a run is the same cases every time (and a failure can be replayed with it).
SEED = 1
#: Examples per operation in the fuzzing phase (as the issue tried it); the coverage and stateful
#: phases add their own.
EXAMPLES = 30


def test_schemathesis_finds_no_failure_in_the_live_api(db_url: str, tmp_path: Path) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('a')")  # so that some sends reach a queue
    env = clean_env(tmp_path, TASKER_DATABASE_URL=db_url, TASKER__API__TOKEN=TOKEN)
    with running_api(env) as (_, base):
        done = subprocess.run(
            [
                str(SCHEMATHESIS),
                "--config-file",
                str(CONFIG),
                "run",
                f"{base}/openapi.json",
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--checks",
                "all",
                "--max-examples",
                str(EXAMPLES),
                "--seed",
                str(SEED),
                # No example database: a run must not depend on what an earlier one stored.
                "--generation-database",
                "none",
                "--no-color",
                "--workers",
                "1",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
    summary = done.stdout[-6000:]
    assert done.returncode == 0, summary + done.stderr[-2000:]
    tested = re.search(r"Tested:\s+(\d+)", done.stdout)
    cases = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert tested is not None and int(tested.group(1)) == len(api_operations()), summary
    assert cases is not None and cases.group(1) == cases.group(2) and int(cases.group(1)) >= 300, summary


# --- what schemathesis 4.32.5 found (20 failures in 347 cases), each fixed ------------------------


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    config = make_config(overrides={"api.token": TOKEN})
    pool = await open_pool(db_url, config.database, max_size=4)
    transport = httpx.ASGITransport(app=create_app(ApiContext(pool, config)))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
    finally:
        await pool.close()


def registration(**extra: Any) -> dict[str, Any]:
    return {"worker_id": "w-1", "name": "n", "hostname": "h", "pid": 1, **extra}


def _documented(method: str, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = build(api_operations())["paths"][path][method]
    return operation


def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = build(api_operations())["components"]["schemas"][name]
    return schema


@pytest.mark.anyio
async def test_numbers_past_the_columns_are_refused_not_a_server_error(api: httpx.AsyncClient) -> None:
    """The 500: ``processed`` = 17856193076045713408 overflowed the bigint column (and a pid the
    integer one). The document now carries the columns' bounds, and the server refuses them."""
    assert (await api.post("/api/workers", json=registration(), headers=AUTH)).status_code == 201
    beat = await api.post("/api/workers/w-1/heartbeat", json={"processed": 17856193076045713408}, headers=AUTH)
    assert beat.status_code == 400 and beat.json()["detail"][0]["field"] == "processed"
    assert _schema("Heartbeat")["properties"]["processed"]["maximum"] == 2**63 - 1
    big_pid = await api.post("/api/workers", json=registration(worker_id="w-2", pid=16679323313524572), headers=AUTH)
    assert big_pid.status_code == 400 and _schema("WorkerRegistration")["properties"]["pid"]["maximum"] == 2**31 - 1
    # JSON's one number type: 86.0 is the integer 86, as JSON Schema says.
    ok = await api.post("/api/workers/w-1/heartbeat", json={"processed": 86.0, "active_steps": 2.0}, headers=AUTH)
    assert ok.status_code == 200
    for wrong in ({"processed": 1.5}, {"processed": "86"}, {"busy": 1}, {"cpu_percent": "NaN"}):
        assert (await api.post("/api/workers/w-1/heartbeat", json=wrong, headers=AUTH)).status_code == 400, wrong
    nan = await api.post("/api/workers/w-1/heartbeat", content=b'{"cpu_percent": NaN}', headers=AUTH)
    assert nan.status_code == 400 and nan.json()["error"] == "invalid_json"


@pytest.mark.anyio
async def test_what_the_server_refuses_the_document_forbids(api: httpx.AsyncClient, db_url: str) -> None:
    """The three schema-valid requests rejected with 400: each value the server refuses now breaks
    a pattern the document publishes, and a value the pattern admits is accepted."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('orders')")

    def admits(pattern: str, value: str) -> bool:
        return re.search(pattern, value) is not None

    # GET /api/steps/0
    [step_uuid] = _documented("get", "/api/steps/{step_uuid}")["parameters"]
    assert not admits(step_uuid["schema"]["pattern"], "0")
    assert (await api.get("/api/steps/0")).status_code == 400
    assert (await api.get("/api/steps/00000000-0000-0000-0000-000000000000")).status_code == 404
    # A handler named 0, a namespace named 0.
    handler = _schema("StepSubmission")["properties"]["handler"]["pattern"]
    assert not admits(handler, "0") and admits(handler, "charge.v2:eu-1")
    sent = await api.post("/api/namespaces/orders/steps", json={"handler": "0"}, headers=AUTH)
    assert sent.status_code == 400
    [namespace] = _documented("post", "/api/namespaces/{namespace}/steps")["parameters"]
    assert not admits(namespace["schema"]["pattern"], "0")
    assert (await api.post("/api/namespaces/0/steps", json={"handler": "a"}, headers=AUTH)).status_code == 400
    # Non-printable worker fields.
    fields = _schema("WorkerRegistration")["properties"]
    for value in ("\x93BKn", "tab\there", " padded", "bidi\u202eoverride", "nul\x00"):
        assert not admits(fields["name"]["pattern"], value), value
        answer = await api.post("/api/workers", json=registration(worker_id="w-3", name=value), headers=AUTH)
        assert answer.status_code == 400, value
    for value in ("名前-😀", "my worker", "é"):
        assert admits(fields["name"]["pattern"], value)
    assert (await api.post("/api/workers", json=registration(name="名前-😀"), headers=AUTH)).status_code == 201
    # A string PostgreSQL cannot store, deep inside a free-form object: documented, refused.
    assert _schema("JsonValue")["anyOf"][0]["pattern"] == "^[^\\x00]*$"
    nul = await api.post("/api/namespaces/orders/steps", json={"handler": "a", "inputs": {"x": ["\x00"]}}, headers=AUTH)
    assert nul.status_code == 400 and "NUL" in json.dumps(nul.json())
    lone = await api.post(
        "/api/namespaces/orders/steps", content=b'{"handler": "a", "inputs": {"x": "\\ud800"}}', headers=AUTH
    )
    assert lone.status_code == 400 and lone.json()["error"] == "invalid_json"
    # Query parameters: only what the document's types admit.
    assert (await api.get("/api/workers", params={"include_deregistered": "yes"})).status_code == 400
    assert (await api.get("/api/workers", params={"limit": "1.5"})).status_code == 400
    assert (await api.get("/api/steps", params={"namespace": ""})).status_code == 400


@pytest.mark.anyio
async def test_a_body_that_is_no_object_is_a_documented_400(api: httpx.AsyncClient) -> None:
    """The undocumented 400 on ``DELETE /api/workers/{id}`` with a non-object body."""
    assert (await api.post("/api/workers", json=registration(), headers=AUTH)).status_code == 201
    answer = await api.request("DELETE", "/api/workers/w-1", content=b"[null, null]", headers=AUTH)
    assert answer.status_code == 400
    for path, operations in build(api_operations())["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation or "parameters" in operation:
                assert "400" in operation["responses"], (method, path)


@pytest.mark.anyio
async def test_every_405_says_which_methods_the_path_allows(api: httpx.AsyncClient) -> None:
    """The fifteen 405s without ``Allow`` (now twenty paths, with flow control and step cancels): every
    documented path answers an undocumented method with 405 and ``Allow`` listing its methods
    (RFC 9110, 15.5.6), all of them."""
    paths = build(api_operations())["paths"]
    assert len(paths) == 20
    for path, operations in paths.items():
        concrete = path.replace("{worker_id}", "w-1").replace("{step_uuid}", "0" * 8 + "-0000-0000-0000-" + "0" * 12)
        concrete = concrete.replace("{namespace}", "orders")
        for method in ("TRACE", "PUT", "PATCH"):
            answer = await api.request(method, concrete, headers=AUTH)
            assert answer.status_code == 405, (method, path)
            allowed = {m.strip() for m in answer.headers["allow"].split(",")}
            documented = {m.upper() for m in operations}
            assert allowed - {"HEAD"} == documented, (path, allowed)


@pytest.mark.anyio
async def test_a_deregistered_worker_is_no_longer_there_to_read(api: httpx.AsyncClient) -> None:
    """Found once the rest was fixed (the use-after-free check): after ``DELETE`` the worker
    answers 404 (its final record stays listed with ``?include_deregistered=true``)."""
    assert (await api.post("/api/workers", json=registration(), headers=AUTH)).status_code == 201
    assert (await api.request("DELETE", "/api/workers/w-1", headers=AUTH)).status_code == 200
    gone = await api.get("/api/workers/w-1")
    assert gone.status_code == 404 and "include_deregistered" in gone.json()["detail"]
    assert (await api.get("/api/workers/w-1/heartbeats")).status_code == 404
    listed = (await api.get("/api/workers", params={"include_deregistered": "true"})).json()
    assert [w["status"] for w in listed["workers"]] == ["deregistered"]


@pytest.mark.anyio
async def test_a_generated_worker_id_is_one_the_api_can_address(api: httpx.AsyncClient) -> None:
    """Found once the rest was fixed (stateful: created, then 404): a registration without an id
    got ``name-hostname-pid-random``, which held the hostname's ``/`` (and could pass 200
    characters), so no route reached it. The generated id now obeys the id's rule."""
    for name, hostname in (("n", "|N/ä"), ("x" * 200, "h" * 255)):
        created = await api.post("/api/workers", json={"name": name, "hostname": hostname, "pid": 7}, headers=AUTH)
        assert created.status_code == 201, created.text
        worker_id = created.json()["worker_id"]
        assert "/" not in worker_id and len(worker_id) <= 200
        assert (await api.get(f"/api/workers/{worker_id}")).status_code == 200
        beat = await api.post(f"/api/workers/{worker_id}/heartbeat", json={}, headers=AUTH)
        assert beat.status_code == 200


def test_the_api_answers_without_waiting_for_the_clients_delayed_ack() -> None:
    """Found by the fuzzing run's length (45 s for 771 requests): without TCP_NODELAY on the
    API's connections, every response waited 40 ms for the client's delayed ACK between its
    headers and its body. asyncio sets it on sockets whose proto is TCP: ``bind`` says so."""
    import asyncio
    import socket

    from tasker_worker.api.server import bind
    from tasker_worker.config.models import ApiConfig

    async def nodelay_of_a_connection() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=bind(ApiConfig(port=0)))
        async with server:
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                return await asyncio.wait_for(accepted, timeout=10)
            finally:
                writer.close()

    assert asyncio.run(nodelay_of_a_connection()) != 0
