"""Every NOTIFY channel and payload of the runtime, in one place (docs/messages.md "Notifications").

The channels are named here and nowhere else: the SQL the runtime sends (``db/queries.py``)
composes them from these constants, the listener subscribes to them and routes each one to its
handler, and the migrations that send on them are checked against them by the tests
(``tests/test_channels.py``).

Each payload is a msgspec struct: a listener decodes a notification with one compiled call, and a
payload that is not what its channel carries is refused as a whole (``None``) rather than half
read. The step-wakeup payloads on ``pgmq_message_ready.<namespace>`` form a tagged union on
``event_type``, as tasker-core's ``PgmqNotifyEvent`` does:

========================  =================================================================
``message_ready``         one message (``msg_id``); ours (the notify trigger, a put-back's
                          announcement) or tasker-core's signal-only event for a message too
                          large to carry (``payload_omitted``, and ``truncated`` when even that
                          was cut down)
``batch_ready``           several messages of one statement: the first 100 ``msg_ids``,
                          ``message_count``, ``min_msg_id``/``max_msg_id``
``message_with_payload``  tasker-core's event carrying the message itself; only a wakeup here:
                          the claim reads the row, fenced as ever, so ``message`` is not even
                          decoded
========================  =================================================================

All three carry ``queue_name``, ``namespace``, ``ready_at`` and ``delay_seconds``; the fields the
claim side reads (``msg_ids``, ``message_count``, ``min_msg_id``, ``max_msg_id``, ``ready_at``) are
there on each of them, so ``MessageReady`` (their union) is what the processor takes.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, ClassVar, Self

import msgspec

# --- channels --------------------------------------------------------------------------------

#: Every queue's inserts are announced here (and on the namespace's own channel).
MESSAGE_READY_CHANNEL = "pgmq_message_ready"
#: Prefix of a namespace's step-wakeup channel: ``pgmq_message_ready.<namespace>``.
MESSAGE_READY_PREFIX = MESSAGE_READY_CHANNEL + "."
#: Prefix of a namespace's claim notices (``StepsClaimed``): ``tasker_claimed.<namespace>``.
CLAIMED_PREFIX = "tasker_claimed."
#: A worker registered, left, or changed mode or namespaces (migration 0009); empty payload.
FLEET_CHANNEL = "tasker_fleet_changed"
#: ``tasker.request_mode`` asks running workers to switch mode (migration 0006): ``ModeRequested``.
CONTROL_CHANNEL = "tasker_worker_control"
#: The outcome of a step sent with ``notify`` was recorded (migration 0012): ``OutcomesRecorded``.
OUTCOME_CHANNEL = "tasker_outcome"
#: Prefix of a namespace's cancel requests for running steps (migration 0019):
#: ``tasker_cancel.<namespace>``, ``CancelRequested``.
CANCEL_PREFIX = "tasker_cancel."
#: Prefix of the one-off channel a listener proves delivery on at startup.
PROBE_PREFIX = "tasker_probe_"
#: tasker-core's own queue-created channel: not sent by this runtime, not listened to.
TASKER_CORE_QUEUE_CREATED_CHANNEL = "pgmq_queue_created"

#: pg_notify refuses channel names longer than this (NAMEDATALEN - 1 bytes).
MAX_CHANNEL_BYTES = 63
#: pg_notify refuses payloads of this many bytes or more.
MAX_PAYLOAD_BYTES = 8000


def message_ready_channel(namespace: str) -> str:
    """The step-wakeup channel of ``namespace``: ``pgmq_message_ready.<namespace>``."""
    return MESSAGE_READY_PREFIX + namespace


def claimed_channel(namespace: str) -> str:
    """The claim-notice channel of ``namespace``: ``tasker_claimed.<namespace>``."""
    return CLAIMED_PREFIX + namespace


def cancel_channel(namespace: str) -> str:
    """The channel of ``namespace``'s cancel requests: ``tasker_cancel.<namespace>``."""
    return CANCEL_PREFIX + namespace


# --- step wakeups: pgmq_message_ready.<namespace> --------------------------------------------


class _Wakeup(msgspec.Struct, frozen=True, kw_only=True, tag_field="event_type"):
    """What every step-wakeup payload carries. Unknown keys are ignored (tasker-core's
    ``metadata``, ``visibility_timeout_seconds``, the ``message`` itself)."""

    queue_name: str
    namespace: str = ""
    #: When the messages are (or were) visible. tasker-core's own producer functions put the
    #: time of the send here, whatever the delay: see ``due_from``.
    ready_at: datetime | None = None
    #: The delay the messages were sent with, whole seconds (0: visible at once).
    delay_seconds: int = 0

    def due_from(self, received: datetime) -> Self:
        """This wakeup with ``ready_at`` no earlier than the messages can be visible, for a
        notification that arrived at ``received``.

        Ours say when the messages become visible, tasker-core's the time of the send; the
        two cannot be told apart, and acting early costs a delayed message its only wakeup in
        EventDrivenOnly. So a delayed wakeup whose ``ready_at`` has passed is taken as due
        ``delay_seconds`` after it arrived: never early, and late only for a delayed message of
        ours whose transaction committed after it was already visible.
        """
        ready = self.ready_at
        if self.delay_seconds <= 0 or (ready is not None and ready > received):
            return self
        return msgspec.structs.replace(self, ready_at=received + timedelta(seconds=self.delay_seconds))


