"""The dashboard in a real browser: Debian's chromium driven through its chromedriver (Selenium),
against a real fleet on the test PostgreSQL: a ``tasker-worker run`` process serving the
namespace and a ``tasker-worker api`` process serving the pages, as an operator would run them.

What the browser must see: the overview's depth (updated by the page's own refresh, no reload),
a worker with its mode, a dead letter with its reason, the requeue button bringing it back to
its queue where it then succeeds, a mode switch from the page reaching the worker, hostile
text shown as text. The screenshots in docs/images are taken here: run with
``TASKER_UPDATE_SCREENSHOTS=1`` to write them there (otherwise they go to a temporary folder).

Without chromium and chromedriver (``apt-get install chromium chromium-driver``; ``.ci/run``
installs them) these tests, and only these, are skipped with that reason.
"""

from __future__ import annotations

import base64
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from chaos import poll_until
from psycopg.types.json import Jsonb

TESTS = Path(__file__).resolve().parent
SCREENSHOTS = TESTS.parent / "docs" / "images"
CHROMIUM = os.environ.get("TASKER_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TASKER_CHROMEDRIVER", "/usr/bin/chromedriver")
NS = "dash"
IDLE = "idle"  # a namespace no worker serves: what is sent there stays
TOKEN = "operator-s3cret"
#: The page refreshes every 5 s and the overview is gathered at most every 2 s.
SEEN_WITHIN_S = 20


def _missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"no browser: {path} is missing (apt-get install chromium chromium-driver; .ci/run does)"
    return None


pytestmark = pytest.mark.skipif(_missing_browser() is not None, reason=str(_missing_browser()))


@dataclass
class Fleet:
    """The processes of one test and what the test needs of them."""

    base: str
    db_url: str
    worker_id: str
    gate: Path

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def wait(self, query: str, expected: Any, what: str, params: Any = None, timeout: float = 30) -> None:
        poll_until(lambda: self.sql(query, params) == expected, timeout, what)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _api_url(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """The address ``tasker-worker api`` prints once it is serving (it binds port 0)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"tasker-worker api exited: {proc.stderr.read() if proc.stderr else ''}")
        if line.startswith("tasker-worker API on "):
            return line.split(" on ", 1)[1].strip()
    raise AssertionError(f"tasker-worker api did not say where it serves within {timeout}s")


@pytest.fixture
def fleet(url: str, cli_env: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (IDLE,))
    env = {
        **cli_env,
        "PYTHONPATH": str(TESTS),
        "TASKER__WORKER__HANDLER_MODULES": '["dashboard_handlers"]',
        "TASKER__WORKER__NAMESPACES": f'["{NS}"]',
        "TASKER__API__TOKEN": TOKEN,
    }
    command = [sys.executable, "-m", "tasker_worker.cli.main"]
    worker = subprocess.Popen(
        [*command, "run", "--mode", "Hybrid"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    api = subprocess.Popen(
        [*command, "api"],
        env={**env, "TASKER__API__PORT": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = _api_url(api)
        probe = Fleet(base, url, "", tmp_path / "gate-open")
        probe.wait("SELECT count(*) FROM tasker.workers WHERE status = 'active'", [(1,)], "the worker to be active")
        [(worker_id,)] = probe.sql("SELECT worker_id FROM tasker.workers")
        yield Fleet(base, url, worker_id, tmp_path / "gate-open")
    finally:
        _stop(api)
        _stop(worker)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless, and nothing that reaches for the network: this machine has none to give.
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def text_of(driver: Any, css: str) -> str:
    """The visible text of the first element matching ``css`` ("" when there is none), read in
    one script call: the page replaces its content as it refreshes, so an element found in one
    call may be gone by the next."""
    script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';"
    return str(driver.execute_script(script, css))


def hold_still(driver: Any) -> None:
    """Stop the page's own refresh as an operator does by starting to fill in a form (an input
    event), so that the elements a test goes on to click stay the ones it found."""
    driver.execute_script("document.getElementById('live').dispatchEvent(new Event('input', {bubbles: true}));")


def wait_text(driver: Any, css: str, wanted: str, timeout: float = SEEN_WITHIN_S) -> None:
    """Wait until ``css``'s text contains ``wanted`` (the page refreshes itself meanwhile)."""
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: wanted in text_of(d, css))
    except Exception as exc:
        raise AssertionError(f"{css} never showed {wanted!r}; it shows {text_of(driver, css)!r}") from exc


