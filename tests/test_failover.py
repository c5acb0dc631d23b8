"""Primary failover as a guarantee: a primary and a streaming standby, two Hybrid workers and a
producer on the multi-host URL, the primary killed with SIGKILL mid-stream and the standby
promoted (``tests/failover.py``; ``python benchmarks/failover.py`` runs it at full size).

Each test builds its own pair of servers and stops them (also on failure)."""

from __future__ import annotations

import failover
import pytest
from replication import ReplicatedCluster

pytestmark = pytest.mark.heavy


def assert_moved(drill: failover.Drill) -> None:
    """The workers followed the URL to the new primary: heartbeats, LISTEN, the supervision lock."""
    assert drill.heartbeats_s is not None and drill.listeners_s is not None and drill.supervisor_s is not None
    assert drill.event_pickups_after > 0, drill  # notifications of the new primary woke the workers
    for worker in drill.details["workers"]:
        assert worker["exit_code"] == 0, drill
        assert (worker["listener_reconnects"] or 0) >= 1, drill
    assert drill.first_step_s is not None, drill


def test_synchronous_standby_loses_nothing_acknowledged() -> None:
    """``synchronous_standby_names`` names the standby: at the kill a worker's outcome write and
    the producer's send wait for it (in flight, never acknowledged); after the promotion every
    acknowledged send has exactly one outcome and one run, and what was in flight ran once more
    on the new primary, recorded once."""
    with ReplicatedCluster(synchronous=True) as cluster:
        drill = failover.failover_drill(cluster)
    assert drill.settles_in_flight >= 1 and drill.send_in_flight, drill
    assert drill.lost_sends == 0, drill
    assert drill.doubled == 0 and drill.unmatched == 0, drill
    assert drill.details["old_primary_steps_missing_on_new"] == 0, drill
    assert_moved(drill)


def test_asynchronous_standby_loses_the_lag_and_runs_forgotten_outcomes_again() -> None:
    """Without a synchronous standby what the primary committed in its last moments is gone:
    sends it acknowledged (never run: the producer must send them again) and outcomes it
    recorded (their steps run again on the new primary, recorded once: the outcome key), and
    claims it acknowledged (``synchronous_commit = off``: the message is claimable again at
    once, with the read_ct of the forgotten claim; still one outcome, one run). The primary stays
    away 3.5 s (a failover manager deciding): the pools find the new primary at once."""
    with ReplicatedCluster(synchronous=False) as cluster:
        drill = failover.failover_drill(cluster, outage_s=3.5)
    assert drill.acked_while_frozen >= 1 and drill.lost_sends >= 1, drill
    assert drill.loss_window_s < 10, drill  # what is lost is the last moments, not older sends
    assert drill.rerun >= 1 and drill.forgotten_claims >= 1, drill
    assert drill.doubled == 0 and drill.unmatched == 0, drill
    assert drill.first_step_after_promotion_s is not None and drill.first_step_after_promotion_s < 2.0, drill
    assert_moved(drill)
