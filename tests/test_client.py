"""The producer's API (AsyncClient, Client) against a real PostgreSQL and real workers:
identity, idempotent enqueue, the caller's transaction, batches, results, wait_for woken by the
outcome's notification, and cancellation."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from functools import partial
from typing import Any

import anyio
import psycopg
import pytest

from tasker_worker import AsyncClient, Client
from tasker_worker.domain.results import StepResult
from tasker_worker.domain.steps import OutcomeStatus
from tasker_worker.errors import QueueNotFound, StepValidationError, StepWaitTimeout, UsageError
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.producer import operations
from tasker_worker.producer.operations import _batch_params, _uuid4_batch
from tasker_worker.testing import fetch_value, make_config, outcomes_at_least, running_worker, wait_until

NS = "orders"
QUEUE = f"pgmq.q_worker_{NS}_queue"


def registry(gate: asyncio.Event | None = None) -> HandlerRegistry:
    reg = HandlerRegistry()

    @reg.handler("double")
    async def double(ctx: Any, step: Any) -> int:
        if gate is not None and step.inputs.get("gated"):
            await gate.wait()
        return int(step.inputs["n"]) * 2

    @reg.handler("explodes")
    async def explodes(ctx: Any, step: Any) -> None:
        if gate is not None and step.inputs.get("gated"):
            await gate.wait()
        raise KeyError("boom")

    return reg


@pytest.mark.anyio
async def test_send_step_is_idempotent_on_its_step_uuid(url: str) -> None:
    chosen = uuid.uuid4()
    async with AsyncClient(url) as client:
        first = await client.send_step(NS, "double", {"n": 1}, step_uuid=chosen)
        again = await client.send_step(NS, "double", {"n": 99}, step_uuid=chosen)  # still queued
        assert (first.step_uuid, first.created) == (chosen, True)
        assert (again.step_uuid, again.msg_id, again.created) == (chosen, first.msg_id, False)
        # Two producers racing with one step_uuid: one message.
        racing = uuid.uuid4()
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(partial(client.send_step, NS, "double", {"n": 2}, step_uuid=racing))
        async with running_worker(url, make_config(namespaces=[NS]), registry=registry()):
            await wait_until(outcomes_at_least(url, 2), timeout=30)
        done = await client.send_step(NS, "double", {"n": 3}, step_uuid=chosen)  # done now
        assert (done.msg_id, done.created) == (first.msg_id, False)
        result = await client.get_result(chosen)
    assert result is not None and result.status is OutcomeStatus.SUCCEEDED and result.result == 2
    assert await fetch_value(url, f"SELECT count(*) FROM {QUEUE}") == 0
    assert await fetch_value(url, "SELECT count(*) FROM tasker.step_results") == 2  # chosen, racing


@pytest.mark.anyio
async def test_a_step_sent_in_the_callers_transaction_exists_iff_it_commits(url: str) -> None:
    async with AsyncClient(url) as client:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            async with conn.transaction(force_rollback=True):
                gone = await client.send_step(NS, "double", {"n": 1}, conn=conn)
                batch = await client.send_steps(NS, "double", [{"n": 2}], conn=conn)
            async with conn.transaction():
                kept = await client.send_step(NS, "double", {"n": 3}, conn=conn)
        bodies = await fetch_value(url, f"SELECT array_agg(message->>'step_uuid') FROM {QUEUE}")
    assert bodies == [str(kept.step_uuid)]
    assert str(gone.step_uuid) not in bodies and str(batch[0].step_uuid) not in bodies


@pytest.mark.anyio
async def test_send_steps_is_one_statement_and_every_step_runs(url: str) -> None:
    async with AsyncClient(url) as client:
        refs = await client.send_steps(NS, "double", [{"n": i} for i in range(50)], attempt_limit=2)
        assert len({r.step_uuid for r in refs}) == 50 and len({r.msg_id for r in refs}) == 50
        async with running_worker(url, make_config(namespaces=[NS]), registry=registry()):
            await wait_until(outcomes_at_least(url, 50), timeout=30)
        results = {r.step_uuid: r.result for r in await client.list_results(namespace=NS, limit=100)}
        with pytest.raises(StepValidationError):
            await client.send_steps(NS, "double", [{"n": 1}], attempt_limit=0)
        with pytest.raises(QueueNotFound):
            await client.send_steps("nosuch", "double", [{}])
    assert results == {r.step_uuid: 2 * i for i, r in enumerate(refs)}


@pytest.mark.anyio
async def test_wait_for_is_woken_by_the_outcome_notification(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps finish only after wait_for has looked once and found nothing; its poll is ten
    minutes away, so only the outcome's notification can end these waits in time."""
    gate = asyncio.Event()
    async with AsyncClient(url) as client:
        looks: list[Any] = []
        real_get_result = operations.get_result

        def counted(step_uuid: Any, **options: Any) -> Any:  # wait_for's look, counted
            found = yield from real_get_result(step_uuid, **options)
            looks.append(found)
            return found

        monkeypatch.setattr(operations, "get_result", counted)
        async with running_worker(url, make_config(namespaces=[NS]), registry=registry(gate)):
            ok = await client.send_step(NS, "double", {"n": 21, "gated": True})
            bad = await client.send_step(NS, "explodes", {"gated": True}, attempt_limit=1)  # dead-lettered
            results: dict[str, Any] = {}

            async def wait(name: str, step_uuid: uuid.UUID) -> None:
                results[name] = await client.wait_for(step_uuid, timeout=600, poll_interval=600)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait, "ok", ok.step_uuid)
                    tg.start_soon(wait, "bad", bad.step_uuid)
                    await wait_until(lambda: len(looks) >= 2, timeout=20)
                    assert looks == [None, None]
                    gate.set()
        assert results["ok"].result == 42 and results["ok"].succeeded
        assert results["bad"].status is OutcomeStatus.FAILED and results["bad"].error is not None
        assert len(looks) == 4  # one look each before, one after its notification
        with pytest.raises(StepWaitTimeout):
            await client.wait_for(uuid.uuid4(), timeout=0.2, poll_interval=0.05)