def screenshot(driver: Any, name: str, tmp_path: Path) -> Path:
    """A full-page screenshot: into docs/images with TASKER_UPDATE_SCREENSHOTS=1, else tmp_path."""
    folder = SCREENSHOTS if os.environ.get("TASKER_UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    # The whole page (to 2000 px), not only the window: Chrome's own capture beyond the viewport.
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": min(max(height, 600), 2000), "scale": 1},
        },
    )
    path = folder / name
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def send(fleet: Fleet, namespace: str, handler: str, inputs: dict[str, Any], count: int = 1) -> list[str]:
    """Send steps with tasker.enqueue_step; their step_uuids."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    for step_uuid in ids:
        fleet.sql("SELECT tasker.enqueue_step(%s, %s, %s, %s::uuid)", (namespace, handler, Jsonb(inputs), step_uuid))
    return ids


def test_the_overview_and_the_worker_pages_show_the_fleet(browser: Any, fleet: Fleet, tmp_path: Path) -> None:
    # One step dead-lettered (the gate closed), then forty that pass: the chart has a line.
    send(fleet, NS, "gate", {"gate": str(fleet.gate), "message": "the gate is closed"})
    fleet.wait(f"SELECT count(*) FROM pgmq.q_worker_{NS}_queue_dlq", [(1,)], "the first step to be dead-lettered")
    fleet.gate.touch()
    done = send(fleet, NS, "gate", {"gate": str(fleet.gate)}, count=40)
    fleet.wait("SELECT count(*) FROM tasker.step_results", [(len(done) + 1,)], "the steps to succeed")
    browser.get(fleet.base + "/")
    wait_text(browser, f'tr[data-namespace="{IDLE}"] td.depth', "0")
    # Sent while the page is open: its own refresh shows them, nobody reloads.
    send(fleet, IDLE, "noop", {}, count=3)
    wait_text(browser, f'tr[data-namespace="{IDLE}"] td.depth', "3")
    assert text_of(browser, "#fleet-health") in ("healthy", "degraded", "unhealthy")
    wait_text(browser, "#workers-active", "1")
    assert text_of(browser, f'tr[data-namespace="{NS}"] td.dlq') == "1"
    screenshot(browser, "dashboard-overview.png", tmp_path)

    browser.get(fleet.base + "/workers")
    row = f'tr[data-worker="{fleet.worker_id}"]'
    wait_text(browser, f"{row} td.mode", "Hybrid")
    from selenium.webdriver.common.by import By

    hold_still(browser)
    browser.find_element(By.CSS_SELECTOR, f"{row} a").click()
    wait_text(browser, "#worker-mode", "Hybrid")
    wait_text(browser, "#timeline", "WorkerRegistered")
    wait_text(browser, "#heartbeats", "UTC")
    screenshot(browser, "dashboard-worker.png", tmp_path)

    # On a phone: every page fits the width (wide tables scroll inside their own box).
    browser.set_window_size(390, 844)
    try:
        for path in ("/", "/workers", f"/workers/{fleet.worker_id}", "/steps", f"/dlq/{NS}", "/modes"):
            browser.get(fleet.base + path)
            overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 1, (path, overflow)
    finally:
        browser.set_window_size(1280, 900)


def test_a_dead_letter_requeued_from_the_page_returns_and_succeeds(browser: Any, fleet: Fleet) -> None:
    from selenium.webdriver.common.by import By

    hostile = '<img src=x onerror="window.__pwned=1"> the gate is closed'
    [step_uuid] = send(fleet, NS, "gate", {"gate": str(fleet.gate), "message": hostile})
    # A message no producer API would send: a handler name that is markup.
    body = {
        "step_uuid": str(uuid.uuid4()),
        "namespace": NS,
        "handler": "<script>window.__pwned=2</script>",
        "inputs": {},
    }
    fleet.sql("SELECT pgmq.send(%s, %s)", (f"worker_{NS}_queue", Jsonb(body)))
    fleet.wait(f"SELECT count(*) FROM pgmq.q_worker_{NS}_queue_dlq", [(2,)], "both steps to be dead-lettered")

    browser.get(f"{fleet.base}/dlq/{NS}")
    [(dlq_msg_id,)] = fleet.sql(
        f"SELECT msg_id FROM pgmq.q_worker_{NS}_queue_dlq WHERE message->>'step_uuid' = %s", (step_uuid,)
    )
    row = f'tr[data-msg-id="{dlq_msg_id}"]'
    wait_text(browser, f"{row} td.reason", "gate_closed")
    hold_still(browser)
    assert hostile in text_of(browser, f"{row} td.error")  # shown as text ...
    assert "<script>window.__pwned=2</script>" in text_of(browser, "#dead-letters")
    assert browser.execute_script("return window.__pwned === undefined")  # ... never run
    assert not browser.find_elements(By.CSS_SELECTOR, "#dead-letters img, #dead-letters td script")

    fleet.gate.touch()
    hold_still(browser)
    browser.find_element(By.CSS_SELECTOR, f"{row} a.requeue").click()
    wait_text(browser, "h1", "Requeue dead letters")
    browser.find_element(By.CSS_SELECTOR, '#confirm-requeue input[name="token"]').send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#confirm-requeue button").click()
    wait_text(browser, "#flash", "Requeued 1 dead letter")
    fleet.wait(
        "SELECT status FROM tasker.step_results WHERE step_uuid = %s",
        [("succeeded",)],
        "the requeued step to succeed",
        params=(step_uuid,),
    )
    assert fleet.sql(f"SELECT count(*) FROM pgmq.q_worker_{NS}_queue_dlq") == [(1,)]  # the other one stays

    browser.get(f"{fleet.base}/steps/{step_uuid}")
    wait_text(browser, "#step-status", "succeeded")
    wait_text(browser, "#step-events", "DeadLetterRequeued")
    assert browser.execute_script("return window.__pwned === undefined")


def test_a_mode_switch_from_the_page_reaches_the_worker(browser: Any, fleet: Fleet) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(fleet.base + "/modes")
    hold_still(browser)
    form = browser.find_element(By.ID, "namespace-mode")
    Select(form.find_element(By.NAME, "namespace")).select_by_visible_text(NS)
    Select(form.find_element(By.NAME, "mode")).select_by_visible_text("PollingOnly")
    form.find_element(By.NAME, "token").send_keys(TOKEN)
    form.find_element(By.TAG_NAME, "button").click()
    wait_text(browser, "#flash", "Asked 1 worker to switch to PollingOnly")
    fleet.wait("SELECT deployment_mode FROM tasker.workers", [("PollingOnly",)], "the worker to switch")

    browser.get(f"{fleet.base}/workers/{fleet.worker_id}")
    wait_text(browser, "#worker-mode", "PollingOnly")
    wait_text(browser, "#timeline", "DeploymentModeChanged")
    # And back, from the worker's own page (the token is remembered for the tab).
    hold_still(browser)
    form = browser.find_element(By.CSS_SELECTOR, 'form[action$="/modes"]')
    Select(form.find_element(By.NAME, "mode")).select_by_visible_text("Hybrid")
    assert form.find_element(By.NAME, "token").get_attribute("value") == TOKEN
    form.find_element(By.TAG_NAME, "button").click()
    wait_text(browser, ".flash", "Asked this worker to switch to Hybrid")
    fleet.wait("SELECT deployment_mode FROM tasker.workers", [("Hybrid",)], "the worker to switch back")
    wait_text(browser, "#worker-mode", "Hybrid")
