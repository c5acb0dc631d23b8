"""WorkerQueueListener: one dedicated LISTEN connection for the worker's namespaces.

- Each notification is routed by its channel through a dispatch table built once (the
  channels and their payloads are those of ``domain/notifications.py``): a step wakeup of a
  queue goes straight into the command channel as an ``MessagesAnnounced``, which the
  ``CommandProcessor`` (``processor.py``) reads; the ``WorkerEventSystem`` owns that channel and
  decides, by deployment mode, whether a listener runs at all. Whoever sent the wakeup (our
  notify trigger, tasker-core's producer functions: ``message_with_payload``, a signal-only
  ``message_ready``, even a payload cut into invalid JSON), it only says "claim from this
  queue": the claim reads the rows, fenced as ever.
- Checks at startup that LISTEN really delivers (it does not behind a transaction-pooling
  proxy): a probe NOTIFY sent from another connection must arrive within
  ``connection_timeout``.
- Detects a dead connection within ``liveness_interval`` even when no notification comes:
  after a quiet interval it runs a trivial query under a timeout.
- Reconnects with exponential backoff and jitter; after every (re)connect it asks for an
  immediate catch-up claim, so nothing sent while it was away waits for the poll interval.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
from anyio.streams.memory import MemoryObjectSendStream
from psycopg import sql

from tasker_worker.config.models import ListenerConfig
from tasker_worker.db import queries
from tasker_worker.db.connection import connect
from tasker_worker.db.retry import TRANSIENT_DB_ERRORS, Backoff
from tasker_worker.domain.names import queue_name
from tasker_worker.domain.notifications import (
    CONTROL_CHANNEL,
    FLEET_CHANNEL,
    PROBE_PREFIX,
    cancel_channel,
    claimed_channel,
    decode_cancel,
    decode_claimed,
    decode_wakeup,
    message_ready_channel,
)
from tasker_worker.domain.steps import Source
from tasker_worker.errors import ListenerUnavailable, first_line
from tasker_worker.runtime.commands import CancelStep, ClaimsSeen, MessagesAnnounced, WakeClaims, WorkerCommand
from tasker_worker.runtime.stats import WorkerStats

log = logging.getLogger(__name__)

#: A LISTEN connection that cannot be set up is tried again for any database error (a LISTEN
#: refused by a proxy too), not only for the transient ones.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_DB_ERRORS, psycopg.Error)

#: How the LISTEN connection shows in ``pg_stat_activity``.
LISTENER_APPLICATION_NAME = "tasker-listener"

ProbeSender = Callable[[str, str], Awaitable[None]]

#: What the listener does with one notification's payload, by channel.
Route = Callable[[str], Awaitable[None]]


class WorkerQueueListener:
    """LISTENs on ``pgmq_message_ready.<namespace>`` channels and reports events."""

    def __init__(
        self,
        url: str,
        namespaces: list[str],
        config: ListenerConfig,
        stats: WorkerStats,
        commands: MemoryObjectSendStream[WorkerCommand],
        on_connected: Callable[[], Awaitable[None]],
        probe_sender: ProbeSender | None = None,
        *,
        on_control: Callable[[], None] | None = None,
        on_fleet_changed: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.on_fleet_changed = on_fleet_changed
        self.on_control = on_control
        #: The dispatch table: each channel listened to, and what its notifications do.
        self.routes = self._route_table(namespaces, config.single_claimer)
        self.channels = list(self.routes)
        self.config = config
        self.stats = stats
        #: The command channel to the CommandProcessor: each notification becomes an
        #: MessagesAnnounced there (bounded: a full channel slows the listener, not memory).
        self.commands = commands
        self.on_connected = on_connected
        self.probe_sender = probe_sender or self._send_probe
        self.healthy = False
        #: Monotonic time since which the connection has been listening (None while down).
        self.healthy_since: float | None = None
        self.connected_once = False
        self.last_notification_at: float | None = None
        self.last_error: str | None = None
        self.state_changed = anyio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None

    def _route_table(self, namespaces: list[str], single_claimer: bool) -> dict[str, Route]:
        """Channel -> route, for every channel this listener subscribes to (known up front: a
        notification costs one dictionary lookup to dispatch)."""
        routes: dict[str, Route] = {}
        for ns in namespaces:
            routes[message_ready_channel(ns)] = self._wakeup_route(queue_name(ns))
            routes[cancel_channel(ns)] = self._on_cancel
        if single_claimer:
            for ns in namespaces:
                routes[claimed_channel(ns)] = self._on_claimed
            if self.on_fleet_changed is not None:
                routes[FLEET_CHANNEL] = self._on_fleet_changed
        if self.on_control is not None:
            routes[CONTROL_CHANNEL] = self._on_control
        return routes

    def _wakeup_route(self, queue: str) -> Route:
        """The route of one namespace's step wakeups (``queue``: its queue)."""

        async def on_wakeup(payload: str) -> None:
            event = decode_wakeup(payload)
            if event is None:
                # Not a payload we can read (tasker-core cuts an oversized batch_ready into
                # invalid JSON), but the channel says which queue has news: look there.
                await self.commands.send(WakeClaims(queue, Source.EVENT))
                return
            if event.delay_seconds:
                event = event.due_from(datetime.now(UTC))
            await self.commands.send(MessagesAnnounced(event))

        return on_wakeup

    async def _on_claimed(self, payload: str) -> None:
        notice = decode_claimed(payload)
        if notice is not None:
            await self.commands.send(ClaimsSeen(notice))

    async def _on_cancel(self, payload: str) -> None:
        request = decode_cancel(payload)
        if request is not None:
            await self.commands.send(CancelStep(request))

    async def _on_fleet_changed(self, payload: str) -> None:
        if self.on_fleet_changed is not None:
            self.on_fleet_changed()

    async def _on_control(self, payload: str) -> None:
        # The request is kept in the worker's row; the notification only says "look now".
        if self.on_control is not None:
            self.on_control()

    def _set_healthy(self, value: bool) -> None:
        if self.healthy != value:
            self.healthy = value
            self.healthy_since = time.monotonic() if value else None
            self.state_changed.set()
            self.state_changed = anyio.Event()

    @property
    def backend_pid(self) -> int | None:
        """PID of the server process behind the LISTEN connection (for tests and health)."""
        return self._conn.info.backend_pid if self._conn is not None and not self._conn.closed else None

    async def check_delivery(self) -> None:
        """Connect, LISTEN and prove delivery once; raise ``ListenerUnavailable`` if it fails."""
        conn = await self._connect_and_listen()
        try:
            await self._self_check(conn)
        finally:
            await conn.close()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting as needed."""
        backoff = Backoff(timedelta(milliseconds=100), self.config.max_reconnect_delay, jitter=0.3)
        while True:
            try:
                conn = await self._connect_and_listen()
            except _CONNECT_ERRORS as exc:
                await self._backoff(backoff, exc)
                continue
            self._conn = conn
            error: BaseException | None = None
            try:
                self._set_healthy(True)
                if self.connected_once:
                    self.stats.incr("listener_reconnects")
                    log.info("listener reconnected")
                self.connected_once = True
                backoff.succeeded()
                await self.on_connected()
                await self._listen(conn)
            except (psycopg.Error, TimeoutError) as exc:
                error = exc
            finally:
                self._set_healthy(False)
                self._conn = None
                with anyio.CancelScope(shield=True):
                    await conn.close()
            await self._backoff(backoff, error or RuntimeError("listener stopped"))

    async def _backoff(self, backoff: Backoff, exc: BaseException) -> None:
        self.last_error = first_line(exc)
        delay = backoff.failed()
        log.warning("listener connection lost (%s); reconnecting in %.2fs", self.last_error, delay)
        await anyio.sleep(delay)

    async def _connect_and_listen(self) -> psycopg.AsyncConnection[Any]:
        timeout = self.config.connection_timeout.total_seconds()
        with anyio.fail_after(timeout + 1):
            conn = await connect(self.url, timeout=timeout, application_name=LISTENER_APPLICATION_NAME)
        try:
            for channel in self.channels:
                await conn.execute(sql.SQL(queries.LISTEN).format(sql.Identifier(channel)))
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        interval = self.config.liveness_interval.total_seconds()
        check_timeout = self.config.connection_timeout.total_seconds()
        routes = self.routes
        while True:
            got_any = False
            async for notify in conn.notifies(timeout=interval):
                got_any = True
                self.last_notification_at = time.monotonic()
                route = routes.get(notify.channel)
                if route is not None:
                    await route(notify.payload)
            if not got_any:
                # Quiet for a whole interval: prove the connection is still alive.
                with anyio.fail_after(check_timeout):
                    await conn.execute(queries.PING)

    async def _self_check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        channel = f"{PROBE_PREFIX}{uuid.uuid4().hex[:16]}"
        await conn.execute(sql.SQL(queries.LISTEN).format(sql.Identifier(channel)))
        await self.probe_sender(channel, "probe")
        timeout = self.config.connection_timeout.total_seconds()
        async for notify in conn.notifies(timeout=timeout):
            if notify.channel == channel:
                return
        raise ListenerUnavailable(
            f"LISTEN did not deliver a probe notification within {timeout:g}s: the connection "
            "probably goes through a transaction-pooling proxy (e.g. PgBouncer). "
            'Use deployment_mode = "PollingOnly" there, or connect the worker directly.'
        )

    async def _send_probe(self, channel: str, payload: str) -> None:
        async with await connect(self.url) as other:
            await other.execute(queries.NOTIFY, (channel, payload))