class MessageReadyEvent(_Wakeup, frozen=True, kw_only=True, tag="message_ready"):
    """One message is ready (``msg_id``): sent by the notify trigger for a single-row insert,
    by a put-back's announcement, and by tasker-core's producers for a message too large to
    carry (``payload_omitted``; ``truncated`` when its payload was cut down further)."""

    msg_id: int | None = None
    message_count: int = 1
    min_msg_id: int | None = None
    max_msg_id: int | None = None
    payload_omitted: bool = False
    truncated: bool = False

    @property
    def msg_ids(self) -> tuple[int, ...]:
        """The announced ids (one, or none when the payload named none)."""
        return () if self.msg_id is None else (self.msg_id,)


class BatchReadyEvent(_Wakeup, frozen=True, kw_only=True, tag="batch_ready"):
    """Several messages of one statement are ready: at most the first 100 ids are listed;
    ``min_msg_id``..``max_msg_id`` spans them all (``truncated`` when the list is not all)."""

    msg_ids: tuple[int, ...] = ()
    message_count: int = 1
    min_msg_id: int | None = None
    max_msg_id: int | None = None
    truncated: bool = False


class MessageWithPayloadEvent(_Wakeup, frozen=True, kw_only=True, tag="message_with_payload"):
    """tasker-core's event for a message small enough to travel with its notification. Only
    a wakeup here: the message is claimed from its row like any other (``message`` is not
    decoded)."""

    msg_id: int
    message_count: ClassVar[int] = 1
    min_msg_id: ClassVar[int | None] = None
    max_msg_id: ClassVar[int | None] = None

    @property
    def msg_ids(self) -> tuple[int, ...]:
        """The announced id."""
        return (self.msg_id,)


#: A step wakeup, whichever of the three shapes it came in (what the processor takes).
MessageReady = MessageReadyEvent | BatchReadyEvent | MessageWithPayloadEvent

_WAKEUP = msgspec.json.Decoder(MessageReady)


def decode_wakeup(payload: str | bytes) -> MessageReady | None:
    """The step wakeup of a ``pgmq_message_ready`` payload; ``None`` for anything else (not
    JSON, another ``event_type``, a field of the wrong type)."""
    try:
        return _WAKEUP.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


# --- claim notices: tasker_claimed.<namespace> ----------------------------------------------


class StepsClaimed(msgspec.Struct, frozen=True):
    """A worker claimed these messages of ``queue`` (``domain/herd.py``): the first 100 ``ids``,
    and ``lo``..``hi`` spanning all ``n`` of them."""

    queue: str = msgspec.field(name="q")
    ids: Annotated[tuple[int, ...], msgspec.Meta(min_length=1)]
    lo: int
    hi: int
    n: int

    @property
    def msg_ids(self) -> frozenset[int]:
        """The ids listed."""
        return frozenset(self.ids)

    @property
    def truncated(self) -> bool:
        """Whether more were claimed than listed (then all of ``lo``..``hi`` count as claimed)."""
        return self.n > len(self.ids)


_CLAIMED = msgspec.json.Decoder(StepsClaimed)


def decode_claimed(payload: str | bytes) -> StepsClaimed | None:
    """The claim notice of a ``tasker_claimed.<namespace>`` payload; ``None`` for anything else."""
    try:
        return _CLAIMED.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


# --- control, outcomes ------------------------------------------------------------------------


class ModeRequested(msgspec.Struct, frozen=True, kw_only=True, tag_field="command", tag="set_mode"):
    """``tasker.request_mode`` asked workers (one by id, a namespace's, or all: None) to switch
    mode. The request itself is kept in the worker's row; the notification only says "look now"."""

    mode: str
    worker_id: str | None = None
    namespace: str | None = None


class OutcomesRecorded(msgspec.Struct, frozen=True):
    """Steps sent with ``notify`` whose outcome was just recorded (at most 150 per statement;
    a waiter also looks by itself, slowly)."""

    step_uuids: list[str] = msgspec.field(default_factory=list)


class CancelRequested(msgspec.Struct, frozen=True):
    """``tasker.cancel_step`` asked a running step to stop (``by``: who asked); the request is
    also kept in ``tasker.step_cancellations`` for a worker that was not listening."""

    step_uuid: str
    msg_id: int | None = None
    by: str | None = None


_CANCEL = msgspec.json.Decoder(CancelRequested)


def decode_cancel(payload: str | bytes) -> CancelRequested | None:
    """A ``tasker_cancel.<namespace>`` payload (None when it is not one)."""
    try:
        return _CANCEL.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


_OUTCOMES = msgspec.json.Decoder(OutcomesRecorded)


def decode_outcomes(payload: str | bytes) -> set[str]:
    """The step_uuids a ``tasker_outcome`` payload names (none when it is not one)."""
    try:
        return set(_OUTCOMES.decode(payload).step_uuids)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return set()


__all__ = [
    "CANCEL_PREFIX",
    "CLAIMED_PREFIX",
    "CONTROL_CHANNEL",
    "FLEET_CHANNEL",
    "MAX_CHANNEL_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MESSAGE_READY_CHANNEL",
    "MESSAGE_READY_PREFIX",
    "OUTCOME_CHANNEL",
    "PROBE_PREFIX",
    "TASKER_CORE_QUEUE_CREATED_CHANNEL",
    "BatchReadyEvent",
    "CancelRequested",
    "MessageReady",
    "MessageReadyEvent",
    "MessageWithPayloadEvent",
    "ModeRequested",
    "OutcomesRecorded",
    "StepsClaimed",
    "cancel_channel",
    "claimed_channel",
    "decode_cancel",
    "decode_claimed",
    "decode_outcomes",
    "decode_wakeup",
    "message_ready_channel",
]
