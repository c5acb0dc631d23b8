"""Step messages, claimed messages and outcomes.

``StepMessage`` is the JSON contract producers write (docs/messages.md, "The step message").
``ClaimedMessage`` is one row a claim returned; ``Outcome`` is what the runtime records.
"""

from __future__ import annotations

import enum
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import msgspec

from tasker_worker.domain.flow import MAX_KEY_LEN, MAX_PRIORITY, MIN_PRIORITY
from tasker_worker.domain.names import HANDLER_MAX_LEN, validate_handler_name, validate_namespace
from tasker_worker.errors import StepValidationError

MAX_ATTEMPT_LIMIT = 100
MAX_STEP_TIMEOUT_S = 24 * 3600.0


def uuid7(at: float | None = None) -> uuid.UUID:
    """A new UUIDv7 (RFC 9562): the Unix time in milliseconds (now, or ``at`` in seconds), then
    random bits. The step_uuids we make are UUIDv7s: a step's outcome row goes to the partition
    of that time (``tasker.uuid_time``, migration 0021), dropped whole by retention."""
    ms = int((time.time() if at is None else at) * 1000)
    raw = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70  # version 7
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC variant
    return uuid.UUID(bytes=bytes(raw))


_HandlerName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=HANDLER_MAX_LEN, pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]*$")
]
_AttemptLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_ATTEMPT_LIMIT)]
_Timeout = Annotated[float, msgspec.Meta(gt=0, le=MAX_STEP_TIMEOUT_S)]
_Priority = Annotated[int, msgspec.Meta(ge=MIN_PRIORITY, le=MAX_PRIORITY)]
_Key = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_LEN)]
_UUID_KEYS = ("step_uuid", "task_uuid", "correlation_id")
_WHERE = re.compile(r" - at `\$\.?([^`]*)`$")


class StepMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One unit of work as stored in a pgmq message.

    A msgspec struct: the claim path decodes and validates the message text in one compiled
    call (about a fifth of the cost of ``json.loads`` plus a pydantic model). Unknown keys are
    ignored. ``inputs`` are what ``json.loads`` gives for the message's text: the compiled
    decoder agrees with it on everything PostgreSQL's jsonb prints (the test suite checks it
    through the server), and whatever it would read differently goes to ``json.loads``.
    """

    step_uuid: uuid.UUID
    task_uuid: uuid.UUID
    correlation_id: uuid.UUID
    namespace: str
    handler: _HandlerName
    inputs: dict[str, Any] = msgspec.field(default_factory=dict)
    attempt_limit: _AttemptLimit | None = None
    #: Seconds; overrides the handler's timeout for this step.
    timeout: _Timeout | None = None
    #: 0 (first, the default) to 9 (last): with a backlog, claims take the lowest value first.
    priority: _Priority = 0
    #: A tenant, a customer, ...: claims take the steps of a namespace round-robin across groups.
    group: _Key | None = None
    #: Steps sharing a key are capped together (``queue limit NS --key-max-running N``).
    concurrency_key: _Key | None = None

    @classmethod
    def decode(cls, text: str | bytes) -> StepMessage:
        """Decode and validate a message's JSON text; ``StepValidationError`` with a readable
        reason when it is not a valid step message."""
        try:
            return _DECODER.decode(text)
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
        except Exception as exc:  # RecursionError (a body nested ~1000 deep), or worse
            raise _undecodable(exc) from None
        # The compiled decoder refuses a few spellings that the contract has always accepted
        # (UUIDs in braces or as URNs) and reads a few numbers differently from json.loads (a
        # literal 1e400): decide those the careful way, with json.loads.
        try:
            payload = json.loads(text)
            return cls.parse(payload)
        except StepValidationError:
            raise
        except ValueError as exc:
            raise StepValidationError(f"step message is not valid JSON: {exc}", reason="malformed_message") from None
        except Exception as exc:
            # Whatever the text is, a bad message is the message's fault, never the worker's
            # end: the runner dead-letters a StepValidationError (and only that).
            raise _undecodable(exc) from None

    @classmethod
    def parse(cls, payload: Any) -> StepMessage:
        """Validate a decoded message body, raising ``StepValidationError`` with a readable
        one-line reason."""
        if not isinstance(payload, dict):
            raise StepValidationError(
                f"step message must be a JSON object, got {type(payload).__name__}",
                reason="malformed_message",
            )
        body = dict(payload)
        for key in _UUID_KEYS:
            value = body.get(key)
            if isinstance(value, str) and len(value) != 36:
                try:
                    body[key] = str(uuid.UUID(value))
                except ValueError:
                    pass  # reported below, as the decoder words it
        try:
            return msgspec.convert(body, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise StepValidationError(f"invalid step message: {_readable(exc)}", reason="malformed_message") from None

    def as_body(self) -> dict[str, Any]:
        """The message body as JSON-able builtins (UUIDs as strings; unset options left out)."""
        body: dict[str, Any] = msgspec.to_builtins(self)
        if not body.get("priority"):
            body.pop("priority", None)
        return {k: v for k, v in body.items() if v is not None}

    @staticmethod
    def build(
        namespace: str,
        handler: str,
        inputs: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """A new message body with fresh ids (what ``tasker.send_step`` builds in SQL)."""
        body: dict[str, Any] = {
            "step_uuid": str(uuid7()),
            "task_uuid": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
            "namespace": namespace,
            "handler": handler,
            "inputs": inputs or {},
        }
        body.update({k: v for k, v in extra.items() if v is not None})
        return body


def build_message(
    namespace: str,
    handler: str,
    inputs: dict[str, Any] | None = None,
    *,
    step_uuid: uuid.UUID | str | None = None,
    task_uuid: uuid.UUID | str | None = None,
    correlation_id: uuid.UUID | str | None = None,
    attempt_limit: int | None = None,
    timeout: float | None = None,
    priority: int | None = None,
    group: str | None = None,
    concurrency_key: str | None = None,
) -> StepMessage:
    """A step message checked by the rules ``tasker.step_message`` applies in SQL (names,
    inputs an object, attempt_limit 1..100, timeout within a day, priority 0..9, group and
    concurrency_key 1..128 characters); fresh ids where none given. Raises ``InvalidName`` or
    ``StepValidationError``."""
    validate_namespace(namespace)
    validate_handler_name(handler)
    if inputs is not None and not isinstance(inputs, dict):
        raise StepValidationError("inputs must be a JSON object", reason="malformed_message")
    body = {
        "step_uuid": str(step_uuid or uuid7()),
        "task_uuid": str(task_uuid or uuid.uuid4()),
        "correlation_id": str(correlation_id or uuid.uuid4()),
        "namespace": namespace,
        "handler": handler,
        "inputs": inputs or {},
        "attempt_limit": attempt_limit,
        "timeout": timeout,
        "priority": priority,
        "group": group,
        "concurrency_key": concurrency_key,
    }
    return StepMessage.parse({k: v for k, v in body.items() if v is not None})


#: The keys of a tasker-core step message: its three UUIDs, and nothing else of ours.
TASKER_CORE_KEYS = ("task_uuid", "step_uuid", "correlation_id")


def is_tasker_core_step(text: str | bytes) -> bool:
    """Whether a message that is not a step of ours is one of tasker-core's: a JSON object with
    its three UUIDs (``task_uuid``, ``step_uuid``, ``correlation_id``) and none of the other
    keys of our step message (``namespace``, ``handler``, ``inputs``, ...). Its handler and
    inputs live in tasker-core's own tables, so only a tasker-core worker can run it: such a
    message is left on its queue, never dead-lettered (``domain/verdicts.py``:
    ``left_for_tasker_core``).

    Asked only of a message our decoder refused, so that ordinary steps pay nothing for it. A
    message naming any of our keys is ours (a malformed one, dead-lettered as ever)."""
    try:
        body = json.loads(text)
    except Exception:  # ValueError, RecursionError, ...: not tasker-core's, so ours (malformed)
        return False
    if not isinstance(body, dict) or not _OUR_KEYS.isdisjoint(body):
        return False
    for key in TASKER_CORE_KEYS:
        value = body.get(key)
        if not isinstance(value, str):
            return False
        try:
            uuid.UUID(value)
        except ValueError:
            return False
    return True


#: Where the package ships the step message's JSON Schema (docs/messages.md).
SCHEMA_FILE = "schemas/step_message.schema.json"


def step_message_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of a step message, generated from ``StepMessage`` (the
    validator the worker decodes with), so that the shipped file cannot say otherwise."""
    generated = msgspec.json.schema(StepMessage)
    body: dict[str, Any] = generated["$defs"]["StepMessage"]
    body.pop("title", None)
    body["description"] = (
        "A tasker-worker step: one unit of work stored as the message of a pgmq queue "
        "(worker_<namespace>_queue). Unknown keys are ignored."
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:tasker-worker:schema:step-message",
        "title": "StepMessage",
        **body,
    }


_DECODER = msgspec.json.Decoder(StepMessage, strict=False)
#: Every key of our step message beyond the UUIDs it shares with tasker-core's (read from the
#: struct, so that a key added to the contract counts at once).
_OUR_KEYS = frozenset(StepMessage.__struct_fields__) - frozenset(TASKER_CORE_KEYS)


