"""The official pgmq client works unchanged against a migrated database."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from listening import notifications_so_far
from pgmq import PGMQueue


@pytest.mark.filterwarnings("ignore:list_queues")
def test_official_client_full_cycle(db_url: str) -> None:
    client = PGMQueue(conn_string=db_url, init_extension=False)
    listener = psycopg.connect(db_url, autocommit=True)
    listener.execute('LISTEN "pgmq_message_ready.compat"')
    try:
        client.create_queue("worker_compat_queue")
        assert "worker_compat_queue" in [q.queue_name for q in client.list_queues()]

        msg_id = client.send("worker_compat_queue", {"hello": "world"})
        notes = [json.loads(n.payload) for n in notifications_so_far(listener)]
        assert [n["msg_id"] for n in notes] == [msg_id]
        assert notes[0]["event_type"] == "message_ready"

        batch = client.send_batch("worker_compat_queue", [{"n": i} for i in range(5)])
        assert len(batch) == 5
        notes = [json.loads(n.payload) for n in notifications_so_far(listener)]
        assert len(notes) == 1 and notes[0]["message_count"] == 5

        read = client.read("worker_compat_queue", vt=30)
        assert read is not None and read.msg_id == msg_id and read.message == {"hello": "world"}
        updated = client.set_vt("worker_compat_queue", read.msg_id, 0)
        assert updated.msg_id == msg_id
        assert client.archive("worker_compat_queue", msg_id)

        batch_read = client.read_batch("worker_compat_queue", vt=30, batch_size=2) or []
        assert [m.msg_id for m in batch_read] == batch[:2]
        assert client.delete("worker_compat_queue", batch_read[0].msg_id)
        popped = client.pop("worker_compat_queue")
        assert popped is not None and popped.msg_id == batch[2]

        metrics: Any = client.metrics("worker_compat_queue")
        assert metrics.queue_length == 3  # batch[1] (in flight), batch[3], batch[4]
        assert metrics.total_messages == 6
        client.drop_queue("worker_compat_queue")
        assert "worker_compat_queue" not in [q.queue_name for q in client.list_queues()]
    finally:
        listener.close()
        client.pool.close()
