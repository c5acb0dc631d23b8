"""CLI: exit codes (0 ok, 1 runtime, 2 usage/config), one-line errors, --help everywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from tasker_worker.cli.main import build_parser


def run(env: dict[str, str], *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasker_worker.cli.main", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _leaf_commands() -> list[list[str]]:
    import argparse

    out: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append(prefix)
            return
        for name, child in subs[0].choices.items():
            walk(child, [*prefix, name])

    walk(build_parser(), [])
    return out


@pytest.mark.parametrize("argv", _leaf_commands(), ids=" ".join)
def test_help_on_every_command(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*argv, "--help"])
    assert info.value.code == 0


def test_queue_lifecycle_and_exit_codes(cli_env: dict[str, str]) -> None:
    assert run(cli_env, "version").stdout.startswith("tasker-worker ")
    created = run(cli_env, "queue", "create", "cli")
    assert created.returncode == 0, created.stderr
    sent = run(cli_env, "queue", "send", "cli", "--handler", "noop", "--inputs", '{"a": 1}', "--count", "25")
    assert sent.returncode == 0 and "sent 25" in sent.stdout, sent.stderr
    metrics = run(cli_env, "queue", "metrics", "cli", "--json")
    assert metrics.returncode == 0
    assert json.loads(metrics.stdout)[0]["queue_length"] == 25
    listed = run(cli_env, "queue", "list", "--json")
    assert {q["queue_name"] for q in json.loads(listed.stdout)} >= {"worker_cli_queue", "worker_cli_queue_dlq"}
    purged = run(cli_env, "queue", "purge", "cli")
    assert purged.returncode == 0 and "purged 25" in purged.stdout
    status = run(cli_env, "db", "status")
    assert status.returncode == 0 and "pgmq" in status.stdout and "pending" not in status.stdout


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["queue", "send", "cli", "--handler", "noop", "--inputs", "{bad"], 2, "--inputs is not valid JSON"),
        (["queue", "send", "cli", "--handler", "noop", "--inputs", "[1]"], 2, "must be a JSON object"),
        (["queue", "send", "cli", "--handler", "noop", "--count", "0"], 2, "--count"),
        (["queue", "send", "cli", "--handler", "bad handler"], 2, "handler name"),
        (["queue", "metrics", "nosuch"], 1, "does not exist"),
        (["queue", "purge", "nosuch"], 1, "does not exist"),
        (["queue", "send", "nosuch", "--handler", "noop"], 1, "does not exist"),
        (["no-such-command"], 2, "invalid choice"),
    ],
)
def test_error_exit_codes(cli_env: dict[str, str], argv: list[str], code: int, words: str) -> None:
    proc = run(cli_env, *argv)
    assert proc.returncode == code, proc.stderr
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_errors_exit_2_with_one_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[event_system]\ndeployment_mode = "Never"\n')
    proc = run(cli_env, "config", "show", "--config", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(bad) in proc.stderr
    proc = run(cli_env, "config", "show", "--config", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_unreachable_database_is_a_runtime_error(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "TASKER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2"}
    proc = run(env, "db", "migrate")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot connect to PostgreSQL") and proc.stderr.count("\n") == 1


def test_config_reference_says_what_each_key_means_with_durations_as_written(cli_env: dict[str, str]) -> None:
    proc = run(cli_env, "config", "reference")
    assert proc.returncode == 0
    rows = {line.split(" | ")[0].strip("| `"): line for line in proc.stdout.splitlines() if line.startswith("| `")}
    assert rows["retention.outcomes"].startswith('| `retention.outcomes` | `"7d"` |')  # not "10080m"
    assert "not a handler timeout" in rows["event_system.processing_timeout"]
    assert all(not line.endswith("|  |") for line in rows.values())  # every key has a meaning


def test_a_mistyped_environment_is_an_error(cli_env: dict[str, str]) -> None:
    proc = run(cli_env, "--env", "prodution", "config", "show")
    assert proc.returncode == 2 and "'prodution' has no overlay" in proc.stderr and "production" in proc.stderr
    assert run(cli_env, "--env", "adhoc", "--allow-missing-env", "config", "show").returncode == 0


def test_debug_shows_traceback(cli_env: dict[str, str]) -> None:
    proc = run(cli_env, "--debug", "queue", "metrics", "nosuch")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_config_show_reports_origins(cli_env: dict[str, str]) -> None:
    proc = run({**cli_env, "TASKER__RETRY__MAX_ATTEMPTS": "9"}, "config", "show", "--json")
    data = json.loads(proc.stdout)
    assert data["retry.max_attempts"] == {"value": 9, "origin": "env TASKER__RETRY__MAX_ATTEMPTS"}
    assert data["event_system.deployment_mode"]["origin"].endswith("test/worker.toml")


def test_a_reader_that_stops_early_is_not_an_error(cli_env: dict[str, str]) -> None:
    """`config show | grep -q key` under `pipefail`: the reader is gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tasker_worker.cli.main", "config", "show"],
            env=cli_env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_demo_runs_end_to_end(cli_env: dict[str, str]) -> None:
    proc = run(cli_env, "demo", "--steps", "30", "--size", "16", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 30
    assert sum(summary["outcomes"].values()) == 30
    assert set(summary["outcomes"]) <= {"succeeded", "failed"}
    assert summary["claimed"]["event"] + summary["claimed"]["poll"] == 30


def test_event_loop_choice_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasker_worker.cli import run as run_module
    from tasker_worker.errors import ConfigError

    assert run_module.loop_options("auto") == {"use_uvloop": True}  # installed with the project here
    assert run_module.loop_options("asyncio") == {"use_uvloop": False}
    monkeypatch.setattr(run_module.importlib.util, "find_spec", lambda name: None)
    assert run_module.loop_options("auto") == {"use_uvloop": False}
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        run_module.loop_options("uvloop")


def test_queue_send_prints_the_step_uuid_and_steps_show_where_it_is(cli_env: dict[str, str]) -> None:
    assert run(cli_env, "queue", "create", "shown").returncode == 0
    chosen = str(uuid.uuid4())
    sent = run(cli_env, "queue", "send", "shown", "--handler", "noop", "--step-uuid", chosen, "--delay", "3600")
    assert sent.returncode == 0 and sent.stdout.startswith(f"step_uuid {chosen} (msg_id "), sent.stderr
    again = run(cli_env, "queue", "send", "shown", "--handler", "noop", "--step-uuid", chosen, "--json")
    [ref] = json.loads(again.stdout)
    assert ref["step_uuid"] == chosen and ref["created"] is False
    shown = run(cli_env, "steps", "show", chosen)
    assert shown.returncode == 0 and "delayed" in shown.stdout and "worker_shown_queue" in shown.stdout
    batch = json.loads(run(cli_env, "queue", "send", "shown", "--handler", "noop", "--count", "3", "--json").stdout)
    assert len({r["step_uuid"] for r in batch}) == 3
    missing = run(cli_env, "steps", "show", str(uuid.uuid4()))
    assert missing.returncode == 1 and "--namespace" in missing.stdout
    assert run(cli_env, "steps", "show", "not-a-uuid").returncode == 2


def test_steps_wait_and_list_after_a_worker_ran_them(cli_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "my_app.py").write_text(
        "def register(worker):\n"
        "    @worker.handler('triple')\n"
        "    def triple(ctx, step):\n"
        "        return step.inputs['n'] * 3\n"
    )
    assert run(cli_env, "queue", "create", "app").returncode == 0
    ok = json.loads(
        run(cli_env, "queue", "send", "app", "--handler", "triple", "--inputs", '{"n": 2}', "--json").stdout
    )
    env = {**cli_env, "TASKER__EVENT_SYSTEM__DEPLOYMENT_MODE": "Hybrid"}
    # A module in the working directory, named on the command line: importable as with `python -m`.
    # The console script (not `python -m`, which would put the directory on sys.path itself).
    script = str(Path(sys.executable).parent / "tasker-worker")
    worker = subprocess.Popen(
        [script, "run", "--namespace", "app", "--handlers", "my_app"],
        env={k: v for k, v in env.items() if k != "PYTHONPATH"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        waited = run(cli_env, "steps", "wait", ok[0]["step_uuid"], "--timeout", "60", "--json")
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
    assert waited.returncode == 0, (waited.stdout, waited.stderr, err)
    assert json.loads(waited.stdout)["result"] == 6
    listed = run(cli_env, "steps", "list", "--namespace", "app", "--status", "succeeded", "--json")
    assert [r["step_uuid"] for r in json.loads(listed.stdout)] == [ok[0]["step_uuid"]]
    assert "succeeded" in run(cli_env, "steps", "list").stdout


def test_db_url_and_db_shell(cli_env: dict[str, str]) -> None:
    url = run(cli_env, "db", "url")
    assert url.returncode == 0 and url.stdout.strip() == cli_env["TASKER_DATABASE_URL"]
    shell = run(cli_env, "db", "shell", "--", "-tAc", "SELECT count(*) FROM tasker.schema_migrations")
    assert shell.returncode == 0 and int(shell.stdout.strip()) >= 12, shell.stderr


def test_db_url_starts_the_embedded_server_and_db_stop_stops_it(cli_env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in cli_env.items() if k != "TASKER_DATABASE_URL"}
    env["TASKER__DATABASE__EMBEDDED_DATA_DIR"] = str(tmp_path / "pgdata")
    try:
        printed = run(env, "db", "url", timeout=120)
        assert printed.returncode == 0, printed.stderr
        with psycopg.connect(printed.stdout.strip(), autocommit=True) as conn:  # after the command ended
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        stopped = run(env, "db", "stop", timeout=120)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert "no embedded server" in run(env, "db", "stop").stdout
