"""NOTIFY payloads (DESIGN.md "NOTIFY"), parsed without I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class MessageReady:
    """A notification that a queue has ready (or soon ready) messages."""

    event_type: str
    queue_name: str
    namespace: str
    msg_ids: tuple[int, ...]
    message_count: int
    ready_at: datetime | None
    #: Range of ids the statement inserted (present when ``msg_ids`` is truncated).
    min_msg_id: int | None = None
    max_msg_id: int | None = None

    @classmethod
    def from_payload(cls, payload: str) -> MessageReady | None:
        """Parse a payload; ``None`` for anything that is not a valid message_ready event."""
        try:
            data = json.loads(payload)
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict):
            return None
        event_type = data.get("event_type")
        queue = data.get("queue_name")
        if event_type not in ("message_ready", "batch_ready") or not isinstance(queue, str):
            return None
        ids: list[int] = []
        if isinstance(data.get("msg_id"), int):
            ids.append(data["msg_id"])
        raw_ids = data.get("msg_ids")
        if isinstance(raw_ids, list):
            ids.extend(i for i in raw_ids if isinstance(i, int))
        count = data.get("message_count", len(ids) or 1)
        ready_at: datetime | None = None
        raw_ready = data.get("ready_at")
        if isinstance(raw_ready, str):
            try:
                ready_at = datetime.fromisoformat(raw_ready)
            except ValueError:
                ready_at = None
        return cls(
            event_type=event_type,
            queue_name=queue,
            namespace=str(data.get("namespace") or queue),
            msg_ids=tuple(ids),
            message_count=count if isinstance(count, int) else len(ids),
            ready_at=ready_at,
            min_msg_id=data.get("min_msg_id") if isinstance(data.get("min_msg_id"), int) else None,
            max_msg_id=data.get("max_msg_id") if isinstance(data.get("max_msg_id"), int) else None,
        )
