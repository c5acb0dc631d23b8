"""The embedded server's lifecycle is safe to share: whoever did not start it never stops it, the
one that did says so and leaves it running too, ``db stop`` is the one stop. Workers, clients
and the CLI in processes of their own, some attached through the configuration (no URL), some
through the exported URL, as a user following the README runs them."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from entrypoints import Process, clean_env, cli, live_workers, query, readme_block, running, script, wait_for

from tasker_worker.db.embedded import is_running, stop_running

NS = "orders"

#: A client process that stays up between commands read from its stdin: ``wait`` sends a step
#: and waits for its outcome, ``send`` only sends one; it exits (normally) at the end of stdin.
CLIENT = """
import sys
from tasker_worker import Client

with Client() as client:
    print("ready", flush=True)
    for line in sys.stdin:
        ref = client.send_step("orders", "noop", {"line": line.strip()})
        if line.strip() == "wait":
            print(client.wait_for(ref.step_uuid, timeout=60).status, flush=True)
        else:
            print("sent", ref.step_uuid, flush=True)
"""


class ClientProcess:
    """``CLIENT`` running, answering one line per command."""

    def __init__(self, env: dict[str, str], path: Path) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(path)],
            env=env,
            cwd=path.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.answer() == "ready"

    def answer(self, timeout: float = 90) -> str:
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        line = self.popen.stdout.readline() if ready else ""
        if not line:
            self.exit()
            raise AssertionError(f"the client process did not answer: {self.popen.stderr}")
        return line.strip()

    def ask(self, command: str) -> str:
        assert self.popen.stdin is not None
        self.popen.stdin.write(command + "\n")
        self.popen.stdin.flush()
        return self.answer()

    def exit(self) -> int:
        """End its stdin: it leaves its ``with`` block and exits normally (exit handlers run)."""
        try:
            _, err = self.popen.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            _, err = self.popen.communicate(timeout=10)
        assert self.popen.returncode == 0, err[-3000:]
        return self.popen.returncode


@contextmanager
def embedded_home(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """The environment of processes that use the embedded server in ``tmp_path/pgdata``
    through the configuration; the server, if any is left running, is stopped at the end."""
    data_dir = tmp_path / "pgdata"
    try:
        yield clean_env(tmp_path, TASKER__DATABASE__EMBEDDED_DATA_DIR=str(data_dir)), data_dir
    finally:
        stop_running(data_dir)


def _step_runs(url_env: dict[str, str]) -> None:
    """A step sent by the CLI over the exported URL is run by a worker still up."""
    sent = cli(url_env, "queue", "send", NS, "--handler", "noop", "--json")
    assert sent.returncode == 0, sent.stderr
    [ref] = json.loads(sent.stdout)
    waited = cli(url_env, "steps", "wait", ref["step_uuid"], "--timeout", "60", "--poll-interval", "0.5")
    assert waited.returncode == 0, (waited.stdout, waited.stderr)


def test_the_readme_sequence_a_worker_keeps_running_steps_after_the_clients_exit(tmp_path: Path) -> None:
    """``db url``, ``export TASKER_DATABASE_URL``, ``run &``, ``python app.py``: the client's exit
    (attached by URL, or through the configuration to the running server) stops nothing."""
    app = tmp_path / "app.py"
    app.write_text(readme_block("Send steps and wait for them from Python"))
    with embedded_home(tmp_path) as (env, data_dir):
        printed = cli(env, "db", "url")
        assert printed.returncode == 0, printed.stderr
        assert "started it now" in printed.stderr and "db stop" in printed.stderr
        url_env = {**env, "TASKER_DATABASE_URL": printed.stdout.strip()}
        with running(url_env, "run", "--namespace", NS, cwd=tmp_path) as worker:
            wait_for("the worker", lambda: live_workers(url_env["TASKER_DATABASE_URL"], NS) == 1)
            for client_env in (url_env, env):  # by URL; through the configuration (attaching)
                done = script(client_env, app)
                assert done.returncode == 0 and done.stdout.startswith("succeeded"), (done.stdout, done.stderr)
                assert is_running(data_dir)
                _step_runs(url_env)  # after the client's exit
            assert worker.popen.poll() is None
        assert worker.popen.returncode == 0, worker.stderr[-3000:]
        assert "terminating connection" not in worker.stderr
        again = cli(env, "db", "url")
        assert "it was running, started by pid" in again.stderr and "db url" in again.stderr
        stopped = cli(env, "db", "stop")
        assert stopped.returncode == 0 and "stopped the embedded server" in stopped.stdout, stopped.stderr
        assert "(started by pid" in stopped.stdout and not is_running(data_dir)
        assert "no embedded server runs" in cli(env, "db", "stop").stdout


@pytest.mark.parametrize("first", ["client", "worker", "url-worker"])
def test_two_workers_and_a_client_share_the_server_whoever_exits_first(tmp_path: Path, first: str) -> None:
    """The client starts the server; a worker attaches through the configuration, another by the
    exported URL (as the README's sequence does). Whichever exits first, then whichever next,
    those left keep working, and the server runs on until ``db stop``."""
    client_script = tmp_path / "client.py"
    client_script.write_text(CLIENT)
    with embedded_home(tmp_path) as (env, data_dir):
        # A worker needs its queue before the client's first step: the client sends to it.
        client = ClientProcess(env, client_script)  # the first: it starts the server
        url_env = {**env, "TASKER_DATABASE_URL": cli(env, "db", "url").stdout.strip()}
        url = url_env["TASKER_DATABASE_URL"]
        record = query(url, "SELECT 1")  # reachable by URL
        assert record == [(1,)]
        started = json.loads((data_dir / "tasker-started-by.json").read_text())
        assert started["pid"] == client.popen.pid
        with (
            running(env, "run", "--namespace", NS, cwd=tmp_path) as worker,
            running(url_env, "run", "--namespace", NS, cwd=tmp_path) as url_worker,
        ):
            wait_for("both workers", lambda: live_workers(url, NS) == 2)
            assert client.ask("wait") == "succeeded"
            members: dict[str, ClientProcess | Process] = {"client": client, "worker": worker, "url-worker": url_worker}
            order = [first, *[name for name in members if name != first]]
            for leaving in order[:2]:
                gone = members.pop(leaving)
                if isinstance(gone, ClientProcess):
                    gone.exit()
                else:
                    assert gone.stop() == 0, gone.stderr[-3000:]
                assert is_running(data_dir), f"the server stopped when the {leaving} exited"
                for name, member in members.items():  # those left keep working
                    if isinstance(member, ClientProcess):
                        assert member.ask("send").startswith("sent"), name
                    else:
                        assert member.popen.poll() is None, name
                        _step_runs(url_env)
            [last] = members.values()
            if isinstance(last, ClientProcess):
                last.exit()
        assert is_running(data_dir), "nobody but db stop stops the server"
        assert "stopped the embedded server" in cli(env, "db", "stop").stdout
