"""Break each guarantee on purpose and check that the tests notice (a mutation check).

Not part of the default test run. Each mutation below is a named breakage of one guarantee
(a fence removed, a backoff ignored, a dedup probe disabled, ...) written as exact text edits
of the source. For each one this script copies the working tree to a scratch directory,
applies the edits, runs the tests that should catch it, and reports whether they failed
(*killed*: good) or passed (*survived*: the guarantee is not held in place by any test).

    python tests/mutations.py            # every mutation; exit 1 if any survives
    python tests/mutations.py --list     # names and guarantees
    python tests/mutations.py fence_retry dedup_claim_skipping   # just these

An edit whose text no longer occurs in the source is an error, not a silent pass: when the
code moves, the mutation must move with it. Run this before resolving an issue that touches the
step path, and add a mutation (and the test that kills it) for every guarantee you add.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: One mutation's test run may take this long before it counts as killed (a hang is noticed).
RUN_TIMEOUT_S = 600


@dataclass(frozen=True)
class Edit:
    """Replace ``old`` by ``new`` in ``path``: exactly ``count`` times (None: every time, at
    least once)."""

    path: str
    old: str
    new: str
    count: int | None = 1


@dataclass(frozen=True)
class Mutation:
    """A breakage of one guarantee and the tests that must catch it."""

    name: str
    guarantee: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


G = "tests/test_guarantees.py::"
R = "tests/test_runtime.py::"
S = "tests/test_scale.py::"
FENCE_TESTS = (G + "test_a_stale_holder_cannot_write_anything_about_a_step_taken_over",)
M0002 = "sql/migrations/0002_step_outcomes.sql"
M0007 = "sql/migrations/0007_one_row_per_step.sql"
Q = "tasker_worker/db/queries.py"
V = "tasker_worker/domain/verdicts.py"
HI = "tests/test_hostile_input.py::"
M0016 = "sql/migrations/0016_flow_control.sql"
#: The definitions in force of claim_steps, dead_letter_steps, record_outcomes, cancel_step,
#: enqueue_step and step_message (0021 redefined them for the partitioned history; claim_flow
#: too, redefined again by 0025).
M0021 = "sql/migrations/0021_partitioned_history.sql"
H = "tests/test_history.py::"
F = "tests/test_flow.py::"
ST = "tests/test_store.py::"
HC = "tests/test_handler_control.py::"
M0015 = "sql/migrations/0015_tasker_core_wire.sql"
TC = "tests/test_tasker_core.py::"
CH = "tests/test_channels.py::"
M0024 = "sql/migrations/0024_notify_decision_row.sql"
#: The definition in force of claim_flow (0025 redefined it: headers that are no object).
M0025 = "sql/migrations/0025_object_headers.sql"
NS = "tests/test_notify_skip.py::"
CL = "tests/test_clusters.py::"
LISTENER = "tasker_worker/runtime/listener.py"
FO = "tests/test_failover.py::"
RR = "tests/test_read_replica.py::"
#: An idle worker's transactions (start, polls, stop) do not grow with its namespaces.
IDLE_COMMITS = "test_an_idle_worker_commits_as_much_with_20_namespaces_as_with_1"
#: A tasker-core step in a Hybrid worker's queue: left untouched, ours still run and dead-letter.
CORE_STEP_TESTS = (TC + "test_a_tasker_core_step_survives_a_hybrid_worker_untouched",)
#: One rule of the rulebook broken: a dependency outage uses up an attempt. The runner reads it
#: in production and in the harness alike, so it must be caught on both stores (two mutations).
RELEASE_RULE = Edit(
    V, "verdict.delay_s,\n            count_attempt=False,", "verdict.delay_s,\n            count_attempt=True,"
)

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "vt_extension_noop",
        "a running step's vt is extended (extend_vt leaves vt as it was)",
        (Edit(M0002, "SET vt = clock_timestamp() + make_interval(secs => $3 / 1000.0)", "SET vt = q.vt"),),
        (G + "test_a_step_slower_than_its_vt_is_never_claimed_by_anyone_else",),
    ),
    Mutation(
        "vt_keeper_idle",
        "the worker extends the vt of steps running past half of it (the keeper never does)",
        (
            Edit(
                "tasker_worker/runtime/processor.py",
                "if not item.lost_claim and item.vt_deadline - now < self.vt_seconds / 2:",
                "if False:",
            ),
        ),
        (G + "test_a_step_slower_than_its_vt_is_never_claimed_by_anyone_else",),
    ),
    Mutation(
        "vt_counted_from_claim_reply",
        "a claim's vt is counted from when the claim was sent (counted from its reply instead)",
        (
            Edit(
                "tasker_worker/domain/steps.py",
                "start = self.received_mono if self.claim_sent_mono is None else self.claim_sent_mono",
                "start = self.received_mono",
            ),
        ),
        (G + "test_a_claims_vt_is_counted_from_when_it_was_sent_not_from_its_late_reply",),
    ),
    Mutation(
        "vt_extension_counted_from_reply",
        "an extended vt is counted from when the extension was sent (counted from its reply instead)",
        (
            Edit(
                "tasker_worker/runtime/processor.py",
                "item.vt_deadline = sent + self.vt_seconds",
                "item.vt_deadline = time.monotonic() + self.vt_seconds",
            ),
        ),
        (G + "test_a_vt_extension_is_counted_from_when_it_was_sent_not_from_its_late_reply",),
    ),
    Mutation(
        "raw_headers_appended_to",
        "a claim keeps headers that are no object under tasker_raw_headers (|| appends the stamp to them instead)",
        (
            Edit(
                Q,
                "ELSE jsonb_build_object('tasker_raw_headers', m.headers) || %(stamp)s::jsonb END",
                "ELSE m.headers || %(stamp)s::jsonb END",
            ),
        ),
        ("tests/test_hostile_input.py::test_headers_that_are_no_object_still_bound_the_snoozes_and_are_kept[plain]",),
    ),
    Mutation(
        "raw_headers_appended_to_under_flow_control",
        "the flow-controlled claim keeps headers that are no object under tasker_raw_headers (appends instead)",
        (
            Edit(
                M0025,
                "ELSE jsonb_build_object('tasker_raw_headers', m.headers) || $3 END",
                "ELSE m.headers || $3 END",
            ),
        ),
        (
            "tests/test_hostile_input.py::"
            "test_headers_that_are_no_object_still_bound_the_snoozes_and_are_kept[flow_controlled]",
        ),
    ),
    Mutation(
        "claim_ignores_vt",
        "a claim takes only visible messages (the vt test removed from the claim)",
        (Edit(Q, "WHERE q.vt <= clock_timestamp(){skip}", "WHERE true{skip}"),),
        (G + "test_a_step_slower_than_its_vt_is_never_claimed_by_anyone_else",),
    ),
    Mutation(
        "fence_extend_vt",
        "a vt extension applies only to the holder's claim (read_ct fence removed from extend_vt)",
        (
            Edit(
                M0002,
                "WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct\n        RETURNING q.msg_id, q.vt",
                "WHERE q.msg_id = i.msg_id\n        RETURNING q.msg_id, q.vt",
            ),
        ),
        FENCE_TESTS,
    ),
    Mutation(
        "fence_retry",
        "a retry applies only to the holder's claim (read_ct fence removed from retry_steps)",
        (
            Edit(
                # The definition in force (0010 replaced 0002's).
                "sql/migrations/0010_lapsed_claims.sql",
                "WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct\n            RETURNING q.msg_id\n",
                "WHERE q.msg_id = i.msg_id\n            RETURNING q.msg_id\n",
            ),
        ),
        FENCE_TESTS,
    ),
    Mutation(
        "fence_dead_letter",
        "a dead letter applies only to the holder's claim (fence removed from dead_letter_steps)",
        (
            Edit(
                M0021,
                "WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct\n            RETURNING q.msg_id, q.read_ct,"
                " q.enqueued_at, q.last_read_at, q.message, q.headers,\n                      i.status,",
                "WHERE q.msg_id = i.msg_id\n            RETURNING q.msg_id, q.read_ct,"
                " q.enqueued_at, q.last_read_at, q.message, q.headers,\n                      i.status,",
            ),
        ),
        FENCE_TESTS,
    ),
    Mutation(
        "fence_settle",
        "an outcome is written only by the holder of the claim (fence removed from the settle)",
        (Edit(Q, "     WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct\n", "     WHERE q.msg_id = i.msg_id\n"),),
        (*FENCE_TESTS, R + "test_stale_ack_is_rejected_and_counted"),
    ),
    Mutation(
        "fence_record_outcomes_sql",
        "tasker.record_outcomes (the SQL settle) is fenced too",
        (
            Edit(
                M0021,
                "WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct\n            RETURNING q.msg_id, q.vt,",
                "WHERE q.msg_id = i.msg_id\n            RETURNING q.msg_id, q.vt,",
            ),
        ),
        ("tests/test_sql_helpers.py::test_sql_settle_is_fenced_and_records_once",),
    ),
    Mutation(
        "retry_without_delay",
        "a failed attempt's message waits out its backoff (the runtime sends delay 0)",
        (
            Edit(
                "tasker_worker/runtime/writer.py",
                "e.msg, put_back_ms(s.delay_s), s.headers,",
                "e.msg, 0, s.headers,",
            ),
        ),
        (G + "test_a_failed_attempt_stays_invisible_for_its_backoff_attempt_by_attempt",),
    ),
    Mutation(
        "backoff_rule_flat",
        "the backoff doubles with each attempt (it stays at the base delay)",
        (Edit("tasker_worker/domain/backoff.py", "float(2 ** min(attempt - 1, 30))", "1.0"),),
        (
            G + "test_a_failed_attempt_stays_invisible_for_its_backoff_attempt_by_attempt",
            "tests/test_toolkit.py::test_retries_follow_the_backoff_on_the_manual_clock_then_dead_letter",
        ),
    ),
    Mutation(
        "max_attempts_off_by_one",
        "a step runs at most max_attempts times (one more is allowed)",
        (
            Edit(
                "tasker_worker/domain/verdicts.py",
                "if attempt >= (attempt_limit or policy.max_attempts):",
                "if attempt > (attempt_limit or policy.max_attempts):",
            ),
        ),
        (R + "test_retries_then_dead_letter_then_requeue",),
    ),
    Mutation(
        "dedup_claim_plain",
        "a re-sent step_uuid is flagged by the plain claim (its dedup probe disabled)",
        (
            Edit(
                Q,
                'claim=render(_CLAIM, skip=""',
                'claim=render(_CLAIM.replace("IN (SELECT r.u FROM recorded AS r), false)", "IN (SELECT r.u FROM recorded AS r WHERE false), false)"), skip=""',
            ),
            Edit(
                Q,
                'claim_announcing=render(_CLAIM, skip=""',
                'claim_announcing=render(_CLAIM.replace("IN (SELECT r.u FROM recorded AS r), false)", "IN (SELECT r.u FROM recorded AS r WHERE false), false)"), skip=""',
            ),
        ),
        (G + "test_every_claim_variant_flags_a_step_already_done", R + "test_same_step_uuid_sent_twice_runs_once"),
    ),
    Mutation(
        "dedup_claim_skipping",
        "a re-sent step_uuid is flagged by the claim that skips handlers or messages",
        (
            Edit(
                Q,
                "claim_skipping=render(_CLAIM, skip=_CLAIM_SKIP",
                'claim_skipping=render(_CLAIM.replace("IN (SELECT r.u FROM recorded AS r), false)", "IN (SELECT r.u FROM recorded AS r WHERE false), false)"), skip=_CLAIM_SKIP',
            ),
            Edit(
                Q,
                "claim_skipping_announcing=render(_CLAIM, skip=_CLAIM_SKIP",
                'claim_skipping_announcing=render(_CLAIM.replace("IN (SELECT r.u FROM recorded AS r), false)", "IN (SELECT r.u FROM recorded AS r WHERE false), false)"), skip=_CLAIM_SKIP',
            ),
        ),
        (
            G + "test_every_claim_variant_flags_a_step_already_done",
            G + "test_a_resent_step_is_not_run_again_while_a_circuit_is_open",
        ),
    ),
    Mutation(
        "dedup_claim_steps_sql",
        "tasker.claim_steps (from SQL) flags a step already done",
        (
            Edit(
                M0021,
                "           d.step_uuid IS NOT NULL,\n           clock_timestamp()\n      FROM pgmq.read(",
                "           false,\n           clock_timestamp()\n      FROM pgmq.read(",
            ),
        ),
        (G + "test_every_claim_variant_flags_a_step_already_done",),
    ),
    Mutation(
        "dedup_claim_steps_sql_skipping",
        "tasker.claim_steps with skips (from SQL) flags a step already done",
        (
            Edit(
                M0021,
                "d.step_uuid IS NOT NULL AS already_done,\n               clock_timestamp() AS claimed_at\n"
                "          FROM tasker.read_skipping(",
                "false AS already_done,\n               clock_timestamp() AS claimed_at\n"
                "          FROM tasker.read_skipping(",
            ),
        ),
        (G + "test_every_claim_variant_flags_a_step_already_done",),
    ),
    Mutation(
        "dedup_in_flight",
        "a second message of a step running here waits for it (instead of running alongside)",
        (Edit("tasker_worker/runtime/steps.py", "if step_key in held.steps:", "if False:"),),
        (R + "test_same_step_uuid_sent_twice_runs_once",),
    ),
    Mutation(
        "outcome_key_gone",
        "a step has at most one outcome row (the step_uuid key of each partition removed: the settle's ON"
        " CONFLICT DO NOTHING has no arbiter left)",
        (Edit(M0021, "ADD CONSTRAINT %I PRIMARY KEY (step_uuid), '", "ADD CONSTRAINT %I CHECK (true), '"),),
        (
            G + "test_one_step_run_by_two_workers_at_once_records_and_commits_once",
            H + "test_duplicate_delivery_after_a_partition_roll_is_deduplicated",
        ),
    ),
    Mutation(
        "duplicate_commits_effects",
        "a run whose outcome lost to another run of its step commits nothing",
        (Edit("tasker_worker/runtime/steps.py", "if not recorded and outcome.status is not None:", "if False:"),),
        (G + "test_one_step_run_by_two_workers_at_once_records_and_commits_once",),
    ),
    Mutation(
        "no_release_at_shutdown",
        "steps unfinished at shutdown are given back at once",
        (Edit("tasker_worker/runtime/processor.py", 'await self._release_all(running, "shutdown")', "pass"),),
        (R + "test_graceful_shutdown_releases_unfinished_steps",),
    ),
    Mutation(
        "release_unannounced",
        "steps released at shutdown are announced to the workers that only listen",
        (Edit("tasker_worker/runtime/writer.py", "await self.store.announce_ready(queue, msg_ids, delay_s)", "pass"),),
        (R + "test_steps_released_at_shutdown_are_announced_to_an_event_driven_fleet",),
    ),
    Mutation(
        "release_counts_an_attempt",
        "a release at shutdown gives the attempt back",
        (Edit(V, "        0.0,\n        count_attempt=False,", "        0.0,\n        count_attempt=True,"),),
        (R + "test_graceful_shutdown_releases_unfinished_steps",),
    ),
    Mutation(
        "shutdown_unbounded",
        "the final writes of a shutdown end by its deadline, whatever the database does",
        (
            Edit(
                "tasker_worker/runtime/processor.py",
                "with anyio.CancelScope(shield=True, deadline=deadline):",
                "with anyio.CancelScope(shield=True):",
            ),
            Edit(
                "tasker_worker/runtime/writer.py",
                "with anyio.CancelScope(shield=True, deadline=self.final_deadline) as scope:",
                "with anyio.CancelScope(shield=True) as scope:",
            ),
        ),
        ("tests/test_shutdown.py",),
    ),
    Mutation(
        "listen_no_catch_up",
        "after a reconnect, the listener claims what was sent while it was away",
        (
            Edit(
                "tasker_worker/runtime/event_system.py",
                "        self.listening.set()\n        # Catch up on anything sent while the listener was away.\n"
                "        await self.send.send(WakeClaims(None, Source.POLL))",
                "        self.listening.set()",
            ),
        ),
        (R + "test_listener_killed_reconnects_and_catches_up",),
    ),
    Mutation(
        "no_relisten",
        "a reconnected listener LISTENs again",
        (
            Edit(
                "tasker_worker/runtime/listener.py",
                "await conn.execute(queries.listen_all(self.channels))",
                "await conn.execute(queries.listen_all([] if self.connected_once else self.channels))",
            ),
        ),
        (R + "test_listener_killed_reconnects_and_catches_up",),
    ),
    Mutation(
        "notify_per_row",
        "one notification per statement, whatever its row count",
        (
            # The definitions in force: 0024's attach_notify_trigger and trigger function (each
            # row's own count, or the row triggers' identical payloads would fold into one).
            Edit(M0024, "FOR EACH STATEMENT '", "FOR EACH ROW '"),
            Edit(
                M0024,
                "      FROM new_rows AS r;\n    IF v_count = 0",
                "      FROM new_rows AS r WHERE r.msg_id = NEW.msg_id;\n    IF v_count = 0",
            ),
        ),
        ("tests/test_notify.py::test_send_batch_is_one_notification",),
    ),
    Mutation(
        "herd_everyone_claims",
        "a notified message is claimed by the first-ranked worker only, not by every listener",
        (Edit("tasker_worker/runtime/processor.py", "            if rank >= first:", "            if False:"),),
        (S + "test_a_notification_is_claimed_once_however_many_workers_hear_it",),
    ),
    Mutation(
        "herd_claims_unannounced",
        "a worker with peers announces what it claimed, so that they need not claim it",
        (Edit("tasker_worker/runtime/processor.py", "announce=with_peers,", "announce=False,"),),
        (S + "test_a_notification_is_claimed_once_however_many_workers_hear_it",),
    ),
    Mutation(
        "herd_no_takeover",
        "a message whose first choice does not claim it is claimed by the next after the grace",
        (
            Edit(
                "tasker_worker/runtime/processor.py",
                "taken = not qs.claimed.covers(entry)",
                "taken = False",
            ),
        ),
        (S + "test_a_silent_first_choice_is_taken_over_after_the_grace",),
    ),
    Mutation(
        "herd_trusts_stale_claims",
        "a message announced ready again is claimed again, whatever was claimed before",
        (Edit("tasker_worker/runtime/processor.py", "        qs.claimed.forget(event.msg_ids or (lo,))\n", ""),),
        ("tests/test_planning.py::test_a_step_given_back_reaches_a_capable_event_driven_worker",),
    ),
    Mutation(
        "probe_finds_nothing",
        "the one-statement safety poll finds the queues that have visible messages",
        (
            Edit(
                "tasker_worker/db/queue_client.py", "return {r[0] for r in await self._fetch(text, ())}", "return set()"
            ),
        ),
        (S + "test_an_idle_poll_asks_once_for_all_namespaces",),
    ),
    Mutation(
        "listen_per_channel",
        "a listener's (re)connect LISTENs on all its channels in one statement (one transaction)",
        (
            Edit(
                LISTENER,
                "await conn.execute(queries.listen_all(self.channels))",
                "for channel in self.channels:\n                await conn.execute(queries.listen_all([channel]))",
            ),
        ),
        (S + IDLE_COMMITS,),
    ),
    Mutation(
        "queues_created_one_by_one",
        "a starting worker creates (or checks) the queues of all its namespaces in one statement",
        (
            Edit(
                "tasker_worker/db/queue_client.py",
                "rows = await self._fetch(queries.CREATE_NAMESPACE_QUEUES, (list(namespaces),))\n"
                "        return [str(r[0]) for r in rows]",
                "return [await self.create_namespace_queue(ns) for ns in namespaces]",
            ),
        ),
        (S + IDLE_COMMITS,),
    ),
    Mutation(
        "cluster_queues_made_on_the_primary",
        "each cluster's queues are created (in one statement) on that cluster",
        (
            Edit(
                "tasker_worker/runtime/worker.py",
                "partial(each.create_namespace_queues, db.namespaces)",
                "partial(clients[0].create_namespace_queues, db.namespaces)",
            ),
        ),
        (CL + "test_one_worker_runs_both_clusters_steps_exactly_once_each_outcome_on_its_own_cluster",),
    ),
    Mutation(
        "grants_always_written",
        "a queue's GRANTs are written only where a role lacks them (a start writes no catalog row)",
        (
            Edit(
                "sql/migrations/0022_idle_grants.sql",
                "WHERE NOT EXISTS (SELECT 1 FROM pg_class AS c CROSS JOIN LATERAL aclexplode",
                "WHERE true OR NOT EXISTS (SELECT 1 FROM pg_class AS c CROSS JOIN LATERAL aclexplode",
            ),
        ),
        (S + IDLE_COMMITS,),
    ),
    Mutation(
        "retention_ignores_horizon",
        "retention deletes only outcome rows past the horizon (the dedup horizon)",
        (Edit("tasker_worker/fleet/retention.py", '"cutoff": now - keep,', '"cutoff": now,'),),
        (S + "test_retention_prunes_past_the_horizon_and_dedup_holds_inside_it",),
    ),
    Mutation(
        "planner_cuts_corners",
        "a diagonal grid move never squeezes between two blocked cells",
        (
            Edit(
                "tasker_worker/handlers/planning/search.py",
                "if blk[v] or closed[v] or ng >= g[v] or blk[u + o1] or blk[u + o2]:",
                "if blk[v] or closed[v] or ng >= g[v]:",
            ),
        ),
        ("tests/test_planning.py",),
    ),
    Mutation(
        "line_of_sight_cuts_corners",
        "an any-angle segment through a cell corner needs both cells beside it free",
        (
            Edit(
                "tasker_worker/handlers/planning/search.py",
                "if blk[r * pw + c + step_c] or blk[(r + step_r) * pw + c]:",
                "if False:",
            ),
        ),
        ("tests/test_planning.py",),
    ),
    Mutation(
        "lapse_put_back_kept",
        "a put-back (retry, release) is not taken for a lapsed claim (retry_steps keeps tasker_claim)",
        (
            Edit(
                "sql/migrations/0010_lapsed_claims.sql",
                "ELSE (coalesce(q.headers, '{}'::jsonb) - 'tasker_claim') || i.patch END",
                "ELSE coalesce(q.headers, '{}'::jsonb) || i.patch END",
            ),
        ),
        ("tests/test_observability.py::test_a_lapsed_claim_is_recorded_with_its_previous_holder",),
    ),
    Mutation(
        "lapse_unrecorded",
        "a claim that finds the previous one lapsed records it (the worker ignores it)",
        (Edit("tasker_worker/runtime/processor.py", "                if lapsed:\n", "                if False:\n"),),
        ("tests/test_observability.py::test_a_lapsed_claim_is_recorded_with_its_previous_holder",),
    ),
    Mutation(
        "source_sticks_in_a_backlog",
        "a claim's source is what triggered it (a backlog loop keeps the source that woke it)",
        (
            Edit(
                "tasker_worker/runtime/processor.py",
                "source = Source.EVENT if qs.woken_by_event else Source.POLL\n                    qs.woken_by_event = False\n                want",
                "source = Source.EVENT if qs.woken_by_event or source is Source.EVENT else Source.POLL\n                    qs.woken_by_event = False\n                want",
            ),
        ),
        (
            "tests/test_observability.py::"
            "test_claims_after_a_switch_to_polling_only_are_polls_and_lines_say_the_new_mode",
        ),
    ),
    Mutation(
        "enqueue_not_idempotent",
        "a step_uuid already sent is answered with that step, not sent again (enqueue_step skips its key)",
        (
            Edit(
                M0021,
                "SELECT k.msg_id INTO v_id FROM tasker.step_keys AS k WHERE k.step_uuid = p_step_uuid;\n        END IF;\n        IF v_id IS NOT NULL",
                "NULL;\n        END IF;\n        IF v_id IS NOT NULL",
            ),
            Edit(
                M0021,
                "INSERT INTO tasker.step_keys (step_uuid, queue_name, msg_id) VALUES (p_step_uuid, v_queue, v_id);",
                "NULL;",
            ),
        ),
        ("tests/test_client.py::test_send_step_is_idempotent_on_its_step_uuid",),
    ),
    Mutation(
        "cancel_takes_running",
        "cancel takes only a step no live claim holds (the tasker_claim test removed)",
        (
            Edit(
                M0021,
                "AND (NOT coalesce(q.headers ? 'tasker_claim', false) OR q.vt <= clock_timestamp())",
                "",
            ),
        ),
        ("tests/test_client.py::test_cancel_takes_a_queued_step_and_stops_a_running_one",),
    ),
    Mutation(
        "outcome_not_notified",
        "the settle names a waited-for step on tasker_outcome (it never does)",
        (Edit(Q, "WHERE s.status IS NOT NULL AND s.headers ? 'tasker_notify'", "WHERE false"),),
        ("tests/test_client.py::test_wait_for_is_woken_by_the_outcome_notification",),
    ),
    Mutation(
        "tick_uuid_random",
        "every worker names a fleet-wide tick's step alike (each draws a random step_uuid)",
        (
            Edit(
                "tasker_worker/domain/schedules.py",
                'return uuid.uuid5(TICK_NAMESPACE, f"{schedule}@{tick.astimezone(UTC).isoformat()}")',
                "return uuid.uuid4()",
            ),
        ),
        ("tests/test_schedules.py::test_a_fleet_once_schedule_runs_each_tick_once_while_workers_come_and_go",),
    ),
    Mutation(
        "retry_on_ignored",
        "an exception outside a handler's retry_on is dead-lettered at once (it is retried)",
        (
            Edit(
                "tasker_worker/domain/verdicts.py",
                "if policy.retry_on is not None and not isinstance(exc, (RetryableError, *policy.retry_on)):",
                "if False:",
            ),
        ),
        ("tests/test_handler_policy.py::test_a_handler_policy_replaces_retry_in_a_real_worker",),
    ),
    Mutation(
        "dashboard_open_to_anyone",
        "the dashboard's actions need the operator token (any form gets through)",
        (Edit("tasker_worker/api/dashboard/actions.py", "if not given or not hmac.compare_digest(", "if False and ("),),
        ("tests/test_dashboard.py::test_actions_without_the_operator_token_are_refused_and_change_nothing",),
    ),
    Mutation(
        "dashboard_unescaped",
        "the dashboard shows database text as text (it renders it as markup)",
        (
            Edit(
                "tasker_worker/api/dashboard/render.py",
                'autoescape=select_autoescape(["html"], default=True)',
                "autoescape=False",
            ),
        ),
        ("tests/test_dashboard.py::test_every_value_is_escaped",),
    ),
    Mutation(
        "requeue_unrecorded",
        "a requeue from the DLQ is recorded as an event of the step (it leaves no trace)",
        (
            Edit(
                "sql/migrations/0013_dashboard.sql",
                "VALUES ('DeadLetterRequeued', NULL,",
                "SELECT 'DeadLetterRequeued', NULL,",
            ),
            Edit(
                "sql/migrations/0013_dashboard.sql",
                "                                   'reason', v_row.headers -> 'tasker_dlq' ->> 'reason'));",
                "                                   'reason', v_row.headers -> 'tasker_dlq' ->> 'reason') WHERE false;",
            ),
        ),
        ("tests/test_dashboard.py::test_a_requeue_from_the_page_is_recorded_as_an_event_of_the_step",),
    ),
    Mutation(
        "rulebook_release_in_memory",
        "a rule of the rulebook holds in the harness (a dependency outage gives the attempt back)",
        (RELEASE_RULE,),
        ("tests/test_toolkit.py::test_dependency_unavailable_opens_the_circuit_then_a_probe_closes_it",),
    ),
    Mutation(
        "rulebook_release_in_postgres",
        "the same rule holds in a worker on PostgreSQL (a dependency outage gives the attempt back)",
        (RELEASE_RULE,),
        (R + "test_dependency_unavailable_is_released_without_attempts_but_bounded",),
    ),
    Mutation(
        "flow_guard_gone",
        "a worker's plain claim takes nothing of a namespace under flow control (it claims as if there were none)",
        (
            Edit(
                Q, "       AND NOT EXISTS (SELECT 1 FROM tasker.queue_flow AS f WHERE f.namespace = {namespace})\n", ""
            ),
        ),
        (F + "test_a_pause_holds_across_a_restart_and_resume_runs_everything_once",),
    ),
    Mutation(
        "flow_max_running_uncounted",
        "at most max_running steps of a namespace run at once, fleet-wide (the running ones are not counted)",
        (Edit(M0025, "v_budget := least(v_budget, f.max_running - v_running);", "NULL;"),),
        (F + "test_a_fleet_wide_limit_holds_across_workers",),
    ),
    Mutation(
        "flow_hold_misses_ends",
        "a claim held by max_running comes back when one of its steps ends, also during the claim (it waits for the next freed slot)",
        (
            Edit(
                "tasker_worker/runtime/processor.py",
                "await self.held.wait_hold_ended(qs.name, holds_ended)",
                "await self.held.wait_slot()",
            ),
        ),
        (F + "test_a_held_claim_comes_back_when_its_own_steps_end",),
    ),
    Mutation(
        "flow_claims_unserialized",
        "limited claims are counted under the namespace's lock (two workers can both take the last slot)",
        (
            Edit(
                M0025,
                "        SELECT * INTO f FROM tasker.queue_flow AS q WHERE q.namespace = v_ns FOR UPDATE;",
                "        SELECT * INTO f FROM tasker.queue_flow AS q WHERE q.namespace = v_ns;",
            ),
        ),
        (F + "test_two_claims_cannot_both_take_the_last_slot",),
    ),
    Mutation(
        "flow_lapsed_slot_counted",
        "a slot held by a dead worker frees when its claim lapses (it is counted forever)",
        (
            Edit(
                M0025,
                "'WHERE q.headers ? ''tasker_claim'' AND q.vt > clock_timestamp()', v_table)\n           INTO v_running;",
                "'WHERE q.headers ? ''tasker_claim''', v_table)\n           INTO v_running;",
            ),
        ),
        (F + "test_a_killed_workers_slots_free_at_its_vt_not_before",),
    ),
    Mutation(
        "flow_key_cap_ignored",
        "at most key_max_running steps of one concurrency_key run at once (keys are not counted within a claim)",
        (Edit(M0025, "WHERE $7 IS NULL OR r.k = '' OR r.kn + coalesce(($6 ->> r.k)::int, 0) <= $7", "WHERE true"),),
        (F + "test_a_per_key_limit_caps_each_key_not_the_namespace",),
    ),
    Mutation(
        "flow_rate_ignored",
        "a rate spaces the starts of a namespace (the tokens are not counted)",
        (Edit(M0025, "v_budget := least(v_budget, floor(v_tokens + 1e-9)::integer);", "NULL;"),),
        (F + "test_a_rate_spreads_starts_and_no_window_passes_it",),
    ),
    Mutation(
        "flow_priority_ignored",
        "with a backlog, the lowest priority value is claimed first (claims take the oldest)",
        (
            Edit(
                M0025,
                "ORDER BY tasker.step_priority(q.message), q.msg_id\n                 LIMIT $8\n",
                "ORDER BY q.msg_id\n                 LIMIT $8\n",
            ),
            Edit(M0025, "ORDER BY r.p, r.gn, r.msg_id", "ORDER BY r.gn, r.msg_id"),
        ),
        (F + "test_urgent_steps_sent_last_run_first",),
    ),
    Mutation(
        "flow_groups_not_round_robin",
        "a namespace's groups are claimed round-robin (a big group ahead takes every claim)",
        (Edit(M0025, "ORDER BY r.p, r.gn, r.msg_id", "ORDER BY r.p, r.msg_id"),),
        (F + "test_a_small_group_is_not_stuck_behind_a_big_one",),
    ),
    Mutation(
        "flow_memory_pause_ignored",
        "the harness's store obeys a pause as the database does",
        (Edit("tasker_worker/testing/memory.py", "        if flow.paused:\n", "        if False:\n"),),
        (ST + "test_a_paused_namespace_claims_nothing_and_says_why",),
    ),
    Mutation(
        "flow_order_rule_broken",
        "the harness orders a flow-controlled claim as the database does (by priority, round-robin)",
        (
            Edit(
                "tasker_worker/domain/flow.py",
                "rows = sorted(candidates, key=lambda c: (c[1], c[0]))",
                "rows = sorted(candidates)",
            ),
        ),
        ("tests/test_toolkit.py::test_flow_control_in_the_harness_pause_priority_and_rate",),
    ),
    Mutation(
        "prefetch_vt_unchecked",
        "a prefetched step whose claim may have lapsed is not started (it runs beside the worker that took it over)",
        (
            Edit(
                "tasker_worker/runtime/processor.py",
                "if entry.vt_deadline - time.monotonic() < self.vt_seconds * PREFETCH_SAFE_SHARE:",
                "if False:",
            ),
        ),
        ("tests/test_prefetch.py::test_a_prefetched_step_whose_vt_lapsed_in_the_buffer_is_not_started",),
    ),
    Mutation(
        "prefetch_kept_at_shutdown",
        "a shutdown gives prefetched steps back at once (they wait for the running ones to finish)",
        (
            Edit(
                "tasker_worker/runtime/processor.py",
                "buffered = self._take_buffered()\n",
                "buffered: list[HeldStep] = []\n",
            ),
        ),
        ("tests/test_prefetch.py::test_a_shutdown_gives_the_buffer_back_at_once_without_an_attempt",),
    ),
    Mutation(
        "prefetch_kept_on_pause",
        "a pause reaches what a worker prefetched (it starts after the pause)",
        (
            Edit(
                "tasker_worker/runtime/processor.py",
                'await self._release_all(self._take_buffered(qs.name), "flow_control")',
                "pass",
            ),
        ),
        ("tests/test_prefetch.py::test_a_paused_namespace_stops_prefetching_and_gives_the_buffer_back",),
    ),
    Mutation(
        "prefetch_waiting_queue_starved",
        "a queue waiting for a slot gets it through its own prefetched steps (they wait behind another queue's)",
        (Edit("tasker_worker/runtime/processor.py", "found = self._waiting_queues_entry()", "found = None"),),
        ("tests/test_prefetch.py::test_a_waiting_queues_own_prefetched_steps_take_the_freed_slots",),
    ),
    Mutation(
        "shutdown_releases_running_threads",
        "a sync handler still running at shutdown keeps its message until its vt (it is given back at once)",
        (
            Edit(
                "tasker_worker/runtime/processor.py",
                "still_running = [e for e in running if self.steps.may_run_on(e)]",
                "still_running: list[HeldStep] = []",
            ),
        ),
        ("tests/test_shutdown.py::test_a_sync_handler_running_at_shutdown_keeps_its_message_until_its_vt",),
    ),
    Mutation(
        "tasker_core_step_dead_lettered",
        "a tasker-core step (three UUIDs, nothing of ours) is never dead-lettered by our worker",
        (
            Edit(
                "tasker_worker/runtime/steps.py",
                "            if is_tasker_core_step(msg.body):",
                "            if False:",
            ),
        ),
        CORE_STEP_TESTS,
    ),
    Mutation(
        "tasker_core_step_dead_lettered_in_memory",
        "the same rule holds in the harness (it runs the real runner on the in-memory store)",
        (
            Edit(
                "tasker_worker/runtime/steps.py",
                "            if is_tasker_core_step(msg.body):",
                "            if False:",
            ),
        ),
        (TC + "test_the_harness_leaves_a_tasker_core_step_as_the_worker_does",),
    ),
    Mutation(
        "tasker_core_step_uses_an_attempt",
        "a tasker-core step given back keeps its read count (no attempt of ours counted on it)",
        (
            Edit(
                V,
                "        GIVE_BACK_TASKER_CORE_S,\n        count_attempt=False,",
                "        GIVE_BACK_TASKER_CORE_S,\n        count_attempt=True,",
            ),
        ),
        CORE_STEP_TESTS,
    ),
    Mutation(
        "tasker_core_step_taken_back_every_poll",
        "a worker leaves a tasker-core step it gave back alone (it does not claim it on every poll)",
        (Edit(V, "        leave_alone_s=LEAVE_TASKER_CORE_S,\n", ""),),
        CORE_STEP_TESTS,
    ),
    Mutation(
        "tasker_core_detection_ignores_our_keys",
        "a malformed message of ours (it names one of our keys) is still dead-lettered as malformed_message",
        (
            Edit(
                "tasker_worker/domain/steps.py",
                "if not isinstance(body, dict) or not _OUR_KEYS.isdisjoint(body):",
                "if not isinstance(body, dict):",
            ),
        ),
        CORE_STEP_TESTS,
    ),
    Mutation(
        "batch_ready_without_delay_seconds",
        "every batch_ready we send carries delay_seconds (tasker-core's listener requires it)",
        (
            Edit(
                M0024,  # the trigger function in force
                "            'truncated', v_count > 100,\n            'ready_at', v_ready,\n            'delay_seconds', v_delay)::text;",
                "            'truncated', v_count > 100,\n            'ready_at', v_ready)::text;",
            ),
        ),
        (TC + "test_every_payload_on_the_ready_channels_is_read_by_tasker_core",),
    ),
    Mutation(
        "trigger_announces_function_sends_too",
        "a send through tasker-core's functions is announced once, in its shape (the trigger stays quiet)",
        (
            Edit(  # the decision in force: the send trigger's WHEN (0024)
                M0024,
                "    SELECT current_setting('tasker.announced_by_caller', true) IS DISTINCT FROM 'on'\n       AND coalesce(",
                "    SELECT true\n       AND coalesce(",
            ),
        ),
        (TC + "test_every_payload_on_the_ready_channels_is_read_by_tasker_core",),
    ),
    Mutation(
        "trigger_quiet_after_function_send",
        "the trigger is quiet only for the statement a producer function announces itself",
        (
            Edit(
                M0015,
                "    PERFORM set_config('tasker.announced_by_caller', '', true);\n    v_ready := ",
                "    v_ready := ",
            ),
        ),
        (TC + "test_a_function_send_rolled_back_or_failed_leaves_the_trigger_announcing",),
    ),
    Mutation(
        "tasker_core_functions_replaced",
        "tasker-core's functions are created only where absent (a database that has its own keeps them)",
        (
            Edit(
                M0015,
                "    IF to_regprocedure('tasker.pgmq_send_with_notify(text, jsonb, integer)') IS NULL THEN",
                "    IF true THEN\n        DROP FUNCTION IF EXISTS tasker.pgmq_send_with_notify(text, jsonb, integer);",
            ),
        ),
        (TC + "test_a_database_that_has_tasker_cores_functions_keeps_them",),
    ),
    Mutation(
        "tasker_core_functions_not_granted",
        "tasker_producer may send through tasker-core's functions",
        (Edit(M0015, "    IF tasker.role_exists('tasker_producer') THEN", "    IF false THEN"),),
        (TC + "test_a_producer_role_sends_through_them_with_tasker_on_its_search_path",),
    ),
    Mutation(
        "payload_threshold_in_characters",
        "the 7,000 threshold of a message travelling with its notification is measured in bytes",
        (Edit(M0015, "    IF octet_length(message::text) < 7000 THEN", "    IF length(message::text) < 7000 THEN"),),
        (TC + "test_every_payload_on_the_ready_channels_is_read_by_tasker_core",),
    ),
    Mutation(
        "read_specific_ignores_vt",
        "pgmq_read_specific_message claims a visible message only",
        (Edit(M0015, "WHERE q.msg_id = $1 AND q.vt <= clock_timestamp()", "WHERE q.msg_id = $1"),),
        (TC + "test_read_specific_message_claims_one_visible_message",),
    ),
    Mutation(
        "wakeups_ignore_message_with_payload",
        "tasker-core's message_with_payload is a wakeup at its ready_at (a delayed one too, in EventDrivenOnly)",
        (
            Edit(
                "tasker_worker/domain/notifications.py",
                "MessageReady = MessageReadyEvent | BatchReadyEvent | MessageWithPayloadEvent\n",
                "MessageReady = MessageReadyEvent | BatchReadyEvent\n",
            ),
        ),
        (TC + "test_an_event_driven_worker_runs_every_step_sent_through_tasker_cores_functions_once",),
    ),
    Mutation(
        "delayed_wakeup_early",
        "a delayed wakeup whose ready_at has passed (tasker-core's: the time of the send) is not claimed early",
        (
            Edit(
                LISTENER,
                "            if event.delay_seconds:\n                event = event.due_from(datetime.now(UTC))\n",
                "",
            ),
        ),
        (CH + "test_the_listener_routes_each_channel_by_its_table",),
    ),
    Mutation(
        "unreadable_wakeup_dropped",
        "a notification on a namespace's channel that cannot be read still wakes that queue",
        (
            Edit(
                LISTENER,
                "                await self.commands.send(WakeClaims(queue, Source.EVENT))\n                return\n",
                "                return\n",
            ),
        ),
        (CH + "test_the_listener_routes_each_channel_by_its_table",),
    ),
    Mutation(
        "tasker_core_config_ignored",
        "tasker-core's worker.toml is read through the mapping (not as our layout)",
        (Edit("tasker_worker/config/tasker_core.py", "    if not is_tasker_core_layout(document):", "    if True:"),),
        ("tests/test_tasker_core_config.py::test_tasker_cores_worker_toml_loads_through_the_mapping",),
    ),
    Mutation(
        "snooze_uses_an_attempt",
        "a snooze puts the step back without using an attempt",
        (
            Edit(
                V,
                "        max(0.0, delay_s),\n        count_attempt=False,",
                "        max(0.0, delay_s),\n        count_attempt=True,",
            ),
        ),
        (HC + "test_a_snoozed_step_reruns_after_its_delay_with_its_attempt_unchanged",),
    ),
    Mutation(
        "snooze_unbounded",
        "max_snoozes bounds a step that always snoozes (it snoozes forever)",
        (Edit(V, "    if snoozes > limit:", "    if False:"),),
        (HC + "test_max_snoozes_bounds_a_step_that_always_snoozes",),
    ),
    Mutation(
        "cancel_not_forced",
        "an async step asked to stop is cancelled after its grace (it runs on)",
        (
            Edit(
                "tasker_worker/runtime/steps.py",
                "        entry.cancel_fired = True\n        task.cancel()",
                "        pass",
            ),
        ),
        (HC + "test_a_running_async_step_cancelled_from_another_process_stops_within_its_grace",),
    ),
    Mutation(
        "cancel_not_recorded",
        "a step asked to stop that returns anyway is recorded cancelled (recorded succeeded)",
        (
            Edit(
                "tasker_worker/runtime/steps.py",
                "        if ctx.cancelled:\n            # Stopped cooperatively",
                "        if False:\n            # Stopped cooperatively",
            ),
        ),
        (HC + "test_a_sync_step_sees_ctx_cancelled_and_is_recorded_cancelled_when_it_returns",),
    ),
    Mutation(
        "progress_not_written",
        "what a running step reports is written where another process reads it",
        (Edit("tasker_worker/runtime/processor.py", "await self.client.write_progress(rows, self.worker_id)", "pass"),),
        (HC + "test_progress_is_visible_from_another_process_while_the_step_runs",),
    ),
    Mutation(
        "middleware_skipped",
        "registered middleware wraps every handler call",
        (
            Edit(
                "tasker_worker/runtime/steps.py",
                "found = self._chain = [*builtin, *self.registry.middlewares]",
                "found = self._chain = builtin",
            ),
        ),
        (HC + "test_a_middleware_wraps_every_handler_and_can_end_a_step_itself",),
    ),
    Mutation(
        "unique_window_ignored",
        "a second send of a unique key within its window gets the first step (a second is sent)",
        (
            Edit(
                M0021,
                "AND u.expires_at > clock_timestamp();\n        IF FOUND AND (NOT p_debounce",
                "AND u.expires_at > clock_timestamp();\n        IF false AND (NOT p_debounce",
            ),
        ),
        (HC + "test_two_producers_racing_one_unique_key_in_its_window_create_one_step",),
    ),
    Mutation(
        "history_first_partitions_not_made",
        "a migration creates today's outcome partition and the days after it (else the first outcomes go to the default one)",
        (
            Edit(
                "tasker_worker/db/migrations.py",
                "if applied and FIRST_PARTITIONED_VERSION in have:",
                "if False:",
            ),
        ),
        (H + "test_a_new_database_has_its_day_partitions_from_the_migration",),
    ),
    Mutation(
        "history_uuid_time_float",
        "tasker.uuid_time is exact to the millisecond far ahead (0023's built-in reading, not 0021's float8)",
        (Edit("sql/migrations/0023_uuid_time_builtin.sql", ">= 170000 THEN", ">= 990000 THEN"),),
        (H + "test_the_time_of_a_step_uuid",),
    ),
    Mutation(
        "history_probe_misses_legacy_rows",
        "the dedup probe also looks in the unstamped partition (where a UUIDv7 recorded before 0021 was filed)",
        (
            Edit(
                M0021,
                "AND s.uuid_time IN (tasker.uuid_time(k.u), 'epoch')",
                "AND s.uuid_time IN (tasker.uuid_time(k.u))",
            ),
        ),
        (H + "test_migrating_a_populated_table_online",),
    ),
    Mutation(
        "history_probe_misses_earlier_days",
        "a step delivered again after its day's partition rolled over is found (the probe reads only today's)",
        (
            Edit(
                M0021,
                "AND s.uuid_time IN (tasker.uuid_time(k.u), 'epoch')",
                "AND s.uuid_time >= date_trunc('day', clock_timestamp())",
            ),
        ),
        (H + "test_duplicate_delivery_after_a_partition_roll_is_deduplicated",),
    ),
    Mutation(
        "history_stamp_unchecked",
        "a row is filed under its step_uuid's own time (a partition's CHECK of it removed)",
        (
            Edit(
                M0021,
                "'ADD CONSTRAINT %I CHECK (uuid_time = tasker.uuid_time(step_uuid))'",
                "'ADD CONSTRAINT %I CHECK (true)'",
            ),
        ),
        (H + "test_every_row_of_a_step_goes_to_the_partition_of_its_step_uuid",),
    ),
    Mutation(
        "history_without_default_partition",
        "a settle of a step whose day has no partition succeeds (no default partition to take it)",
        (
            Edit(
                M0021,
                "SELECT tasker.new_history_partition('step_results_default');\n"
                "ALTER TABLE tasker.step_results ATTACH PARTITION tasker.step_results_default DEFAULT;\n",
                "SELECT tasker.new_history_partition('step_results_default');\n",
            ),
        ),
        (H + "test_a_missing_partition_never_fails_a_settle",),
    ),
    Mutation(
        "history_change_without_table_lock",
        "creating a day holds the table until done (a weaker lock lets a probe planned before miss a moved row)",
        (
            Edit(
                M0021,
                "LOCK TABLE ONLY tasker.step_results IN ACCESS EXCLUSIVE MODE;\n"
                "    EXCEPTION WHEN lock_not_available THEN\n        RETURN false;",
                "LOCK TABLE ONLY tasker.step_results IN SHARE MODE;\n"
                "    EXCEPTION WHEN lock_not_available THEN\n        RETURN false;",
            ),
        ),
        (H + "test_creating_a_day_while_outcomes_are_read_and_written",),
    ),
    Mutation(
        "history_probe_with_callers_snapshot",
        "the dedup probe reads with a snapshot taken after its plan's locks (STABLE: the claim's older one)",
        (
            Edit(
                M0021,
                "RETURNS SETOF uuid\nLANGUAGE plpgsql VOLATILE\nSET plan_cache_mode = force_generic_plan",
                "RETURNS SETOF uuid\nLANGUAGE plpgsql STABLE\nSET plan_cache_mode = force_generic_plan",
            ),
        ),
        (H + "test_creating_a_day_while_outcomes_are_read_and_written",),
    ),
    Mutation(
        "history_probe_scans_a_filled_day",
        "the dedup probe looks each step up by key, also in a day that was empty when its kept plan was made",
        (
            Edit(
                M0021,
                "SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$",
                "SET plan_cache_mode = force_generic_plan AS $$",
            ),
        ),
        (H + "test_the_dedup_probe_looks_each_step_up_by_key_in_a_day_that_filled_since_it_was_planned",),
    ),
    Mutation(
        "cluster_partitions_not_kept",
        "a secondary cluster's housekeeping creates its own outcome table's day partitions",
        (
            Edit(
                "tasker_worker/fleet/supervision.py",
                'Job("history_partitions", self.retention_config.interval, self.history_partitions),\n'
                '            *(\n                [Job("prune_outcomes"',
                '*(\n                [Job("prune_outcomes"',
            ),
        ),
        (CL + "test_outcomes_on_a_secondary_cluster_are_pruned_by_its_own_housekeeping",),
    ),
    Mutation(
        "retention_drops_queued_day",
        "retention keeps a day whose step waits in a queue (its outcome row is that step's dedup)",
        (
            Edit(
                M0021,
                "        IF v_found THEN\n            RETURN 'queued';",
                "        IF false THEN\n            RETURN 'queued';",
            ),
        ),
        (H + "test_retention_drops_whole_days_and_never_one_still_needed",),
    ),
    Mutation(
        "retention_drops_day_with_recent_rows",
        "retention keeps a day holding a row finished within the horizon (a step delayed past its day)",
        (
            Edit(
                M0021,
                "    IF v_found THEN\n        RETURN 'recent_rows';",
                "    IF false THEN\n        RETURN 'recent_rows';",
            ),
        ),
        (H + "test_retention_drops_whole_days_and_never_one_still_needed",),
    ),
    Mutation(
        "retention_drops_days_to_come",
        "retention drops only days ended before the horizon (not today's or the ones created ahead)",
        (
            Edit(
                M0021,
                "    IF v_part.to_time > p_cutoff THEN\n        RETURN 'not_due';",
                "    IF false THEN\n        RETURN 'not_due';",
            ),
            Edit(
                "tasker_worker/fleet/retention.py",
                'if part.kind != "day" or part.to_time is None or part.to_time > now - longest:',
                'if part.kind != "day" or part.to_time is None:',
            ),
        ),
        (H + "test_retention_drops_whole_days_and_never_one_still_needed",),
    ),
    Mutation(
        "retention_deletes_day_rows",
        "a day past the longest horizon is dropped whole, its rows not deleted one by one before",
        (
            Edit(
                "tasker_worker/fleet/retention.py",
                'if part.kind == "day" and keep >= longest:',
                "if False:",
            ),
        ),
        (H + "test_retention_drops_whole_days_and_never_one_still_needed",),
    ),
    Mutation(
        "migration_not_prepared_online",
        "db migrate prepares 0021 online (column, CHECK validated) so that the migration reads no row under its lock",
        (
            Edit(
                "tasker_worker/db/migrations.py",
                '    ("0021", queries.HISTORY_PREPARE_NEEDED, queries.HISTORY_PREPARE),\n',
                "",
            ),
        ),
        (H + "test_migrating_a_populated_table_online",),
    ),
    Mutation(
        "notify_skip_ignores_idle_listener",
        "a send skips its notification only while every live listening worker drains (an idle one "
        "counted as draining: the bool_and of NULLs)",
        (
            Edit(  # the decision row's refresh (0024)
                M0024,
                "CASE WHEN bool_and(coalesce(l.draining_until > clock_timestamp(), false))",
                "CASE WHEN bool_and(l.draining_until > clock_timestamp())",
            ),
        ),
        (
            NS + "test_a_send_is_announced_unless_every_live_listener_drains",
            NS + "test_an_idle_worker_is_woken_while_another_drains",
        ),
    ),
    Mutation(
        "notify_decision_stale_on_update",
        "a lease taken, renewed or released by an UPDATE of a listener's row refreshes its namespace's "
        "decision row (0024)",
        (
            Edit(
                M0024,
                "             WHERE o.worker_id IS NULL OR o.draining_until IS DISTINCT FROM n.draining_until\n",
                "             WHERE o.worker_id IS NULL\n",
            ),
        ),
        (NS + "test_the_decision_row_follows_every_change_of_the_listeners_and_the_switch",),
    ),
    Mutation(
        "notify_decision_written_every_heartbeat",
        "a heartbeat that only renews a listener's alive_until writes no decision row (idle cost flat)",
        (
            Edit(
                M0024,
                "             WHERE o.worker_id IS NULL OR o.draining_until IS DISTINCT FROM n.draining_until\n"
                "                OR n.alive_until <= clock_timestamp()\n",
                "             WHERE true\n",
            ),
            Edit(
                M0024,
                "             WHERE (d.quiet, d.skip_until) IS DISTINCT FROM (excluded.quiet, excluded.skip_until);",
                ";",
            ),
        ),
        (NS + "test_a_heartbeat_of_a_draining_worker_writes_no_decision",),
    ),
    Mutation(
        "notify_skip_without_lock",
        "a send skips only once it holds the namespace's skip lock (taken before the row is read again)",
        (
            Edit(
                M0024,
                "                                 OR current_setting('tasker.skip_locked', true) IS DISTINCT FROM 'on'\n",
                "",
            ),
        ),
        (NS + "test_a_producer_never_waits_for_a_worker_at_the_handshake",),
    ),
    Mutation(
        "notify_delayed_not_marked",
        "a statement that sent a message not visible yet is announced (its notification says when)",
        (Edit(M0024, "'FOR EACH ROW WHEN (NEW.vt > clock_timestamp()) '", "'FOR EACH ROW WHEN (false) '"),),
        (NS + "test_a_delayed_send_and_a_repeatable_read_producer_are_announced",),
    ),
    Mutation(
        "notify_delayed_mark_kept",
        "the mark of a delayed send is cleared once announced: later sends of its transaction may skip",
        (Edit(M0024, "        PERFORM set_config('tasker.delayed_send', '', true);  -- announced now", "        -- "),),
        (NS + "test_a_delayed_send_is_announced_and_a_later_one_in_its_transaction_still_skips",),
    ),
    Mutation(
        "notify_decided_in_the_function",
        "the decision is the trigger's WHEN: a skipped send runs no PL/pgSQL",
        (
            Edit(
                M0024,
                "            'WHEN (tasker.notify_wanted(%L)) '\n"
                "            'EXECUTE FUNCTION tasker.notify_message_ready(%L)', p_table, v_ns, 'decided');",
                "            'EXECUTE FUNCTION tasker.notify_message_ready()', p_table);",
            ),
        ),
        (NS + "test_a_skipped_send_runs_no_trigger_function",),
    ),
    Mutation(
        "notify_old_trigger_ignores_the_rule",
        "a trigger of the shape before 0024 still follows the rule (its function decides)",
        (Edit(M0024, "        IF NOT tasker.notify_wanted(v_ns) THEN", "        IF false THEN"),),
        (NS + "test_a_trigger_of_the_older_shape_keeps_the_rule_until_it_is_replaced",),
    ),
    Mutation(
        "notify_trigger_replacement_waits",
        "replacing a queue's trigger waits for its table's lock at most tasker.trigger_lock_timeout_ms()",
        (
            Edit(
                M0024,
                "        PERFORM set_config('lock_timeout', tasker.trigger_lock_timeout_ms() || 'ms', true);\n",
                "",
            ),
        ),
        (NS + "test_replacing_a_trigger_gives_up_rather_than_hold_up_producers",),
    ),
    Mutation(
        "notify_skip_no_handshake",
        "a worker ending its drain waits for the sends that skipped their notification before its last "
        "claim (it claims at once instead)",
        (
            Edit(
                "tasker_worker/runtime/drains.py",
                "done = await self.client.await_skipped_sends(namespace, AWAIT_SLICE_MS)",
                "done = True",
            ),
        ),
        (NS + "test_a_step_whose_notification_was_skipped_is_picked_up_when_the_drain_ends",),
    ),
    Mutation(
        "notify_skip_drain_never_ends",
        "the claim loop hands its lease back once its claims stop finding steps (it keeps it: "
        "producers skip while the worker idles)",
        (
            Edit(
                "tasker_worker/runtime/drains.py",
                "        self.ended(queue)\n        return None\n",
                "        return None\n",
            ),
        ),
        (NS + "test_a_step_whose_notification_was_skipped_is_picked_up_when_the_drain_ends",),
    ),
    Mutation(
        "notify_skip_open_span_overflows",
        "a step claimed while this worker's drain lease is held is checked for a missed wakeup without "
        "failing (the margin added to the open span's end, datetime.max)",
        (
            Edit(
                "tasker_worker/runtime/drains.py",
                "start - SPAN_BEFORE <= enqueued_at and enqueued_at - SPAN_AFTER <= end for",
                "start - SPAN_BEFORE <= enqueued_at <= end + SPAN_AFTER for",
            ),
        ),
        (NS + "test_a_step_enqueued_while_the_lease_is_held_was_unannounced_on_purpose",),
    ),
    Mutation(
        "notify_skip_busy_never_claims_again",
        "a busy worker (producers skip notifying) claims again every BUSY_INTERVAL_S (it waits for a "
        "notification instead)",
        (
            Edit(
                "tasker_worker/runtime/drains.py",
                "                return BUSY_INTERVAL_S\n",
                "                return None\n",
            ),
        ),
        (NS + "test_a_busy_worker_finds_unannounced_steps_by_claiming_again",),
    ),
    Mutation(
        "standby_not_synchronous",
        "nothing acknowledged is lost in a failover to a synchronous standby (the standby is not named)",
        (
            Edit(
                "tests/replication.py",
                "            if self.synchronous:\n                # Only now",
                "            if False:\n                # Only now",
            ),
        ),
        (FO + "test_synchronous_standby_loses_nothing_acknowledged",),
    ),
    Mutation(
        "pool_reconnect_doubling",
        "a pool finds a promoted primary at once (psycopg_pool's doubling reconnect wait kept)",
        (Edit("tasker_worker/db/connection.py", "POOL_RECONNECT_WINDOW_S = 0.5", "POOL_RECONNECT_WINDOW_S = 300.0"),),
        (FO + "test_asynchronous_standby_loses_the_lag_and_runs_forgotten_outcomes_again",),
    ),
    Mutation(
        "read_url_ignored",
        "the reads of the CLI, the API and the dashboard go to [database] read_url (they go to the primary)",
        (
            Edit(
                "tasker_worker/db/connection.py",
                "open_pool(config.read_url, config,",
                "open_pool(config.url or config.read_url, config,",
            ),
        ),
        (
            RR + "test_cli_reads_come_from_the_standby_and_writes_go_to_the_primary",
            RR + "test_a_worker_never_uses_the_read_url_and_the_api_reads_from_the_standby",
        ),
    ),
    Mutation(
        "writes_to_the_read_url",
        "a command that writes never uses [database] read_url (the CLI's pool prefers it)",
        (
            Edit(
                "tasker_worker/cli/admin.py",
                "    url = database_url(loaded)\n    if migrate",
                "    url = loaded.config.database.read_url or database_url(loaded)\n    if migrate",
            ),
        ),
        (RR + "test_cli_reads_come_from_the_standby_and_writes_go_to_the_primary",),
    ),
    Mutation(
        "cluster_routing_ignored",
        "a client sends a namespace's steps to the cluster that holds it (every send went to the primary)",
        (
            Edit(
                "tasker_worker/producer/client.py",
                "database = clusters.cluster_of(namespace) if namespace is not None else PRIMARY",
                "database = PRIMARY",
                count=2,  # AsyncClient and Client
            ),
        ),
        (CL + "test_a_client_send_to_beta_lands_on_cluster_two_and_is_cancelled_there",),
    ),
    Mutation(
        "cluster_slots_not_shared",
        "the concurrency is the worker's, shared by its clusters (each cluster got slots of its own)",
        (
            Edit(
                "tasker_worker/runtime/worker.py",
                "held = InFlight(slots.max_concurrent, slots.vt_seconds) if sharded else None",
                "held = None",
            ),
        ),
        (CL + "test_one_worker_runs_both_clusters_steps_exactly_once_each_outcome_on_its_own_cluster",),
    ),
    Mutation(
        "cluster_dedup_across_clusters",
        "dedup is per cluster: one step_uuid on two clusters is two steps (the worker's memory of"
        " steps held and recorded told them apart by cluster)",
        (Edit("tasker_worker/runtime/assembly.py", "key_salt=cluster_index << 128,", "key_salt=0,"),),
        (CL + "test_one_step_uuid_on_two_clusters_is_two_steps_each_recorded_on_its_own",),
    ),
    Mutation(
        "cluster_gives_back_others_steps",
        "at shutdown each cluster gives back only its own messages, through its own client",
        (
            Edit(
                "tasker_worker/runtime/processor.py",
                "        if not self.shares_slots:\n            return entries if isinstance(entries, list)",
                "        if True:\n            return entries if isinstance(entries, list)",
            ),
        ),
        (CL + "test_shutdown_gives_back_the_running_steps_of_every_cluster_within_the_one_budget",),
    ),
    Mutation(
        "deep_body_raises",
        "a body nested too deep to decode is a malformed message (dead-lettered), not an error "
        "that abandons it and, reclaimed as a lapsed claim, stops the worker",
        (
            Edit(
                "tasker_worker/domain/steps.py",
                "        except Exception:  # ValueError, RecursionError (nested too deep), ...: no usable id",
                "        except ValueError:",
            ),
            Edit(
                "tasker_worker/domain/steps.py",
                "        except Exception as exc:  # RecursionError (a body nested ~1000 deep), or worse\n"
                "            raise _undecodable(exc) from None\n",
                "",
            ),
        ),
        (HI + "test_a_body_nested_1000_deep_is_dead_lettered_and_the_worker_goes_on",),
    ),
    Mutation(
        "nan_kept_in_errors",
        "a NaN in an error's detail is stored as null (jsonb refuses NaN: the step would re-run forever)",
        (
            Edit(V, "        return value if math.isfinite(value) else None\n", "        return value\n"),
            Edit(
                "tasker_worker/errors.py",
                "    if isinstance(value, float) and not math.isfinite(value):",
                "    if False:",
            ),
        ),
        (HI + "test_nan_in_an_error_or_a_result_reaches_its_end",),
    ),
    Mutation(
        "writer_no_isolation",
        "a group the database refuses is written item by item, the refused one dead-lettered",
        (
            Edit(
                "tasker_worker/runtime/writer.py",
                "        if error is not None:\n            results, ended = await self._write_apart(",
                "        if False:\n            results, ended = await self._write_apart(",
            ),
        ),
        (HI + "test_a_group_the_database_refuses_is_written_one_by_one",),
    ),
    Mutation(
        "naive_ready_at_kept",
        "a wakeup's naive ready_at is read as UTC (compared with aware times it stopped the processor)",
        (
            Edit(
                "tasker_worker/domain/notifications.py",
                "    if ready is not None and ready.tzinfo is None:",
                "    if False:",
            ),
        ),
        (HI + "test_a_wakeup_with_a_naive_ready_at_does_not_stop_the_worker",),
    ),
    Mutation(
        "headers_not_normalised",
        "headers that are not a JSON object are read as an object (tasker_raw_headers; no .get on a list)",
        (
            Edit(
                "tasker_worker/db/queue_client.py",
                "            if headers is not None and not isinstance(headers, dict):",
                "            if False:",
            ),
            Edit(
                "tasker_worker/runtime/steps.py",
                'msg.header_count("tasker_releases")',
                'int((msg.headers or {}).get("tasker_releases", 0))',
            ),
        ),
        (HI + "test_headers_that_are_no_object_do_not_keep_a_step_from_its_end",),
    ),
    Mutation(
        "cluster_listener_not_counted",
        "a worker counts among the listeners of every cluster it listens to (only the primary's "
        "listener counted: another cluster's producers never skip, its leases never matter)",
        (
            Edit(
                "tasker_worker/runtime/worker.py",
                "                listens=event_system.has_listener,\n",
                "                listens=event_system.has_listener if db is primary else (lambda: False),\n",
            ),
        ),
        (CL + "test_listener_rows_and_drain_leases_are_kept_on_the_cluster_of_their_namespace",),
    ),
    Mutation(
        "cluster_notify_switch_on_primary",
        "a namespace's notify switch is written where its send trigger reads it, on its cluster (the "
        "worker wrote it on the primary)",
        (
            Edit(
                "tasker_worker/runtime/worker.py",
                "partial(each.set_queue_notify, ns, notify,",
                "partial(client.set_queue_notify, ns, notify,",
            ),
        ),
        (CL + "test_notify_false_of_a_namespace_is_written_on_its_cluster_and_the_cli_finds_it_there",),
    ),
    Mutation(
        "cluster_cli_notify_on_primary",
        "queue notify NS reads and turns the switch on NS's cluster (it used the primary)",
        (
            Edit(
                "tasker_worker/cli/flow.py",
                "client(args, namespace=args.namespace) as queues:  # on the namespace's cluster",
                "client(args) as queues:",
            ),
        ),
        (CL + "test_notify_false_of_a_namespace_is_written_on_its_cluster_and_the_cli_finds_it_there",),
    ),
    Mutation(
        "cluster_notify_usage_not_read",
        "/metrics has each other cluster's own pg_notification_queue_usage() (it reported 0)",
        (
            Edit(
                "tasker_worker/api/metrics.py",
                "usage.add_metric([name], (await client.database_horizon())[2])",
                "usage.add_metric([name], 0.0)",
            ),
        ),
        (CL + "test_the_api_sends_to_the_namespaces_cluster_and_metrics_cover_every_cluster",),
    ),
)


def copy_tree(dest: Path) -> None:
    """The working tree as it is (tracked and new files, not ignored ones) copied to ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = Path(raw.decode())
        source = REPO / rel
        if not source.is_file():
            continue  # deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def apply(root: Path, mutation: Mutation) -> None:
    """Apply ``mutation``'s edits under ``root``; raise if an edit no longer matches the source."""
    for edit in mutation.edits:
        path = root / edit.path
        text = path.read_text()
        found = text.count(edit.old)
        if found == 0 or (edit.count is not None and found != edit.count):
            raise SystemExit(
                f"mutation {mutation.name}: {edit.path} has {found} occurrences of the text to break"
                f" (expected {edit.count or 'at least 1'}); update the mutation to the code"
            )
        path.write_text(text.replace(edit.old, edit.new))


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[bool, float, str]:
    """Run ``tests`` in ``root`` against its own code; (passed, seconds, last lines)."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - started, "timed out"
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    return done.returncode == 0, time.monotonic() - started, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations: {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {m.guarantee}")
        return 0
    with tempfile.TemporaryDirectory(prefix="tasker-mutations-") as tmp:
        base = Path(tmp) / "base"
        copy_tree(base)
        for m in chosen:  # every edit must match before anything runs
            scratch = Path(tmp) / "check"
            shutil.copytree(base, scratch)
            apply(scratch, m)
            shutil.rmtree(scratch)
        every_test = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        passed, seconds, tail = run_tests(base, every_test)
        print(f"baseline (unmutated, {len(every_test)} test targets): {'pass' if passed else 'FAIL'} in {seconds:.0f}s")
        if not passed:
            print(tail)
            return 2
        print(f"{'mutation':32} {'result':9} {'time':>6}  guarantee")
        survivors = []
        for m in chosen:
            scratch = Path(tmp) / m.name
            shutil.copytree(base, scratch)
            apply(scratch, m)
            passed, seconds, _ = run_tests(scratch, m.tests)
            shutil.rmtree(scratch)
            print(f"{m.name:32} {'SURVIVED' if passed else 'killed':9} {seconds:5.0f}s  {m.guarantee}", flush=True)
            if passed:
                survivors.append(m.name)
        print(
            f"{len(chosen) - len(survivors)} of {len(chosen)} killed"
            + (f"; survived: {', '.join(survivors)}" if survivors else "")
        )
        return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
