"""Running the product's entry points as a user does, in processes of their own: the CLI, a
worker (``run``), the API (``api``), a script; with an environment cleared of the developer's
``TASKER_*`` variables. Every process started here is stopped by the context that started it."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment without any ``TASKER*`` variable, with its own HOME (so that the default
    embedded data directory, were anything to fall back to it, is the test's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER")}
    env["HOME"] = str(home)
    env["XDG_DATA_HOME"] = str(home / ".local" / "share")
    env.update(extra)
    return env


def cli(
    env: dict[str, str], *argv: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``tasker-worker ARGV`` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "tasker_worker.cli.main", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def script(
    env: dict[str, str], path: Path, *, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python PATH`` to its end, in the script's directory."""
    return subprocess.run(
        [sys.executable, str(path)],
        env=env,
        cwd=path.parent,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 60.0, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (psycopg.Error, OSError) as exc:  # not up yet
            last = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last})" if last else ""))


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Rows of one statement on a fresh connection."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def live_workers(url: str, namespace: str) -> int:
    """Registered workers serving ``namespace`` that have not left."""
    rows = query(
        url,
        "SELECT count(*) FROM tasker.workers WHERE status IN ('pending', 'active') AND %s = ANY(namespaces)",
        (namespace,),
    )
    return int(rows[0][0])


class Process:
    """A long-running process (a worker, the API) with its output collected at the end."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.stdout = ""
        self.stderr = ""
        self.stopped = False

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for it to exit (a graceful stop: its exit handlers run); once."""
        if self.stopped:
            return int(self.popen.returncode)
        self.stopped = True
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            out, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            out, err = self.popen.communicate(timeout=10)
        self.stdout += out or ""
        self.stderr += err or ""
        return int(self.popen.returncode)


@contextmanager
def running(env: dict[str, str], *argv: str, cwd: Path | None = None) -> Iterator[Process]:
    """``tasker-worker ARGV`` in the background for the block; stopped (SIGTERM) after it."""
    popen = subprocess.Popen(
        [sys.executable, "-m", "tasker_worker.cli.main", *argv],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process = Process(popen)
    try:
        yield process
    finally:
        process.stop()


@contextmanager
def running_api(env: dict[str, str], *argv: str, cwd: Path | None = None) -> Iterator[tuple[Process, str]]:
    """``tasker-worker api --port 0 ARGV`` and its base URL, read from the line it prints."""
    with running(env, "api", "--port", "0", *argv, cwd=cwd) as api:
        assert api.popen.stdout is not None
        # The line is printed (and flushed) once it listens; a bounded wait for it.
        ready, _, _ = select.select([api.popen.stdout], [], [], 60)
        line = api.popen.stdout.readline() if ready else ""
        found = re.search(r"http://[\d.]+:\d+", line)
        if found is None:
            api.stop()
            raise AssertionError(f"the API did not start: {line!r} {api.stderr[-2000:]}")
        yield api, found.group(0)


def readme_block(heading: str, language: str = "python") -> str:
    """The first ``language`` block of the README under ``## heading``."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"^```{language}\n(.*?)^```", section, re.S | re.M)
    assert match is not None, f"no {language} block under {heading}"
    return match.group(1)
