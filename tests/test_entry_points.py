"""One resolution of the configuration for every entry point: the README's client script, a
worker (``run``), the CLI (``steps``, ``config show``), the API and the clients in this process
all reach the database that ``TASKER_DATABASE_URL`` or a TOML file names (never the embedded
server's), and say where it came from; the pytest plugin resolves the same layers."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from entrypoints import (
    clean_env,
    cli,
    live_workers,
    query,
    readme_block,
    running,
    running_api,
    script,
    wait_for,
)

from tasker_worker import AsyncClient, Client
from tasker_worker.db.embedded import stop_running
from tasker_worker.errors import DatabaseError

NS = "orders"


def _project(root: Path, db_url: str, source: str) -> dict[str, str]:
    """A user's project directory (``root``) whose database is ``db_url``, named by
    ``TASKER_DATABASE_URL`` (``source="env"``) or by ``config/tasker/base/worker.toml`` in it
    (``"toml"``); returns the environment to run its processes in."""
    embedded = root / "embedded-pgdata"  # where a wrong fallback to the embedded server would go
    env = clean_env(root, TASKER__DATABASE__EMBEDDED_DATA_DIR=str(embedded))
    if source == "env":
        env["TASKER_DATABASE_URL"] = db_url
    else:
        base = root / "config" / "tasker" / "base"
        base.mkdir(parents=True)
        (base / "worker.toml").write_text(f'[database]\nurl = "{db_url}"\n\n[registry]\nheartbeat_interval = "1s"\n')
    (root / "app.py").write_text(readme_block("Send steps and wait for them from Python"))
    return env


def _embedded_dirs(root: Path) -> list[Path]:
    """Where an embedded server of a process run by ``_project`` would live: the configured
    directory, or the default one (under the test's HOME) for a process that ignored the config."""
    return [root / "embedded-pgdata", root / ".local" / "share" / "tasker-worker" / "pgdata"]


@pytest.mark.parametrize("source", ["env", "toml"])
def test_the_readme_client_a_worker_the_cli_and_the_api_reach_the_configured_database(
    db_url: str, tmp_path: Path, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _project(tmp_path, db_url, source)
    expected_origin = "env TASKER_DATABASE_URL" if source == "env" else str(Path("config/tasker/base/worker.toml"))
    try:
        with running(env, "run", "--namespace", NS, cwd=tmp_path) as worker:
            wait_for("the worker to register", lambda: live_workers(db_url, NS) == 1)
            sent = script(env, tmp_path / "app.py")  # the README's script, exactly as written
            assert sent.returncode == 0, (sent.stdout, sent.stderr, worker.popen.poll())
            assert sent.stdout.split()[0] == "succeeded", sent.stdout
            [(step_uuid,)] = query(db_url, "SELECT step_uuid FROM tasker.step_results")

            shown = cli(env, "steps", "show", str(step_uuid), "--json", cwd=tmp_path)
            assert shown.returncode == 0, shown.stderr
            assert json.loads(shown.stdout)["status"] == "succeeded"
            config = json.loads(cli(env, "config", "show", "--json", cwd=tmp_path).stdout)
            assert config["database.url"] == {"value": db_url, "origin": expected_origin}

            with running_api(env, cwd=tmp_path) as (_, base):
                answer = httpx.get(f"{base}/api/steps/{step_uuid}", timeout=30)
            assert answer.status_code == 200 and answer.json()["status"] == "succeeded"
        assert worker.popen.returncode == 0, worker.stderr[-3000:]

        # The clients in this process, with no URL: the same database, and they say from where.
        monkeypatch.chdir(tmp_path)
        for name, value in env.items():
            if name.startswith("TASKER") or name in ("HOME", "XDG_DATA_HOME"):
                monkeypatch.setenv(name, value)
        with Client() as client:
            found = client.get_result(step_uuid)
            assert found is not None and found.status == "succeeded"
            assert client._target.source == f"database.url from {expected_origin}"
    finally:
        for data_dir in _embedded_dirs(tmp_path):
            stop_running(data_dir)
    # Nothing fell back to the embedded server (the configured one's, or the default one).
    assert not any((data_dir / "PG_VERSION").exists() for data_dir in _embedded_dirs(tmp_path))


@pytest.mark.anyio
async def test_a_client_without_a_url_names_its_database_when_it_is_the_wrong_one(
    blank_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure of the issue: a client on a database without the schema. It says which
    database it is on, where that came from, and what to do."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TASKER_DATABASE_URL", blank_db_url)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))  # a wrong fallback to the embedded server stays here
    try:
        async with AsyncClient() as client:
            with pytest.raises(DatabaseError, match=r'schema "tasker" does not exist.*db migrate.*TASKER_DATABASE_URL'):
                await client.send_step(NS, "noop", {})
    finally:
        stop_running(tmp_path / "tasker-worker" / "pgdata")


def test_the_pytest_plugin_resolves_the_projects_configuration(pg_admin_url: str, tmp_path: Path) -> None:
    base = tmp_path / "config" / "tasker" / "base"
    base.mkdir(parents=True)
    (base / "worker.toml").write_text('[retry]\nmax_attempts = 7\n\n[event_system]\ndeployment_mode = "PollingOnly"\n')
    (tmp_path / "test_project.py").write_text(
        "import pytest\n"
        "\n"
        "@pytest.fixture\n"
        "def anyio_backend():\n"
        "    return 'asyncio'\n"
        "\n"
        "def test_config(tasker_config, tasker_db_url):\n"
        "    c = tasker_config.config\n"
        "    assert c.retry.max_attempts == 7\n"
        "    assert tasker_config.origin('retry.max_attempts').endswith('worker.toml')\n"
        "    assert c.worker.name == 'from-env'\n"
        "    assert tasker_config.origin('worker.name') == 'env TASKER__WORKER__NAME'\n"
        "    assert (c.database.url, tasker_config.origin('database.url')) == (tasker_db_url, 'pytest plugin')\n"
        "    assert c.environment == 'test'\n"
        "\n"
        "@pytest.mark.anyio\n"
        "async def test_worker(tasker_worker):\n"
        "    async with tasker_worker(namespaces=['plugin']) as run:\n"
        "        assert run.worker.config.retry.max_attempts == 7\n"
        "        assert run.worker.config.worker.name == 'from-env'\n"
        "        [step] = await run.send('plugin', 'noop', [{'n': 1}])\n"
        "        assert (await run.outcome(step))['status'] == 'succeeded'\n"
    )
    env = clean_env(tmp_path, TASKER_TEST_DATABASE_URL=pg_admin_url, TASKER__WORKER__NAME="from-env")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_project.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout


def test_an_explicit_url_is_the_top_layer(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Client(url)`` wins over the environment, as ``--database-url`` does for the CLI."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TASKER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    with Client(db_url) as client:
        assert client.get_result(uuid.uuid4()) is None
        assert client._target.source == "database.url from the client's URL"
