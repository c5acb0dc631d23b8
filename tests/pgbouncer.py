"""A real PgBouncer (Debian's package) in transaction pooling mode in front of the test server.

``.ci/run`` installs it when missing; elsewhere the tests that need it are skipped with the
command that installs it. The test that starts it stops it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import conninfo

#: How long PgBouncer may take to accept connections.
START_TIMEOUT_S = 15.0


def binary() -> str | None:
    """The pgbouncer executable, if installed (Debian puts it in /usr/sbin)."""
    return shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as(host: str) -> str | None:
    """PgBouncer refuses to run as root: run it as the owner of the server's socket directory
    (the embedded server's is private to its user), or as nobody for a TCP server."""
    if os.geteuid() != 0:
        return None
    if host.startswith("/"):
        return pwd.getpwuid(Path(host).stat().st_uid).pw_name
    return "nobody"


@contextlib.contextmanager
def running_pgbouncer(admin_url: str, *, pool_size: int = 2, ignore_options: bool = False) -> Iterator[str]:
    """Start PgBouncer (``pool_mode = transaction``, ``pool_size`` server connections per
    database) for the server of ``admin_url``; yield a URL template without dbname (use
    ``conninfo.make_conninfo(url, dbname=...)``); stop it on exit. ``ignore_options``: accept
    and drop the ``options`` startup parameter (as deployments that allow it do)."""
    exe = binary()
    if exe is None:
        raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
    server = conninfo.conninfo_to_dict(admin_url)
    host = str(server.get("host") or "localhost")
    user = str(server.get("user") or "postgres")
    password = str(server.get("password") or "")
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="tasker-pgbouncer-"))
    workdir.chmod(0o755)
    target = f"host={host} port={server.get('port') or 5432} user={user}"
    if password:
        target += f" password={password}"
    (workdir / "users.txt").write_text(f'"{user}" "{password}"\n')
    (workdir / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"* = {target}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {workdir / 'users.txt'}",
                "pool_mode = transaction",
                f"default_pool_size = {pool_size}",
                "max_client_conn = 200",
                # psycopg's connections ask for these; PgBouncer must not refuse them.
                "ignore_startup_parameters = extra_float_digits" + (",options" if ignore_options else ""),
                f"logfile = {workdir / 'pgbouncer.log'}",
                f"pidfile = {workdir / 'pgbouncer.pid'}",
                "",
            ]
        )
    )
    for name in ("users.txt", "pgbouncer.ini"):
        (workdir / name).chmod(0o644)
    argv = [exe]
    run_as = _run_as(host)
    if run_as is not None:
        (workdir / "pgbouncer.log").touch()
        shutil.chown(workdir / "pgbouncer.log", run_as)
        shutil.chown(workdir, run_as)
        argv += ["-u", run_as]
    proc = subprocess.Popen([*argv, str(workdir / "pgbouncer.ini")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"host=127.0.0.1 port={port} user={user}" + (f" password={password}" if password else "")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log = (workdir / "pgbouncer.log").read_text() if (workdir / "pgbouncer.log").exists() else ""
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"pgbouncer exited with {proc.returncode}: {out[-1000:]} {log[-1000:]}")
            try:
                with psycopg.connect(conninfo.make_conninfo(url, dbname="postgres"), connect_timeout=2):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)
