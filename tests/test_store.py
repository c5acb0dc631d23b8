"""One conformance suite for the ``StepStore`` port, run against both of its implementations:
``QueueClient`` on a real PostgreSQL and the harness's ``MemoryStore``. Whatever the step runner
relies on (claim order and visibility, the fence on read_ct, one outcome per step, what a
put-back and a dead letter leave behind) must hold on both, so that a handler tested in memory
meets the same store in production."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from tasker_worker.db.connection import open_pool
from tasker_worker.db.queue_client import QueueClient, RetryRequest
from tasker_worker.domain.clock import ManualClock
from tasker_worker.domain.flow import FlowHold, HoldReason
from tasker_worker.domain.names import queue_name
from tasker_worker.domain.steps import ClaimedMessage, Outcome, OutcomeStatus, Source, StepMessage
from tasker_worker.runtime.ports import StepStore
from tasker_worker.testing import make_config
from tasker_worker.testing.memory import MemoryStore

NS = "conform"
QUEUE = queue_name(NS)
VT = 30


class Side:
    """A store and what a test needs to see inside it, alike for both implementations."""

    store: StepStore

    def send(self, body: Any) -> int:
        raise NotImplementedError

    def row(self, msg_id: int, queue: str = QUEUE) -> tuple[int, float, dict[str, Any]] | None:
        """(read_ct, seconds until visible, headers) of a message, None when gone."""
        raise NotImplementedError

    def outcome(self, step_uuid: str) -> tuple[str, Any, int] | None:
        """(status, result, attempts) of the step's outcome row."""
        raise NotImplementedError

    def pause(self) -> None:
        """Pause the namespace (``tasker.pause_queue``)."""
        raise NotImplementedError

    def limit(self, max_running: int | None = None, key_max_running: int | None = None) -> None:
        """Fleet-wide limits (``tasker.set_queue_limits``)."""
        raise NotImplementedError


