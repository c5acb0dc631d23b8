"""The monitoring files and the scrapes they are built on, proven by Prometheus's own tool:
``promtool check rules`` on the alert rules, ``promtool check metrics`` on live scrapes of the
API and of a worker that ran steps, and every expression of the Grafana dashboard evaluated by
``promtool test rules`` over series taken from that scrape (each must find data: no metric, no
label the scrape lacks).

promtool comes from Debian's ``prometheus`` package, which ``.ci/run`` installs; on a machine
without it these tests are skipped with that reason (never in CI, where ``CI`` is set and a
missing promtool fails them).
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from entrypoints import REPO, Process, clean_env, cli, live_workers, query, running, running_api, wait_for
from prometheus_client.parser import text_string_to_metric_families

MONITORING = REPO / "docs" / "monitoring"
NS = "monitored"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package", pytrace=False)
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run does it)")
    return found


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_accepts_the_alert_rules() -> None:
    done = promtool("check", "rules", str(MONITORING / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    count = sum(len(group["rules"]) for group in rules["groups"])
    assert f"SUCCESS: {count} rules found" in done.stdout and count == 8, done.stdout


@contextmanager
def worker_with_api(env: dict[str, str], cwd: Path) -> Iterator[tuple[Process, str]]:
    """``run`` with its API on a free port, and the API's base URL (from its log line)."""
    worker_env = {
        **env,
        "TASKER__API__ENABLED": "true",
        "TASKER__API__PORT": "0",
        "TASKER__LOGGING__FORMAT": "json",
        "TASKER__LOGGING__LEVEL": "INFO",
    }
    with running(worker_env, "run", "--namespace", NS, cwd=cwd) as worker:
        assert worker.popen.stderr is not None
        port = None
        for _ in range(500):  # bounded: the line comes within the worker's start
            ready, _, _ = select.select([worker.popen.stderr], [], [], 60)
            line = worker.popen.stderr.readline() if ready else ""
            if not line:
                break
            found = re.search(r"API serving on port (\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port is not None, f"the worker's API did not start: {worker.stop()} {worker.stderr[-3000:]}"
        yield worker, f"http://127.0.0.1:{port}"


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


#: PromQL words that are not metric names.
_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are no function (followed by
    ``(``), no label (inside ``{}`` or a ``by (...)`` list) and no keyword."""
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    without_groupings = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_labels)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_groupings)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?!\s*\()\b", without_ranges))
    return {n for n in names if n not in _PROMQL_WORDS and not re.fullmatch(r"[0-9.e]+", n)} - {"e"}


def _series_line(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{json.dumps(v)[1:-1]}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _rules_test(scrape: str, exprs: list[tuple[str, str]]) -> str:
    """A ``promtool test rules`` file: the scrape's samples as input series over 20 minutes (a
    counter grows, the rest keep their value), and for each expression the test that it finds
    at least one series at the end."""
    series = []
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            value = sample.value
            if family.type in ("counter", "histogram", "summary") or sample.name.endswith(("_total", "_count", "_sum")):
                values = "0+1x20"
            elif math.isnan(value):
                values = " ".join(["NaN"] * 21)
            else:
                values = f"{value!r}+0x20"
            series.append({"series": _series_line(sample.name, sample.labels), "values": values})
    tests = [
        {"expr": f"count({expr}) > bool 0", "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 1}]}
        for _, expr in exprs
    ]
    return yaml.safe_dump(
        {
            "rule_files": [],
            "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}],
        },
        sort_keys=False,
    )


def test_live_scrapes_pass_promtool_and_back_every_dashboard_panel(db_url: str, tmp_path: Path) -> None:
    _promtool()
    env = clean_env(tmp_path, TASKER_DATABASE_URL=db_url)
    with worker_with_api(env, tmp_path) as (worker, worker_api):
        wait_for("the worker", lambda: live_workers(db_url, NS) == 1)
        for handler, inputs in (("noop", "{}"), ("fail", '{"mode": "non_retryable"}')):
            sent = cli(env, "queue", "send", NS, "--handler", handler, "--inputs", inputs, "--count", "3")
            assert sent.returncode == 0, sent.stderr
        wait_for("six outcomes", lambda: query(db_url, "SELECT count(*) FROM tasker.step_results")[0][0] == 6)
        worker_scrape = httpx.get(f"{worker_api}/metrics", timeout=30).text
        with running_api(env, cwd=tmp_path) as (_, api):
            api_scrape = httpx.get(f"{api}/metrics", timeout=30).text
    assert worker.popen.returncode == 0, worker.stderr[-3000:]

    for name, scrape in (("worker", worker_scrape), ("api", api_scrape)):
        checked = promtool("check", "metrics", stdin=scrape)
        assert checked.returncode == 0 and not checked.stdout.strip(), (name, checked.stdout, checked.stderr)
    # The worker's scrape has run steps of both kinds: the families the panels read have data.
    assert 'outcome="succeeded"' in worker_scrape and 'outcome="dead_lettered"' in worker_scrape

    exposed = {s.name for f in text_string_to_metric_families(worker_scrape) for s in f.samples}
    exprs = _dashboard_exprs()
    referenced = {name for _, expr in exprs for name in metric_names(expr)}
    assert referenced and referenced <= exposed, sorted(referenced - exposed)
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerting = {name for g in rules["groups"] for r in g["rules"] for name in metric_names(r["expr"])}
    assert alerting <= exposed, sorted(alerting - exposed)

    test_file = tmp_path / "dashboard_test.yml"
    test_file.write_text(_rules_test(worker_scrape, exprs))
    evaluated = promtool("test", "rules", str(test_file), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout[-4000:] + evaluated.stderr[-2000:]


def test_the_metric_name_reader_finds_names_not_functions_or_labels() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, handler) (rate(tasker_handler_duration_seconds_bucket{a="b"}[5m])))'
    assert metric_names(expr) == {"tasker_handler_duration_seconds_bucket"}
    assert metric_names("sum(rate(a_sum[5m])) / sum(rate(a_count[5m])) > bool 0") == {"a_sum", "a_count"}
