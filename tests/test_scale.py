"""What the database pays as a deployment grows, against a real PostgreSQL: an idle worker's
poll does not grow with its namespaces, outcome rows past the retention horizon go, and a
notification is claimed once however many workers hear it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tasker_worker.domain.steps import StepMessage
from tasker_worker.runtime.worker import Worker
from tasker_worker.testing import fetch, fetch_value, make_config, outcomes_at_least, running_worker, wait_until

MANY = [f"ns{i:02d}" for i in range(20)]


def counter(worker: Worker, name: str) -> int:
    return int(worker.status()["counters"].get(name, 0))


@pytest.mark.anyio
async def test_an_idle_poll_asks_once_for_all_namespaces(db_url: str) -> None:
    """A PollingOnly worker on 20 namespaces polling every 100 ms: each poll is one probe of all
    its queues, and claims only where a message is visible (before: a claim per queue per poll)."""
    config = make_config(
        mode="PollingOnly", namespaces=MANY, overrides={"event_system.fallback_poller.polling_interval": "100ms"}
    )
    async with running_worker(db_url, config) as worker:
        await wait_until(lambda: counter(worker, "queue_probes") >= 5, timeout=10)
        assert counter(worker, "claims_poll") == 0  # nothing visible: no claim at all
        body = StepMessage.build("ns07", "noop", {})
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute("SELECT pgmq.send('worker_ns07_queue', %s)", (Jsonb(body),))
        await wait_until(outcomes_at_least(db_url, 1), timeout=10)
        probes = counter(worker, "queue_probes")
        await wait_until(lambda: counter(worker, "queue_probes") >= probes + 3, timeout=10)
        claims = counter(worker, "claims_poll")
    assert claims == 1  # the one queue that had a message, once


#: An idle worker's life in the test below: it starts, polls this many times, stops.
IDLE_POLLS = 10
#: Row writes to this database's catalogs. The shared catalogs (pg_database, pg_authid, ...) are
#: left out: every database sees their counters, so another test's database dropped or role
#: made, reported when its session exits, would count in this one's life.
CATALOG_WRITES = (
    "SELECT s.relname, s.n_tup_ins + s.n_tup_upd + s.n_tup_del FROM pg_stat_sys_tables AS s"
    " JOIN pg_class AS c ON c.oid = s.relid WHERE s.schemaname = 'pg_catalog' AND NOT c.relisshared"
)


#: Autovacuum's visits to this database's tables so far (a life it visited is measured again,
#: at most LIFE_ATTEMPTS times).
AUTOVACUUM_VISITS = (
    "SELECT coalesce(sum(s.autovacuum_count + s.autoanalyze_count), 0) FROM pg_stat_all_tables AS s"
    " JOIN pg_class AS c ON c.oid = s.relid WHERE NOT c.relisshared"
)
LIFE_ATTEMPTS = 3


async def _catalog_writes(url: str) -> dict[str, int]:
    """Row writes so far to each of this database's catalogs."""
    return {str(name): int(n) for name, n in await fetch(url, CATALOG_WRITES)}


def _polls(worker: Worker) -> int:
    """Safety polls done: a claim with one namespace, else one probe of all of them."""
    return counter(worker, "claims_poll") + counter(worker, "queue_probes")