def _undecodable(exc: Exception) -> StepValidationError:
    """The error of a message text no decoder could read without failing itself: PostgreSQL's
    jsonb accepts nesting 5000 deep, Python's decoders stop near 1000 (``RecursionError``)."""
    if isinstance(exc, RecursionError):
        what = "step message is nested too deeply to decode"
    else:
        what = f"step message could not be decoded ({type(exc).__name__}: {str(exc)[:200]})"
    return StepValidationError(what, reason="malformed_message")


def _readable(exc: msgspec.ValidationError) -> str:
    """``field: problem`` from msgspec's ``problem - at `$.field```."""
    text = str(exc).splitlines()[0]
    match = _WHERE.search(text)
    if match is None:
        return text
    return f"{match.group(1) or '<message>'}: {text[: match.start()]}"


class Source(enum.StrEnum):
    """How a message was found: announced by a notification, or found by looking."""

    EVENT = "event"
    POLL = "poll"


class OutcomeStatus(enum.StrEnum):
    """Final status of a step in ``tasker.step_results``."""

    SUCCEEDED = "succeeded"
    #: A definitive failure (``StepFailed``, or retries exhausted then dead-lettered).
    FAILED = "failed"
    #: Not runnable at all (malformed, unknown handler, non-retryable): dead-lettered.
    DEAD_LETTERED = "dead_lettered"
    #: Taken off its queue before it ran (``tasker.cancel_step``, ``Client.cancel``).
    CANCELLED = "cancelled"


@dataclass(slots=True)
class ClaimedMessage:
    """One message as returned by a claim, plus what this worker knows about it."""

    queue: str
    msg_id: int
    read_ct: int
    enqueued_at: datetime
    #: Server time of the claim, so latency needs no clock agreement between hosts.
    claimed_at: datetime
    #: The message's JSON text (decoded once, into ``step``, when it runs).
    body: str
    #: Always a JSON object or None (other JSON a raw producer may have written as headers,
    #: ``[1]`` or ``"x"``, is kept under ``tasker_raw_headers``: ``db/queue_client.py``'s
    #: ``_claimed``, as the claim stores it).
    headers: dict[str, Any] | None
    #: The outcome of this step_uuid is already recorded (dedup).
    already_done: bool
    source: Source
    #: Monotonic time when the claim returned (local clock).
    received_mono: float = 0.0
    step: StepMessage | None = field(default=None)
    #: The previous claim of this message, when it lapsed (neither settled nor put back before
    #: its vt): ``{"worker_id", "read_ct", "at"}`` as that claim wrote it into the headers.
    lapsed_claim: dict[str, Any] | None = None
    #: Monotonic time when the claim was sent (local clock; None: not known, ``received_mono``
    #: stands in). The server set the vt while the claim ran, so it lapses no later than this
    #: plus the vt: see ``vt_deadline``.
    claim_sent_mono: float | None = None

    def vt_deadline(self, vt_seconds: float) -> float:
        """The latest moment (local monotonic clock) at which this claim's vt can lapse.

        Counted from when the claim was *sent*, not from its reply: the server set the vt while
        the statement ran, somewhere between the two. From the reply, a claim that took long to
        come back (a slow network, a busy server, a reply held up for seconds) would seem to
        keep its message longer than it does, and a step could start or run on after another
        worker took it over."""
        start = self.received_mono if self.claim_sent_mono is None else self.claim_sent_mono
        return start + vt_seconds

    @property
    def step_uuid(self) -> str | None:
        """The step_uuid from the body, if there is a usable one."""
        if self.step is not None:
            return str(self.step.step_uuid)
        try:
            body = json.loads(self.body)
        except Exception:  # ValueError, RecursionError (nested too deep), ...: no usable id
            return None
        value = body.get("step_uuid") if isinstance(body, dict) else None
        return value if isinstance(value, str) else None

    def header_count(self, key: str) -> int:
        """The counter ``key`` of the headers (``tasker_releases``, ``tasker_snoozes``, ...),
        0 when absent or not a whole number: a raw producer may have written anything there,
        and a bad header must not fail the step's end (nor raise a bound by being huge)."""
        value = (self.headers or {}).get(key, 0)
        if type(value) is int:
            return max(0, value)
        if isinstance(value, float) and value.is_integer():
            return max(0, int(value))
        return 0


@dataclass(slots=True)
class Outcome:
    """What the runtime records for one finished claim (one row of the settle statement)."""

    msg: ClaimedMessage
    status: OutcomeStatus | None  # None: settle only (outcome already recorded)
    result: Any = None
    error: dict[str, Any] | None = None
    #: Epoch seconds (``time.time()``): cheaper on the hot path than datetimes.
    started_at: float | None = None
    finished_at: float | None = None
