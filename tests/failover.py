"""The failover drill, shared by ``tests/test_failover.py`` (reduced sizes, part of the default
test run) and ``benchmarks/failover.py`` (full sizes, the figures of ``docs/reliability.md``).

A primary and a streaming standby (``tests/replication.py``), two Hybrid ``tasker-worker run``
processes and a producer (the ``Client``, one send per transaction, each with its own
step_uuid, resent with the same step_uuid until acknowledged), all given the one multi-host URL
``host=primary,standby ... target_session_attrs=read-write``. Mid-stream the primary's WAL
sender is stopped (what the primary writes from then on does not reach the standby: a lagging
link), then the primary is killed with SIGKILL (postmaster and every backend) and the standby
promoted (``pg_ctl promote``). The workers and the producer find the new primary through the
URL alone.

Steps are ``ledger`` steps with ``in_tx``: the handler's ledger row commits in the step's own
transaction, with its outcome and the delete of its message. Afterwards:

- **lost sends** = acknowledged sends with no outcome on the new primary and no message in its
  queue or DLQ: a synchronous standby must lose none;
- **doubled** = steps with more than one ledger row on the new primary: none, ever (the
  outcome's key, step_results' primary key, decides which run counts);
- **re-run** = steps whose run recorded on the old primary is not the run recorded on the new
  one (read from the old primary's data directory, started again aside where no client can
  reach it): the outcomes that the failover forgot, and that ran again;
- **in flight at the kill**: the settles (outcome writes) that were waiting for the standby
  (``wait_event = 'SyncRep'``), and the claims that the primary had acknowledged but the standby
  never received (a claim commits with ``synchronous_commit = off``).

Times: the first step recorded after the kill (kill to ``finished_at``), the promotion, and
the workers' heartbeats, LISTEN connections and the supervision lock on the new primary.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import chaos
import psycopg
from replication import ReplicatedCluster, wait_for

from tasker_worker.config.models import TaskerConfig
from tasker_worker.fleet.leader import SUPERVISION_LOCK
from tasker_worker.producer.client import Client

NS = chaos.NS
QUEUE = chaos.QUEUE
DLQ = chaos.DLQ
#: How long a worker's claim hides a message: a claim the failover kept, whose worker lost its
#: outcome write, comes back after it.
VT = "2s"


@dataclass
class Drill:
    """What one failover did."""

    synchronous: bool
    workers: int
    sent: int = 0
    #: Acknowledged sends with no outcome, message or dead letter on the new primary.
    lost_sends: int = 0
    #: Sends acknowledged after the WAL sender stopped (what an asynchronous standby risks).
    acked_while_frozen: int = 0
    #: WAL the primary wrote beyond what the standby had received, at the kill (bytes).
    lag_bytes_at_kill: int = 0
    #: Seconds from the first lost acknowledged send to the kill (0 when none was lost).
    loss_window_s: float = 0.0
    #: Outcomes recorded on the old primary after the WAL sender stopped.
    outcomes_while_frozen: int = 0
    #: Steps whose run recorded on the old primary is not the one recorded on the new primary.
    rerun: int = 0
    #: Steps with more than one ledger row on the new primary.
    doubled: int = 0
    #: Successes on the new primary without exactly one ledger row.
    unmatched: int = 0
    #: Worker sessions whose commit (a settle) waited for the standby at the kill.
    settles_in_flight: int = 0
    #: The producer's send waited for the standby at the kill (synchronous only).
    send_in_flight: bool = False
    #: Claims the primary had acknowledged that the standby never received.
    forgotten_claims: int = 0
    #: Seconds from the kill: the standby promoted, the first step recorded on it.
    promoted_s: float = 0.0
    first_step_s: float | None = None
    #: Seconds from the promotion to the first step recorded on the new primary.
    first_step_after_promotion_s: float | None = None
    #: Seconds from the promotion until each was seen on the new primary.
    heartbeats_s: float | None = None
    listeners_s: float | None = None
    supervisor_s: float | None = None
    #: Outcomes on the new primary after the promotion that a notification brought.
    event_pickups_after: int = 0
    #: Sends that failed (and were sent again with the same step_uuid) around the failover.
    send_retries: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)


class Producer(threading.Thread):
    """Sends ledger steps through the multi-host URL, one per transaction, until stopped: each
    step_uuid is sent again after a failure until acknowledged (``send_step`` with a step_uuid is
    idempotent), and counted as acknowledged only once the send returned."""

    def __init__(self, url: str, *, interval_s: float, step_sleep_s: float) -> None:
        super().__init__(daemon=True, name="failover-producer")
        self.url = url
        self.interval_s = interval_s
        self.step_sleep_s = step_sleep_s
        self.acked: list[tuple[str, float]] = []
        self.retries = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def count(self) -> int:
        """Sends acknowledged so far."""
        with self._lock:
            return len(self.acked)

    def stop(self) -> None:
        """Finish the send under way (bounded) and stop."""
        self._halt.set()
        self.join(timeout=60)
        if self.is_alive():
            raise AssertionError("the producer did not stop")
        if self.error is not None:
            raise AssertionError(f"the producer failed: {self.error!r}")

    def run(self) -> None:
        try:
            config = TaskerConfig.model_validate({"database": {"connect_timeout": "2s"}})
            with Client(self.url, config=config, max_size=2) as client:
                while not self._halt.is_set():
                    step_uuid = str(uuid.uuid4())
                    self._send(client, step_uuid)
                    self._halt.wait(self.interval_s)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def _send(self, client: Client, step_uuid: str) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.send_step(
                    NS, "ledger", {"in_tx": True, "sleep": self.step_sleep_s}, step_uuid=step_uuid, notify=False
                )
            except Exception:
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                self._halt.wait(0.02)  # the pool replaces its broken connection meanwhile
                continue
            with self._lock:
                self.acked.append((step_uuid, time.time()))
            return


def _sync_rep_waiters(cluster: ReplicatedCluster) -> dict[str, int]:
    """Sessions of the primary waiting for the standby, by application_name."""
    rows = cluster.primary.rows(
        "SELECT application_name, count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep' GROUP BY 1"
    )
    return {str(name): int(n) for name, n in rows}


def _claims(node: Any) -> dict[int, int]:
    """msg_id -> read_ct of every message of the queue that was ever claimed."""
    return {int(m): int(r) for m, r in node.rows(f"SELECT msg_id, read_ct FROM pgmq.q_{QUEUE} WHERE read_ct > 0")}


def _outcomes(url: str) -> int:
    return chaos.outcomes(url)


def failover_drill(
    cluster: ReplicatedCluster,
    *,
    workers: int = 2,
    concurrency: int = 4,
    before: int = 60,
    while_frozen: int = 10,
    after: int = 40,
    interval_s: float = 0.005,
    step_sleep_s: float = 0.1,
    outage_s: float = 0.0,
) -> Drill:
    """Run the drill on ``cluster`` (its primary freshly migrated): ``before`` outcomes before
    the WAL sender stops, ``while_frozen`` sends and outcomes (asynchronous standby; a
    synchronous one blocks them) before the kill, ``after`` acknowledged sends after the
    promotion; then drain and compare. The caller owns the cluster (and stops it)."""
    t0 = time.monotonic()
    drill = Drill(synchronous=cluster.synchronous, workers=workers)
    url = cluster.url
    chaos.prepare(url)
    env = chaos.base_env(
        url,
        TASKER__EVENT_SYSTEM__FALLBACK_POLLER__VISIBILITY_TIMEOUT=VT,
        TASKER__EVENT_SYSTEM__LISTENER__MAX_RECONNECT_DELAY="1s",
        TASKER__DATABASE__CONNECT_TIMEOUT="2s",
    )
    fleet = [chaos.start_run(env, "--mode", "Hybrid", "--concurrency", str(concurrency)) for _ in range(workers)]
    producer = Producer(url, interval_s=interval_s, step_sleep_s=step_sleep_s)
    stats: list[dict[str, Any]] = []
    try:
        active = "SELECT count(*) FROM tasker.workers WHERE status = 'active'"
        wait_for(lambda: cluster.primary.value(active) == workers, 60, f"{workers} active workers")
        wait_for(_supervisor_held(cluster.primary.url()), 30, "a supervision leader")
        producer.start()
        wait_for(lambda: _outcomes(url) >= before, 60, f"{before} outcomes before the freeze")

        # The link to the standby stalls: the primary's WAL from here on never reaches it.
        frozen_lsn = cluster.standby.value("SELECT pg_last_wal_receive_lsn()::text")
        cluster.freeze_replication()
        frozen_acks = producer.count()
        frozen_outcomes = _outcomes(cluster.primary.url())

        def claims_forgotten() -> int:
            # Claims the primary acknowledged (synchronous_commit = off) that the standby lacks.
            on_standby = _claims(cluster.standby)
            return sum(1 for m, r in _claims(cluster.primary).items() if on_standby.get(m, 0) < r)

        if cluster.synchronous:
            # Every commit now waits for the standby: a worker's settle and the producer's send
            # are in flight when the primary dies. (Claims, asynchronous commits, do not wait;
            # but the worker's pool soon holds only connections whose commits wait, so whether a
            # claim the standby lacks is made first is left to chance here: the asynchronous
            # drill waits for one.)
            def in_flight() -> bool:
                waiting = _sync_rep_waiters(cluster)
                return waiting.get("tasker-worker", 0) >= 1 and waiting.get("tasker-client", 0) >= 1

            wait_for(in_flight, 30, "a settle and a send waiting for the standby")
        else:
            wait_for(
                lambda: (
                    producer.count() - frozen_acks >= while_frozen
                    and _outcomes(cluster.primary.url()) - frozen_outcomes >= while_frozen
                    and claims_forgotten() >= 1
                ),
                30,
                f"{while_frozen} sends and outcomes committed while the standby lags",
            )
        waiting = _sync_rep_waiters(cluster)
        drill.settles_in_flight = waiting.get("tasker-worker", 0)
        drill.send_in_flight = waiting.get("tasker-client", 0) > 0
        on_primary = _claims(cluster.primary)
        drill.lag_bytes_at_kill = int(
            cluster.primary.value("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (frozen_lsn,))
        )

        kill_wall = time.time()
        killed = cluster.kill_primary()
        drill.acked_while_frozen = producer.count() - frozen_acks  # none can be acknowledged now
        # What the standby will have: everything it received before the link went quiet.
        wait_for(
            lambda: cluster.standby.value(
                "SELECT pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn()"
                " AND NOT EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')"
            ),
            30,
            "the standby to replay what it received",
        )
        on_standby = _claims(cluster.standby)
        drill.forgotten_claims = sum(1 for m, r in on_primary.items() if on_standby.get(m, 0) < r)
        if outage_s > 0:
            # The scenario's outage: what a failover manager takes to decide (not a wait for a
            # state: nothing can happen until the promotion).
            time.sleep(max(0.0, killed + outage_s - time.monotonic()))
        promoted = cluster.promote()
        promoted_wall = time.time() - (time.monotonic() - promoted)
        drill.promoted_s = round(promoted - killed, 3)

        new = cluster.standby
        drill.heartbeats_s = _seen_after(
            promoted,
            lambda: (
                new.value(
                    "SELECT count(*) FROM tasker.workers WHERE status = 'active' AND last_heartbeat_at > to_timestamp(%s)",
                    (kill_wall,),
                )
                == workers
            ),
            "every worker heartbeating on the new primary",
        )
        drill.listeners_s = _seen_after(
            promoted,
            lambda: (
                new.value(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tasker-listener'"
                    " AND backend_start > to_timestamp(%s)",
                    (kill_wall,),
                )
                == workers
            ),
            "every worker's LISTEN connection on the new primary",
        )
        drill.supervisor_s = _seen_after(
            promoted, _supervisor_held(new.url()), "the supervision lock on the new primary"
        )
        at_promotion = producer.count()
        wait_for(lambda: producer.count() - at_promotion >= after, 60, f"{after} sends after the promotion")
        producer.stop()

        # Drained: every message the new primary holds has its outcome (or is dead-lettered).
        wait_for(
            lambda: new.value(f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 0,
            60,
            "the new primary's queue to drain",
        )
        # The first outcome committed after the kill (so on the new primary): commit times,
        # not finished_at (a handler may have finished before the promotion, its outcome after).
        first = new.value(
            "SELECT extract(epoch FROM min(pg_xact_commit_timestamp(xmin))) FROM tasker.step_results"
            " WHERE pg_xact_commit_timestamp(xmin) > to_timestamp(%s)",
            (kill_wall,),
        )
        drill.first_step_s = None if first is None else round(float(first) - kill_wall, 3)
        if first is not None:
            drill.first_step_after_promotion_s = round(float(first) - promoted_wall, 3)
        drill.event_pickups_after = int(
            new.value(
                "SELECT count(*) FROM tasker.step_results"
                " WHERE pg_xact_commit_timestamp(xmin) > to_timestamp(%s) AND source = 'event'",
                (promoted_wall,),
            )
        )
    finally:
        with contextlib.suppress(AssertionError):
            if producer.is_alive():
                producer.stop()
        for proc in fleet:
            code, err = chaos.stop(proc)
            stats.append({"exit_code": code, **chaos.final_stats(err).get("counters", {})})
    drill.sent = producer.count()
    drill.send_retries = producer.retries
    _compare(cluster, drill, producer.acked, frozen_outcomes, kill_wall)
    drill.details["workers"] = [
        {
            k: s.get(k)
            for k in ("exit_code", "listener_reconnects", "db_errors", "succeeded", "stale_acks", "dedup_hits")
        }
        for s in stats
    ]
    drill.seconds = round(time.monotonic() - t0, 2)
    return drill


def _seen_after(start: float, predicate: Any, what: str) -> float:
    wait_for(predicate, 60, what)
    return round(time.monotonic() - start, 3)


def _supervisor_held(url: str) -> Any:
    key = int(SUPERVISION_LOCK)

    def held() -> bool:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s"
                " AND a.application_name LIKE 'tasker-supervisor:%%'",
                ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
            ).fetchone()
        return bool(row and row[0] == 1)

    return held


def _compare(
    cluster: ReplicatedCluster, drill: Drill, acked: list[tuple[str, float]], frozen_outcomes: int, kill_wall: float
) -> None:
    """Fill the losses, re-runs and doubles from the new primary and the old one's data."""
    new = cluster.standby
    result = chaos.verify(new.url(), [{"step_uuid": u} for u, _ in acked], chaos.Result("failover", len(acked)))
    drill.lost_sends = result.lost
    present = {u for (u,) in new.rows("SELECT step_uuid::text FROM tasker.step_results")}
    present |= {u for (u,) in new.rows(f"SELECT message->>'step_uuid' FROM pgmq.q_{QUEUE}")}
    present |= {u for (u,) in new.rows(f"SELECT message->>'step_uuid' FROM pgmq.q_{DLQ}")}
    lost_at = [at for u, at in acked if u not in present]
    drill.loss_window_s = round(kill_wall - min(lost_at), 3) if lost_at else 0.0
    drill.doubled = result.doubled
    drill.unmatched = int(result.details.get("successes_without_one_ledger_row", 0))
    drill.details["dead_lettered"] = result.dead_lettered
    new_runs: dict[str, set[str]] = {}
    for step_uuid, run_id in new.rows("SELECT step_uuid::text, run_id FROM public.ledger"):
        new_runs.setdefault(step_uuid, set()).add(run_id)
    old = cluster.start_old_primary_aside()
    old_runs = old.rows("SELECT step_uuid::text, run_id FROM public.ledger")
    drill.rerun = sum(1 for step_uuid, run_id in old_runs if run_id not in new_runs.get(step_uuid, set()))
    drill.outcomes_while_frozen = int(old.value("SELECT count(*) FROM tasker.step_results")) - frozen_outcomes
    old_sent = {u for (u,) in old.rows(f"SELECT message->>'step_uuid' FROM pgmq.q_{QUEUE}")} | {
        u for (u,) in old.rows("SELECT step_uuid::text FROM tasker.step_results")
    }
    new_sent = {u for (u,) in new.rows(f"SELECT message->>'step_uuid' FROM pgmq.q_{QUEUE}")} | {
        u for (u,) in new.rows("SELECT step_uuid::text FROM tasker.step_results")
    }
    new_sent |= {u for (u,) in new.rows(f"SELECT message->>'step_uuid' FROM pgmq.q_{DLQ}")}
    drill.details["old_primary_steps_missing_on_new"] = len(old_sent - new_sent)