@pytest.mark.anyio
async def test_cancel_takes_a_queued_step_and_stops_a_running_one(url: str) -> None:
    gate = asyncio.Event()
    async with AsyncClient(url) as client:
        queued = await client.send_step(NS, "double", {"n": 1}, delay=3600)
        assert await client.cancel(NS, queued.step_uuid) == "cancelled"
        assert await client.cancel(NS, queued.step_uuid) == "finished"
        assert await client.cancel(NS, uuid.uuid4()) == "not_found"
        cancelled = await client.get_result(queued.step_uuid)
        assert cancelled is not None and cancelled.status is OutcomeStatus.CANCELLED
        config = make_config(namespaces=[NS], overrides={"worker.cancel_grace": "200ms"})
        async with running_worker(url, config, registry=registry(gate)):
            running = await client.send_step(NS, "double", {"n": 2, "gated": True})
            await wait_until(
                lambda: fetch_value(url, f"SELECT count(*) FROM {QUEUE} WHERE headers ? 'tasker_claim'"), timeout=20
            )
            # Running: asked to stop, and (its handler waiting on a gate that never opens) cancelled
            # after the grace; the outcome names who asked.
            assert await client.cancel(NS, running.step_uuid, by="ops") == "cancelling"
            result = await client.wait_for(running.step_uuid, timeout=30)
    assert result.status is OutcomeStatus.CANCELLED and result.error is not None and result.error["by"] == "ops"


@pytest.mark.anyio
async def test_the_blocking_client_does_the_same(url: str) -> None:
    def produce() -> tuple[Any, Any, Any]:
        with Client(url, max_size=1) as client:  # a waiter needs one connection, not two
            ref = client.send_step(NS, "double", {"n": 5}, step_uuid=uuid.uuid4())
            again = client.send_step(NS, "double", {"n": 5}, step_uuid=ref.step_uuid)
            result = client.wait_for(ref.step_uuid, timeout=30, poll_interval=600)
            return ref, again, result

    async with running_worker(url, make_config(namespaces=[NS]), registry=registry()):
        ref, again, result = await anyio.to_thread.run_sync(produce)
    assert again.created is False and again.msg_id == ref.msg_id
    assert result.result == 10


def test_batch_ids_are_random_version_4_uuids() -> None:
    texts, ints = _uuid4_batch(3000)
    parsed = [uuid.UUID(t) for t in texts]
    assert len(set(parsed)) == 3000
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 and u.int == n for u, n in zip(parsed, ints, strict=True))
    with pytest.raises(StepValidationError, match="not JSON"):
        _batch_params(
            NS, "double", [{"at": object()}], delay=None, attempt_limit=None, timeout=None, headers=None, notify=False
        )


#: The whole public surface of both clients: the same names, and each operation with the same
#: parameters, because both are made from the same operations (producer/operations.py).
CLIENT_SURFACE = {
    "open",
    "close",
    "pool",
    "send_step",
    "send_steps",
    "get_result",
    "list_results",
    "wait_for",
    "find_queued",
    "cancel",
    "get_progress",
}


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_the_blocking_and_the_async_client_have_one_surface() -> None:
    assert _public(AsyncClient) == CLIENT_SURFACE
    assert _public(Client) == CLIENT_SURFACE
    assert {plan.__name__ for plan in operations.OPERATIONS} == CLIENT_SURFACE - {"open", "close", "pool"}
    for plan in operations.OPERATIONS:
        awaited, blocking = getattr(AsyncClient, plan.__name__), getattr(Client, plan.__name__)
        assert inspect.iscoroutinefunction(awaited) and not inspect.iscoroutinefunction(blocking)
        assert inspect.signature(awaited) == inspect.signature(blocking), plan.__name__
        assert list(inspect.signature(blocking).parameters)[1:] == list(inspect.signature(plan).parameters)
        assert awaited.__doc__ == blocking.__doc__ == plan.__doc__ and plan.__doc__
    assert inspect.signature(Client.get_result).return_annotation == StepResult | None


@pytest.mark.anyio
async def test_the_blocking_client_finds_queued_steps_and_sends_in_the_callers_transaction(url: str) -> None:
    def produce() -> tuple[Any, Any, Any, Any]:
        with Client(url) as client:
            delayed = client.send_step(NS, "double", {"n": 1}, delay=3600)
            where = client.find_queued(delayed.step_uuid, namespace=NS)
            nowhere = client.find_queued(uuid.uuid4(), namespace="nosuch")
            with psycopg.connect(url) as conn:
                with conn.transaction(force_rollback=True):
                    gone = client.send_step(NS, "double", {"n": 2}, conn=conn)
            return delayed, where, nowhere, gone

    delayed, where, nowhere, gone = await anyio.to_thread.run_sync(produce)
    assert where is not None and (where["state"], where["msg_id"]) == ("delayed", delayed.msg_id)
    assert nowhere is None
    bodies = await fetch_value(url, f"SELECT array_agg(message->>'step_uuid') FROM {QUEUE}")
    assert bodies == [str(delayed.step_uuid)] and str(gone.step_uuid) not in bodies
    # Each client takes its own kind of connection, and says so when given the other.
    async with AsyncClient(url) as client:
        with psycopg.connect(url) as sync_conn, pytest.raises(UsageError, match=r"psycopg\.AsyncConnection"):
            await client.send_step(NS, "double", {}, conn=sync_conn)  # type: ignore[arg-type]
