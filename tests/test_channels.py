"""One module for channels and payloads (domain/notifications.py), and the listener's table of
routes: every shape a step wakeup comes in, what is refused, and that the database sends on the
channels the module names."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
import psycopg
import pytest
from listening import notifications_so_far

from tasker_worker.config.models import ListenerConfig
from tasker_worker.domain.notifications import (
    CONTROL_CHANNEL,
    FLEET_CHANNEL,
    OUTCOME_CHANNEL,
    BatchReadyEvent,
    MessageReadyEvent,
    MessageWithPayloadEvent,
    ModeRequested,
    cancel_channel,
    claimed_channel,
    decode_claimed,
    decode_outcomes,
    decode_wakeup,
    message_ready_channel,
)
from tasker_worker.domain.steps import Source
from tasker_worker.runtime.commands import ClaimsSeen, MessagesAnnounced, WakeClaims, WorkerCommand
from tasker_worker.runtime.listener import WorkerQueueListener
from tasker_worker.runtime.stats import WorkerStats
from tasker_worker.testing import make_config, running_worker, wait_until

NS = "chan"
QUEUE = f"worker_{NS}_queue"
AT = "2026-01-01T10:00:00.123456+00:00"


def test_our_message_ready_and_batch_ready() -> None:
    one = decode_wakeup(
        '{"event_type": "message_ready", "queue_name": "worker_a_queue", "namespace": "a", "msg_id": 7,'
        f' "message_count": 1, "ready_at": "{AT}", "delay_seconds": 0}}'
    )
    assert isinstance(one, MessageReadyEvent)
    assert (one.queue_name, one.msg_ids, one.message_count, one.min_msg_id) == ("worker_a_queue", (7,), 1, None)
    assert one.ready_at == datetime(2026, 1, 1, 10, 0, 0, 123456, tzinfo=UTC)
    batch = decode_wakeup(
        '{"event_type": "batch_ready", "queue_name": "worker_a_queue", "namespace": "a", "msg_ids": [3, 4],'
        ' "message_count": 500, "min_msg_id": 3, "max_msg_id": 502, "truncated": true,'
        f' "ready_at": "{AT}", "delay_seconds": 0}}'
    )
    assert isinstance(batch, BatchReadyEvent)
    assert (batch.msg_ids, batch.message_count, batch.min_msg_id, batch.max_msg_id) == ((3, 4), 500, 3, 502)


def test_tasker_cores_events_are_wakeups_too() -> None:
    full = decode_wakeup(
        '{"event_type": "message_with_payload", "msg_id": 9, "queue_name": "worker_a_queue", "namespace": "a",'
        f' "message": {{"task_uuid": "x", "deep": [1, {{"a": null}}]}}, "ready_at": "{AT}", "delay_seconds": 0}}'
    )
    assert isinstance(full, MessageWithPayloadEvent)
    assert (full.msg_ids, full.message_count, full.min_msg_id, full.max_msg_id) == ((9,), 1, None, None)
    signal = decode_wakeup(
        '{"event_type": "message_ready", "msg_id": 10, "queue_name": "worker_a_queue", "namespace": "a",'
        f' "ready_at": "{AT}", "payload_omitted": true, "truncated": true}}'
    )
    assert isinstance(signal, MessageReadyEvent) and signal.payload_omitted and signal.truncated
    # tasker-core's batch_ready lists every id and has no range of ours.
    batch = decode_wakeup(
        '{"event_type": "batch_ready", "msg_ids": [1, 2, 3], "queue_name": "worker_a_queue", "namespace": "a",'
        f' "message_count": 3, "ready_at": "{AT}", "metadata": {{}}, "delay_seconds": 2}}'
    )
    assert isinstance(batch, BatchReadyEvent) and batch.msg_ids == (1, 2, 3) and batch.delay_seconds == 2


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "[1, 2]",
        '{"event_type": "queue_created", "queue_name": "q", "namespace": "n", "created_at": "' + AT + '"}',
        '{"event_type": "message_ready", "msg_id": "7", "queue_name": "q"}',
        '{"event_type": "batch_ready", "msg_ids": [1, "2"], "queue_name": "q"}',
        '{"event_type": "message_with_payload", "queue_name": "q", "message": {}}',
        '{"queue_name": "q", "msg_id": 1}',
        '{"event_type": "batch_ready", "msg_ids": [1], "queue_name": "q", "message_count": 3, "ready_at": "1...}',
    ],
)
def test_anything_else_is_no_decoded_wakeup(payload: str) -> None:
    assert decode_wakeup(payload) is None


def test_a_delayed_wakeup_is_never_early() -> None:
    received = datetime(2026, 1, 1, 10, 0, 10, tzinfo=UTC)
    # Ours: ready_at is when the message becomes visible, still ahead: kept as it is.
    ours = decode_wakeup(
        '{"event_type": "message_ready", "queue_name": "q", "msg_id": 1,'
        ' "ready_at": "2026-01-01T10:00:14+00:00", "delay_seconds": 5}'
    )
    assert ours is not None and ours.due_from(received) is ours
    # tasker-core's own functions put the time of the send there: due delay_seconds after arrival.
    theirs = decode_wakeup(
        '{"event_type": "message_with_payload", "queue_name": "q", "msg_id": 1, "message": {},'
        ' "ready_at": "2026-01-01T10:00:09+00:00", "delay_seconds": 5}'
    )
    assert theirs is not None and theirs.due_from(received).ready_at == received + timedelta(seconds=5)
    # Not delayed: as it is, whatever its ready_at.
    now = decode_wakeup('{"event_type": "message_ready", "queue_name": "q", "msg_id": 1, "ready_at": "' + AT + '"}')
    assert now is not None and now.due_from(received) is now


def test_claim_notices_and_outcomes() -> None:
    notice = decode_claimed('{"q": "worker_a_queue", "ids": [5, 6], "lo": 5, "hi": 300, "n": 296}')
    assert notice is not None and notice.queue == "worker_a_queue"
    assert (notice.msg_ids, notice.lo, notice.hi, notice.truncated) == (frozenset({5, 6}), 5, 300, True)
    assert decode_claimed('{"q": "x", "ids": [], "lo": 1, "hi": 1, "n": 0}') is None
    assert decode_claimed('{"q": "x"}') is None
    named = str(uuid.uuid4())
    assert decode_outcomes(json.dumps({"step_uuids": [named]})) == {named}
    assert decode_outcomes("{}") == set()
    assert decode_outcomes("oops") == set()


# --- the listener's routes ----------------------------------------------------------------------


def _listener(**callbacks: Any) -> tuple[WorkerQueueListener, anyio.abc.ObjectReceiveStream[WorkerCommand]]:
    send, receive = anyio.create_memory_object_stream[WorkerCommand](16)

    async def connected() -> None:
        pass

    listener = WorkerQueueListener(
        "postgresql://unused", ["a", "b"], ListenerConfig(), WorkerStats(), send, connected, **callbacks
    )
    return listener, receive


@pytest.mark.anyio
async def test_the_listener_routes_each_channel_by_its_table() -> None:
    calls: list[str] = []
    listener, commands = _listener(
        on_control=lambda: calls.append("control"), on_fleet_changed=lambda: calls.append("fleet")
    )
    assert (
        set(listener.channels)
        == set(listener.routes)
        == {
            message_ready_channel("a"),
            message_ready_channel("b"),
            claimed_channel("a"),
            claimed_channel("b"),
            cancel_channel("a"),
            cancel_channel("b"),
            FLEET_CHANNEL,
            CONTROL_CHANNEL,
        }
    )
    await listener.routes[message_ready_channel("b")](
        '{"event_type": "message_with_payload", "msg_id": 4, "queue_name": "worker_b_queue", "namespace": "b",'
        f' "message": {{}}, "ready_at": "{AT}", "delay_seconds": 0}}'
    )
    got = commands.receive_nowait()
    assert isinstance(got, MessagesAnnounced) and got.event.msg_ids == (4,)
    # Unreadable (tasker-core cuts an oversized batch_ready into invalid JSON): the channel
    # still says which queue has news.
    await listener.routes[message_ready_channel("b")]('{"event_type": "batch_ready", "msg_ids": [1, 2...}')
    assert commands.receive_nowait() == WakeClaims("worker_b_queue", Source.EVENT)
    # tasker-core's own function sent a delayed message: its ready_at is the time of the send.
    await listener.routes[message_ready_channel("a")](
        '{"event_type": "message_with_payload", "msg_id": 5, "queue_name": "worker_a_queue", "namespace": "a",'
        f' "message": {{}}, "ready_at": "{AT}", "delay_seconds": 30}}'
    )
    delayed = commands.receive_nowait()
    assert isinstance(delayed, MessagesAnnounced) and delayed.event.ready_at is not None
    assert (delayed.event.ready_at - datetime.now(UTC)).total_seconds() > 25
    await listener.routes[claimed_channel("a")]('{"q": "worker_a_queue", "ids": [1], "lo": 1, "hi": 1, "n": 1}')
    seen = commands.receive_nowait()
    assert isinstance(seen, ClaimsSeen) and seen.notice.queue == "worker_a_queue"
    await listener.routes[claimed_channel("a")]("garbage")
    await listener.routes[FLEET_CHANNEL]("")
    await listener.routes[CONTROL_CHANNEL]('{"command": "set_mode", "mode": "Hybrid"}')
    assert calls == ["fleet", "control"]
    with pytest.raises(anyio.WouldBlock):
        commands.receive_nowait()


def test_without_single_claimer_or_callbacks_fewer_channels() -> None:
    send, _ = anyio.create_memory_object_stream[WorkerCommand](1)

    async def connected() -> None:
        pass

    listener = WorkerQueueListener(
        "postgresql://unused", ["a"], ListenerConfig(single_claimer=False), WorkerStats(), send, connected
    )
    # A step's cancel request reaches the worker holding it whatever the claim strategy.
    assert listener.channels == [message_ready_channel("a"), cancel_channel("a")]


# --- what the database sends on them --------------------------------------------------------------


@pytest.mark.anyio
async def test_the_database_sends_on_the_channels_the_module_names(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as lc:
        for channel in (CONTROL_CHANNEL, FLEET_CHANNEL, OUTCOME_CHANNEL, message_ready_channel(NS)):
            lc.execute(f'LISTEN "{channel}"')
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT tasker.request_mode('Hybrid', 'nobody')")
            conn.execute("UPDATE tasker.workers SET status = status WHERE false")
            [(step_uuid, _, _)] = conn.execute(
                "SELECT * FROM tasker.enqueue_step(%s, 'noop', '{}', gen_random_uuid(), p_notify => true)", (NS,)
            ).fetchall()
        async with running_worker(url, make_config(namespaces=[NS])) as worker:
            await wait_until(lambda: worker.stats.counters["succeeded"] >= 1, timeout=20)
        got = {n.channel: n.payload for n in notifications_so_far(lc)}
    assert msgspec.json.decode(got[CONTROL_CHANNEL], type=ModeRequested) == ModeRequested(
        mode="Hybrid", worker_id="nobody"
    )
    assert got[FLEET_CHANNEL] == ""
    assert decode_outcomes(got[OUTCOME_CHANNEL]) == {str(step_uuid)}
    assert isinstance(decode_wakeup(got[message_ready_channel(NS)]), MessageReadyEvent)