class PostgresSide(Side):
    def __init__(self, url: str, client: QueueClient) -> None:
        self.url = url
        self.store = client

    def _one(self, query: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(query, params).fetchone()

    def send(self, body: Any) -> int:
        found = self._one("SELECT pgmq.send(%s, %s::jsonb)", (QUEUE, json.dumps(body)))
        assert found is not None
        return int(found[0])

    def row(self, msg_id: int, queue: str = QUEUE) -> tuple[int, float, dict[str, Any]] | None:
        found = self._one(
            f"SELECT read_ct, extract(epoch FROM vt - clock_timestamp()), coalesce(headers, '{{}}'::jsonb) "
            f"FROM pgmq.q_{queue} WHERE msg_id = %s",
            (msg_id,),
        )
        return None if found is None else (int(found[0]), float(found[1]), found[2])

    def dlq_reason(self, source_msg_id: int) -> str | None:
        found = self._one(
            f"SELECT headers -> 'tasker_dlq' ->> 'reason' FROM pgmq.q_{QUEUE}_dlq "
            "WHERE (headers -> 'tasker_dlq' ->> 'source_msg_id')::bigint = %s",
            (source_msg_id,),
        )
        return None if found is None else found[0]

    def outcome(self, step_uuid: str) -> tuple[str, Any, int] | None:
        found = self._one("SELECT status, result, attempts FROM tasker.step_results WHERE step_uuid = %s", (step_uuid,))
        return None if found is None else (found[0], found[1], int(found[2]))

    def pause(self) -> None:
        self._one("SELECT tasker.pause_queue(%s)", (NS,))

    def limit(self, max_running: int | None = None, key_max_running: int | None = None) -> None:
        self._one("SELECT namespace FROM tasker.set_queue_limits(%s, %s, %s)", (NS, max_running, key_max_running))


class MemorySide(Side):
    def __init__(self) -> None:
        self.clock = ManualClock(datetime(2030, 1, 1, tzinfo=UTC))
        self.memory = MemoryStore(self.clock)
        self.store = self.memory

    def send(self, body: Any) -> int:
        return self.memory.send(QUEUE, body)

    def row(self, msg_id: int, queue: str = QUEUE) -> tuple[int, float, dict[str, Any]] | None:
        m = self.memory.messages(queue).get(msg_id)
        if m is None:
            return None
        return m.read_ct, (m.vt - self.clock.now()).total_seconds(), m.headers

    def dlq_reason(self, source_msg_id: int) -> str | None:
        for m in self.memory.messages(QUEUE + "_dlq").values():
            if m.headers["tasker_dlq"]["source_msg_id"] == source_msg_id:
                return str(m.headers["tasker_dlq"]["reason"])
        return None

    def outcome(self, step_uuid: str) -> tuple[str, Any, int] | None:
        o = self.memory.outcomes.get(step_uuid)
        return None if o is None else (o.status, o.result, o.attempts)

    def pause(self) -> None:
        self.memory.pause(NS)

    def limit(self, max_running: int | None = None, key_max_running: int | None = None) -> None:
        self.memory.limit(NS, max_running=max_running, key_max_running=key_max_running)


@pytest.fixture(params=["postgres", "memory"])
def kind(request: pytest.FixtureRequest) -> Any:
    """Which store; for PostgreSQL, a test database with the namespace's queue."""
    return (request.param, request.getfixturevalue("url") if request.param == "postgres" else None)


@pytest.fixture
async def side(kind: Any) -> AsyncIterator[Any]:
    name, url = kind
    if name == "memory":
        yield MemorySide()
        return
    pool = await open_pool(url, make_config().database)
    try:
        yield PostgresSide(url, QueueClient(pool))
    finally:
        await pool.close()


def step(handler: str = "noop", step_uuid: str | None = None) -> dict[str, Any]:
    return StepMessage.build(NS, handler, {"n": 1}, **({"step_uuid": step_uuid} if step_uuid else {}))


async def claim(side: Side, qty: int = 10, **skips: Any) -> list[ClaimedMessage]:
    return await side.store.claim(QUEUE, VT, qty, Source.POLL, worker_id="w1", **skips)


def done(msg: ClaimedMessage, status: OutcomeStatus | None = OutcomeStatus.SUCCEEDED, result: Any = None) -> Outcome:
    msg.step = StepMessage.decode(msg.body)
    return Outcome(msg, status, result, None, 1.0, 2.0)


pytestmark = pytest.mark.anyio


async def test_a_claim_takes_the_oldest_visible_messages_and_hides_them(side: Side) -> None:
    ids = [side.send(step()) for _ in range(3)]
    first = await claim(side, qty=2)
    assert [m.msg_id for m in first] == ids[:2]
    assert all(m.read_ct == 1 and not m.already_done for m in first)
    assert json.loads(first[0].body)["handler"] == "noop"
    row = side.row(ids[0])
    assert row is not None and row[0] == 1 and VT - 2 < row[1] <= VT
    # Claimed messages are invisible: the next claim takes only the third.
    assert [m.msg_id for m in await claim(side)] == [ids[2]]
    assert await claim(side) == []


async def test_a_claim_leaves_skipped_handlers_and_messages_untouched(side: Side) -> None:
    a = side.send(step("charge"))
    b = side.send(step("noop"))
    c = side.send(step("noop"))
    got = await claim(side, skip_handlers=["charge"], skip_msgs=[b])
    assert [m.msg_id for m in got] == [c]
    assert side.row(a) is not None and side.row(a)[0] == 0  # type: ignore[index]
    assert side.row(b) is not None and side.row(b)[0] == 0  # type: ignore[index]


async def test_a_settle_is_fenced_and_records_one_outcome_per_step(side: Side) -> None:
    key = str(uuid.uuid4())
    a = side.send(step(step_uuid=key))
    b = side.send(step(step_uuid=key))
    [ma, mb] = await claim(side)
    stale = ClaimedMessage(
        QUEUE, ma.msg_id, ma.read_ct + 1, ma.enqueued_at, ma.claimed_at, ma.body, None, False, ma.source
    )
    assert await side.store.settle(QUEUE, "w1", [done(stale)]) == set()
    assert side.row(a) is not None  # the fence kept it
    assert await side.store.settle(QUEUE, "w1", [done(ma, result={"x": 1})]) == {a}
    assert side.row(a) is None
    assert side.outcome(key) == ("succeeded", {"x": 1}, 1)
    # A second run of the same step settles its message, but the first outcome stands.
    assert await side.store.settle(QUEUE, "w1", [done(mb, OutcomeStatus.FAILED)]) == {b}
    assert side.outcome(key) == ("succeeded", {"x": 1}, 1)


async def test_a_claim_flags_a_step_whose_outcome_is_recorded(side: Side) -> None:
    key = str(uuid.uuid4())
    side.send(step(step_uuid=key))
    [m] = await claim(side)
    await side.store.settle(QUEUE, "w1", [done(m)])
    again = side.send(step(step_uuid=key))
    [m2] = await claim(side)
    assert (m2.msg_id, m2.already_done) == (again, True)
    # Settling it without a status deletes it and writes nothing.
    assert await side.store.settle(QUEUE, "w1", [done(m2, None)]) == {again}
    assert side.row(again) is None and side.outcome(key) == ("succeeded", None, 1)


async def test_a_put_back_counts_an_attempt_or_gives_it_back(side: Side) -> None:
    a = side.send(step())
    b = side.send(step())
    [ma, mb] = await claim(side)
    retried = await side.store.retry(
        QUEUE, [RetryRequest(ma, 5_000, {"tasker_last_error": {"reason": "boom"}}, count_attempt=True)]
    )
    released = await side.store.retry(QUEUE, [RetryRequest(mb, 0, None, count_attempt=False)], worker_id="w1")
    assert retried == {a: True} and released == {b: True}
    row_a, row_b = side.row(a), side.row(b)
    assert row_a is not None and row_a[0] == 1 and 3 < row_a[1] <= 5
    assert row_a[2]["tasker_last_error"] == {"reason": "boom"}
    assert row_b is not None and row_b[0] == 0 and row_b[1] <= 0
    # The put-back ended that claim: writing about it again is fenced out.
    assert await side.store.retry(QUEUE, [RetryRequest(mb, 0, None, count_attempt=False)]) == {b: False}
    assert [m.msg_id for m in await claim(side)] == [b]


async def test_a_dead_letter_moves_the_message_with_its_reason_and_records_it(side: Side) -> None:
    key = str(uuid.uuid4())
    a = side.send(step(step_uuid=key))
    [m] = await claim(side)
    m.step = StepMessage.decode(m.body)
    outcome = Outcome(m, OutcomeStatus.DEAD_LETTERED, None, {"reason": "poison", "type": "X"}, 1.0, 2.0)
    stale = Outcome(
        ClaimedMessage(QUEUE, a, 7, m.enqueued_at, m.claimed_at, m.body, None, False, m.source),
        OutcomeStatus.DEAD_LETTERED,
        None,
        {"reason": "poison"},
    )
    assert await side.store.dead_letter(QUEUE, "w1", [stale]) == {a: False}
    assert side.row(a) is not None
    assert await side.store.dead_letter(QUEUE, "w1", [outcome]) == {a: True}
    assert side.row(a) is None
    assert side.dlq_reason(a) == "poison"  # type: ignore[attr-defined]
    assert side.outcome(key) == ("dead_lettered", None, 1)


async def test_a_vt_extension_is_fenced(side: Side) -> None:
    a = side.send(step())
    [m] = await claim(side)
    stale = ClaimedMessage(QUEUE, a, m.read_ct + 1, m.enqueued_at, m.claimed_at, m.body, None, False, m.source)
    assert await side.store.extend_vt(QUEUE, [stale], 120_000) == {}
    extended = await side.store.extend_vt(QUEUE, [m], 120_000)
    assert list(extended) == [a]
    row = side.row(a)
    assert row is not None and VT + 60 < row[1] <= 120


async def test_the_attempt_count_is_the_claims_read_ct(side: Side) -> None:
    key = str(uuid.uuid4())
    a = side.send(step(step_uuid=key))
    for _ in range(2):
        [m] = await claim(side)
        await side.store.retry(QUEUE, [RetryRequest(m, 0, None, count_attempt=True)])
    [m] = await claim(side)
    assert m.msg_id == a and m.read_ct == 3
    await side.store.settle(QUEUE, "w1", [done(m, OutcomeStatus.FAILED)])
    assert side.outcome(key) == ("failed", None, 3)


async def test_a_paused_namespace_claims_nothing_and_says_why(side: Side) -> None:
    a = side.send(step())
    side.pause()
    got = await side.store.claim(QUEUE, VT, 10, Source.POLL, worker_id="w1")
    assert list(got) == [] and got.hold == FlowHold(HoldReason.PAUSED)
    assert side.row(a) is not None and side.row(a)[0] == 0  # type: ignore[index]


async def test_max_running_counts_the_claims_held_and_not_lapsed(side: Side) -> None:
    for _ in range(5):
        side.send(step())
    side.limit(max_running=3)
    first = await side.store.claim(QUEUE, VT, 2, Source.POLL, worker_id="w1")
    assert len(first) == 2 and first.hold is None
    second = await side.store.claim(QUEUE, VT, 10, Source.POLL, worker_id="w2")
    assert len(second) == 1 and second.hold is not None and second.hold.reason is HoldReason.LIMITED
    assert list(await side.store.claim(QUEUE, VT, 10, Source.POLL, worker_id="w2")) == []
    # A put-back ends its claim: its slot is free again.
    await side.store.retry(QUEUE, [RetryRequest(first[0], 60_000, None, count_attempt=False)])
    assert len(await side.store.claim(QUEUE, VT, 10, Source.POLL, worker_id="w2")) == 1


async def test_a_key_cap_takes_other_keys_first(side: Side) -> None:
    body = lambda key: StepMessage.build(NS, "noop", {}, concurrency_key=key)  # noqa: E731
    a1, a2, b1 = side.send(body("a")), side.send(body("a")), side.send(body("b"))
    side.limit(key_max_running=1)
    got = await side.store.claim(QUEUE, VT, 10, Source.POLL, worker_id="w1")
    assert sorted(m.msg_id for m in got) == [a1, b1]
    assert side.row(a2) is not None and side.row(a2)[0] == 0  # type: ignore[index]


async def test_priorities_then_groups_round_robin_order_the_claim(side: Side) -> None:
    build = StepMessage.build
    low = side.send(build(NS, "noop", {}, priority=9))
    a = [side.send(build(NS, "noop", {}, group="A")) for _ in range(3)]
    b = side.send(build(NS, "noop", {}, group="B"))
    await side.store.note_flow_fields(NS, True, True)
    got = await side.store.claim(QUEUE, VT, 10, Source.POLL, worker_id="w1")
    assert [m.msg_id for m in got] == [a[0], b, a[1], a[2], low]


def test_both_stores_have_the_whole_port() -> None:
    """Each method of the port, with the same parameters, on both implementations."""
    import inspect

    for name, member in inspect.getmembers(StepStore, inspect.isfunction):
        if name.startswith("_"):
            continue
        want = list(inspect.signature(member).parameters)
        for impl in (QueueClient, MemoryStore):
            have = list(inspect.signature(getattr(impl, name)).parameters)
            assert have[: len(want)] == want, (impl.__name__, name, have)
