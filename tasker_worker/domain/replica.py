"""How stale the reads of ``[database] read_url`` are: the state of the server they come from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaState:
    """What the server behind a read URL says of its replication, as of one query.

    A standby replays the primary's WAL; its reads are as old as the last transaction it
    replayed, unless it has replayed everything it received while still streaming. A tasker fleet
    commits every heartbeat interval at least, so on a live fleet the age of the last replayed
    commit is the staleness of the reads (on an idle primary it only grows because nothing is
    committed).
    """

    #: The server is a standby (in recovery); False: a primary, whose reads are current.
    standby: bool
    #: Its WAL receiver streams from a primary (None: not known, e.g. without the privilege).
    streaming: bool | None = None
    #: Everything received has been replayed.
    caught_up: bool = False
    #: Replay was paused (``pg_wal_replay_pause()``).
    paused: bool = False
    #: Seconds since the last replayed transaction committed on the primary (None: none yet).
    replay_age_s: float | None = None

    @property
    def lag_s(self) -> float:
        """How far behind the primary the reads may be: 0 for a primary or a standby that
        streams and has replayed all it received, else the age of the last replayed commit."""
        if not self.standby or (self.caught_up and self.streaming is not False and not self.paused):
            return 0.0
        return max(0.0, self.replay_age_s or 0.0)

    def describe(self) -> str:
        """One line for people: ``a standby, caught up``, ``a standby 2.4 s behind (replay
        paused)``, ``a primary (reads are current)``."""
        if not self.standby:
            return "a primary (reads are current)"
        notes = []
        if self.paused:
            notes.append("replay paused")
        if self.streaming is False:
            notes.append("not streaming from the primary")
        note = f" ({', '.join(notes)})" if notes else ""
        lag = self.lag_s
        if lag == 0.0:
            return f"a standby, caught up{note}"
        return f"a standby {lag:.1f} s behind{note}"

    def as_json(self) -> dict[str, object]:
        """For JSON answers."""
        return {
            "standby": self.standby,
            "streaming": self.streaming,
            "caught_up": self.caught_up,
            "paused": self.paused,
            "replay_age_s": None if self.replay_age_s is None else round(self.replay_age_s, 3),
            "lag_s": round(self.lag_s, 3),
        }