async def _final_commits(admin_url: str, dbname: str) -> int:
    """``pg_stat_database.xact_commit`` of ``dbname`` once no session is connected to it: a
    backend reports its counts late (up to 10 s) but always when it exits, so from then on the
    count is exact. Read from the admin database, which costs the counted one nothing."""

    async def nobody_connected() -> bool:
        return not await fetch_value(admin_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,))

    await wait_until(nobody_connected, timeout=30)
    return int(await fetch_value(admin_url, "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (dbname,)))


@pytest.mark.anyio
async def test_an_idle_worker_commits_as_much_with_20_namespaces_as_with_1(db_url: str, pg_admin_url: str) -> None:
    """A Hybrid worker's whole life (start, ten 100 ms polls, stop) on 1 and on 20 namespaces,
    counted by the server: the transactions it committed (pg_stat_database, exact once its
    sessions ended: every commit, whether a statement was logged for it or not) do not grow
    with the namespaces, and a start on existing queues writes no catalog row. Before: each
    namespace cost a LISTEN per channel on each of two connections and a queue creation, 7
    transactions, and 10 rewritten pg_class rows (its GRANTs) that autovacuum cleaned up later."""
    dbname = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        # Both workers find their queues made ...
        await conn.execute("SELECT tasker.create_namespace_queue(ns) FROM unnest(%s::text[]) AS ns", (MANY,))
        # ... and the outcome table's day partitions that the supervisor keeps made ahead (the
        # first life would create them: catalog rows that have nothing to do with namespaces).
        await conn.execute(
            "SELECT tasker.create_history_partition((now() AT TIME ZONE 'UTC')::date + d, 5000)"
            " FROM generate_series(0, 4) AS d"
        )
    # ... and the catalog analysed, from a session of its own once the setup's has ended: a
    # session reports its writes when it exits, and reported after the ANALYZE they made the
    # catalogs look modified since, so that autovacuum analysed them during a life.
    await _final_commits(pg_admin_url, str(dbname))
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("VACUUM (ANALYZE)")
    overrides = {
        "event_system.fallback_poller.polling_interval": "100ms",
        # One heartbeat and one round of supervision jobs per life (both at its start): what
        # these cost does not depend on the namespaces, and their count then not on timing.
        "registry.heartbeat_interval": "30s",
        "registry.stale_timeout": "2m",
        "registry.activate_interval": "30s",
        "registry.stale_check_interval": "30s",
        "registry.reactivate_interval": "30s",
    }
    lives: dict[int, tuple[int, dict[str, int]]] = {}
    disturbed: list[int] = []
    for namespaces in (MANY[:1], MANY):
        for _ in range(LIFE_ATTEMPTS):
            # Every earlier session gone first: a backend reports its catalog writes when it
            # exits, and the setup's (a partition made, ANALYZE) read late counted in the first life.
            await _final_commits(pg_admin_url, str(dbname))
            catalog = await _catalog_writes(db_url)
            visits = await fetch_value(db_url, AUTOVACUUM_VISITS)
            before = await _final_commits(pg_admin_url, str(dbname))
            config = make_config(mode="Hybrid", namespaces=namespaces, overrides=overrides)
            async with running_worker(db_url, config) as worker:
                await wait_until(lambda w=worker: _polls(w) >= IDLE_POLLS, timeout=30)
            commits = await _final_commits(pg_admin_url, str(dbname)) - before
            after = await _catalog_writes(db_url)
            # Which catalogs were written, if any: what a failure needs to be understood.
            lives[len(namespaces)] = (
                commits,
                {k: n - catalog.get(k, 0) for k, n in after.items() if n != catalog.get(k, 0)},
            )
            if await fetch_value(db_url, AUTOVACUUM_VISITS) == visits:
                break
            # Autovacuum visited the database during this life: its transactions and its
            # ANALYZE's pg_statistic rows count as the worker's; that life is measured again.
            disturbed.append(len(namespaces))
    (one, one_catalog), (many, many_catalog) = lives[1], lives[len(MANY)]
    assert one_catalog == {} and many_catalog == {}, (lives, disturbed)
    # A margin for what timing may add to either life (a pooled connection more, a poll more);
    # before, 20 namespaces cost 133 transactions more.
    assert many <= one * 1.2 + 3, (lives, disturbed)


OLD_ROWS = """
INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, handler, status, attempts,
                                 worker_id, finished_at)
SELECT gen_random_uuid(), %(ns)s, 'worker_' || %(ns)s || '_queue', g, 'noop', 'succeeded', 1, 'old',
       clock_timestamp() - %(age)s::interval
  FROM generate_series(1, %(n)s) AS g
"""


@pytest.mark.anyio
async def test_retention_prunes_past_the_horizon_and_dedup_holds_inside_it(db_url: str) -> None:
    """The elected supervisor of a running worker deletes outcome rows past [retention] outcomes
    (7 days; 30 for the namespace "audit") in batches; a step re-sent while its outcome row is
    kept is still not run again, and one re-sent after it was pruned runs again (the documented
    dedup horizon)."""
    from ledger_handlers import LEDGER_DDL, ledger

    from tasker_worker.handlers.registry import HandlerRegistry
    from tasker_worker.testing import fetch

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(LEDGER_DDL)
        for ns in ("plain", "audit"):
            await conn.execute("SELECT tasker.create_namespace_queue(%s)", (ns,))
        for ns, age, n in (
            ("plain", "10 days", 12_000),
            ("plain", "1 hour", 10),
            ("audit", "10 days", 20),
            ("audit", "40 days", 30),
        ):
            await conn.execute(OLD_ROWS, {"ns": ns, "age": age, "n": n})
        kept = StepMessage.build("plain", "ledger", {})
        pruned = StepMessage.build("plain", "ledger", {})
        for body, age in ((kept, "6 days"), (pruned, "8 days")):
            await conn.execute(
                "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, handler, status,"
                " attempts, worker_id, finished_at, uuid_time) VALUES (%s, 'plain', 'worker_plain_queue', 0, 'ledger',"
                " 'succeeded', 1, 'earlier', clock_timestamp() - %s::interval, tasker.uuid_time(%s))",
                (body["step_uuid"], age, body["step_uuid"]),
            )
    reg = HandlerRegistry()
    reg.register("ledger", ledger)
    config = make_config(
        mode="Hybrid",
        namespaces=["plain", "audit"],
        overrides={
            "retention.interval": "100ms",
            "retention.namespaces": {"audit": {"outcomes": "30d"}},
            "registry.supervision_enabled": True,
        },
    )
    import types

    async with running_worker(db_url, config, registry=reg, state=types.SimpleNamespace(ledger_url=db_url)):

        async def pruned_all() -> bool:
            return (
                await fetch_value(
                    db_url,
                    "SELECT count(*) FROM tasker.step_results WHERE finished_at < now() - interval '7 days' AND namespace = 'plain'",
                )
                == 0
            )

        await wait_until(pruned_all, timeout=30)
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            for body in (kept, pruned):
                await conn.execute("SELECT pgmq.send('worker_plain_queue', %s)", (Jsonb(body),))

        async def queue_empty() -> bool:
            return await fetch_value(db_url, "SELECT count(*) FROM pgmq.q_worker_plain_queue") == 0

        await wait_until(queue_empty, timeout=20)
    by_ns = dict(
        await fetch(
            db_url,
            "SELECT namespace || ' ' || (finished_at < now() - interval '20 days')::text, count(*) FROM tasker.step_results GROUP BY 1",
        )
    )
    # plain: the 10 recent rows, the kept step's row, the pruned step's new row; audit: its
    # 10-day-old rows (inside its 30 days), not its 40-day-old ones.
    assert by_ns == {"plain false": 12, "audit false": 20}
    runs = dict(await fetch(db_url, "SELECT step_uuid::text, count(*) FROM public.ledger GROUP BY 1"))
    assert runs == {pruned["step_uuid"]: 1}  # the kept step was deduplicated, the pruned one ran again


def test_a_retention_shorter_than_the_retry_horizon_is_refused() -> None:
    """Outcome rows kept for less than a step can wait for its outcome would let a redelivered
    step run again: such a configuration is refused, naming the key."""
    from tasker_worker.config.models import TaskerConfig
    from tasker_worker.errors import ConfigError

    # The defaults: vt 30 s, 2 retries of 1 s and 2 s, 100 releases of 30 s, jitter 20%.
    assert TaskerConfig().retry_horizon().total_seconds() == pytest.approx(30 + (1 + 2 + 100 * 30) * 1.2)
    with pytest.raises(ConfigError, match=r"^retention\.outcomes: 30m is shorter than a step can wait"):
        TaskerConfig(retention={"outcomes": "30m"})
    with pytest.raises(ConfigError, match=r"^retention\.namespaces\.audit\.outcomes: 10m is shorter"):
        TaskerConfig(retention={"namespaces": {"audit": {"outcomes": "10m"}}})
    # Fewer releases make a shorter horizon acceptable.
    config = TaskerConfig(retention={"outcomes": "30m"}, retry={"max_releases": 10})
    assert config.retry_horizon() < config.retention.outcomes


HERD_NS = "herd"


def _herd_config(**extra: Any) -> Any:
    return make_config(
        mode="Hybrid",
        namespaces=[HERD_NS],
        overrides={
            # Only notifications (and the takeover after the grace) can claim in these tests.
            "event_system.fallback_poller.polling_interval": "10m",
            "event_system.fallback_poller.degraded_interval": "10m",
            "registry.heartbeat_interval": "200ms",
            "registry.stale_timeout": "60s",
            **extra,
        },
    )


def _claims(worker: Worker) -> int:
    return counter(worker, "claims_event") + counter(worker, "claims_poll")


def _deferrals_settled(worker: Worker) -> bool:
    looked = counter(worker, "claims_taken_over") + counter(worker, "claims_left_to_peers")
    return looked == counter(worker, "claims_deferred")


def _knows(worker: Worker, n: int) -> bool:
    ranking = worker.processor.ranking if worker.processor is not None else None
    return ranking is not None and ranking.fleet(HERD_NS) == n


async def _send_one_by_one(db_url: str, n: int) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        for i in range(n):
            await conn.execute(
                "SELECT pgmq.send('worker_herd_queue', %s)", (Jsonb(StepMessage.build(HERD_NS, "noop", {"i": i})),)
            )
            await wait_until(outcomes_at_least(db_url, i + 1), timeout=10)


@pytest.mark.anyio
@pytest.mark.parametrize("single_claimer", [True, False])
async def test_a_notification_is_claimed_once_however_many_workers_hear_it(db_url: str, single_claimer: bool) -> None:
    """Four listening workers, 40 steps sent one at a time: with single_claimer each step costs
    about one claim in all (before: one per worker, three of them empty)."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("SELECT tasker.create_namespace_queue(%s)", (HERD_NS,))
    # A long grace: this test counts claims, so a first choice slowed by a loaded machine must
    # not make the others step in (the takeover has a test of its own).
    config = _herd_config(
        **{"event_system.listener.single_claimer": single_claimer, "event_system.listener.claim_grace": "1s"}
    )
    async with (
        running_worker(db_url, config) as a,
        running_worker(db_url, config) as b,
        running_worker(db_url, config) as c,
        running_worker(db_url, config) as d,
    ):
        fleet = [a, b, c, d]
        if single_claimer:
            await wait_until(lambda: all(_knows(w, 4) for w in fleet), timeout=10)
        before = sum(_claims(w) for w in fleet)
        await _send_one_by_one(db_url, 40)
        # Every worker that waited behind a first choice has looked again (after the grace).
        await wait_until(lambda: all(_deferrals_settled(w) for w in fleet), timeout=10)
        claims = sum(_claims(w) for w in fleet) - before
        by_worker = [counter(w, "claimed_event") + counter(w, "claimed_poll") for w in fleet]
        claimed = sum(by_worker)
    assert claimed == 40
    if single_claimer:
        assert claims <= 44, f"{claims} claims for 40 steps"  # at most a few empty ones
        assert sum(1 for n in by_worker if n > 0) >= 3, by_worker  # shared out by the ranking
    else:
        assert claims >= 100, f"{claims} claims for 40 steps"  # the herd this mechanism avoids


@pytest.mark.anyio
async def test_a_silent_first_choice_is_taken_over_after_the_grace(db_url: str) -> None:
    """A registered listening worker that never claims (dead, or stuck) is first in line for
    about half the messages: the live worker claims those itself after the grace, so every
    step still runs, with no poll to help."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("SELECT tasker.create_namespace_queue(%s)", (HERD_NS,))
        await conn.execute(
            "INSERT INTO tasker.workers (worker_id, name, hostname, pid, namespaces, capabilities, version,"
            " deployment_mode, cpu_cores, memory_total, status, busy, registered_at, status_changed_at,"
            " last_heartbeat_at) VALUES ('silent', 'silent', 'nowhere', 1, ARRAY[%s], ARRAY[]::text[], 'x',"
            " 'Hybrid', 1, 0, 'active', false, now(), now(), now())",
            (HERD_NS,),
        )
    async with running_worker(db_url, _herd_config()) as worker:
        await wait_until(lambda: _knows(worker, 2), timeout=10)
        await _send_one_by_one(db_url, 20)
        taken_over = counter(worker, "claims_taken_over")
        claims = _claims(worker)
    assert taken_over >= 1  # the silent worker was first for some of them
    assert claims <= 22
