"""The ``tasker-worker`` command.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error. Errors are printed as one
line (``error: ...``) without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from tasker_worker import __version__
from tasker_worker.cli import admin, demo, fleet, flow, run, steps
from tasker_worker.errors import TaskerError
from tasker_worker.logs import configure_logging

Handler = Callable[[argparse.Namespace], Any]


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("common options")
    group.add_argument(
        "--config",
        metavar="PATH",
        default=default,
        help="config root (holding tasker/base/worker.toml) or a single TOML file",
    )
    group.add_argument(
        "--env",
        metavar="ENV",
        default=default,
        help="environment overlay to apply (default: $TASKER_ENV or development); it must exist",
    )
    group.add_argument(
        "--allow-missing-env",
        action="store_true",
        default=default,
        help="run an --env that has no overlay file on the base settings (else that is an error)",
    )
    group.add_argument(
        "--database-url",
        metavar="URL",
        default=default,
        help="PostgreSQL URL (default: [database] url, $TASKER_DATABASE_URL, else the embedded server)",
    )
    group.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")


def _command(sub: Any, name: str, func: Handler, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    _common(parser, suppress=True)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="tasker-worker",
        description="Run work steps stored as pgmq messages in PostgreSQL.",
    )
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # db
    db = sub.add_parser("db", help="database schema", description="Install and inspect the schema.")
    db_sub = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    _command(db_sub, "migrate", admin.db_migrate, "install pgmq and apply pending migrations")
    _command(db_sub, "status", admin.db_status, "show installed pgmq and migrations")
    _command(db_sub, "schema", admin.db_schema, "print the current tasker schema (what sql/schema.sql holds)")
    _command(db_sub, "url", admin.db_url, "print the database URL (starting the embedded server, left running)")
    _command(db_sub, "stop", admin.db_stop, "stop the embedded server (its data stays)")
    p = _command(db_sub, "shell", admin.db_shell, "psql on the database in use")
    p.add_argument("psql_args", nargs=argparse.REMAINDER, help="passed on to psql (after --)")

    # queue
    queue = sub.add_parser("queue", help="queues", description="Create, inspect and feed queues.")
    q_sub = queue.add_subparsers(dest="queue_command", metavar="COMMAND", required=True)
    p = _command(q_sub, "create", admin.queue_create, "create a namespace queue and its DLQ")
    p.add_argument("namespace")
    p = _command(q_sub, "list", admin.queue_list, "list pgmq queues")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _command(q_sub, "metrics", admin.queue_metrics, "queue depth and message ages")
    p.add_argument("namespace", nargs="?", help="one namespace (default: every queue)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _command(q_sub, "send", admin.queue_send, "enqueue steps")
    p.add_argument("namespace")
    p.add_argument("--handler", required=True)
    p.add_argument("--inputs", default="{}", help="JSON object (default {})")
    p.add_argument("--delay", type=int, default=0, help="seconds before the step is ready")
    p.add_argument("--count", type=int, default=1, help="how many identical steps (1..100000)")
    p.add_argument("--attempt-limit", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="handler timeout in seconds")
    p.add_argument("--priority", type=int, default=None, help="0 (first, the default) to 9")
    p.add_argument("--group", default=None, help="claims go round-robin across a namespace's groups")
    p.add_argument("--concurrency-key", default=None, help="capped with its key by queue limit --key-max-running")
    p.add_argument(
        "--unique-key", default=None, help="a second send of this key within --unique-for gets the first step"
    )
    p.add_argument("--unique-for", default=None, metavar="DURATION", help="the unique window, e.g. 60s")
    p.add_argument("--debounce", action="store_true", help="with --unique-key: replace the queued step's inputs")
    p.add_argument(
        "--step-uuid", default=None, help="the step's id: a step_uuid already sent or done is not sent again"
    )
    p.add_argument("--json", action="store_true", help="print each step's step_uuid and msg_id as JSON")
    p = _command(q_sub, "purge", admin.queue_purge, "delete every message of a namespace queue")
    p.add_argument("namespace")
    p.add_argument("--dlq", action="store_true", help="purge the dead-letter queue instead")
    flow.add_commands(q_sub, _command)

    # config
    cfg = sub.add_parser("config", help="configuration", description="Inspect the configuration.")
    c_sub = cfg.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    p = _command(c_sub, "show", admin.config_show, "print the effective config and its origins")
    p.add_argument("--json", action="store_true", help="print JSON")
    _command(c_sub, "reference", admin.config_reference, "every key with its default and environment variable")

    _command(sub, "version", admin.version, "print the version")

    run.add_commands(sub, _command)
    steps.add_commands(sub, _command)
    fleet.add_commands(sub, _command)
    demo.add_command(sub, _command)
    return parser


#: The tasker role each command needs (migrations/0008): anything not listed reads or changes
#: the fleet as an operator does. ``db migrate`` needs ownership of the schemas instead.
NEEDED_ROLE = {
    "run": "tasker_worker",
    "queue send": "tasker_producer",
    "steps show": "tasker_producer",
    "steps wait": "tasker_producer",
    "steps list": "tasker_producer",
    "queue create": "tasker_worker",
    "db migrate": "",
}


def _command_path(args: argparse.Namespace) -> str:
    """``queue send`` for ``tasker-worker queue send ...``."""
    command = str(getattr(args, "command", "") or "")
    sub = getattr(args, f"{command}_command", None)
    return f"{command} {sub}" if sub else command


def _permission_denied(exc: BaseException) -> BaseException | None:
    """The server's "permission denied" behind ``exc`` (itself, its cause or context)."""
    import psycopg

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, psycopg.errors.InsufficientPrivilege):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _grant_hint(args: argparse.Namespace, denied: BaseException) -> str:
    """One line: what the server refused, and the grant that fixes it."""
    path = _command_path(args)
    role = NEEDED_ROLE.get(path, "tasker_operator")
    what = str(denied).strip().splitlines()[0] if str(denied).strip() else "permission denied"
    if not role:
        return (
            f"{what}: `tasker-worker {path}` creates and alters the schemas; run it as the role that owns them "
            "(or a superuser)"
        )
    return f"{what}: `tasker-worker {path}` needs the {role} role: GRANT {role} TO <your login role>"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns (and exits with) the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    # Until a command has read its config (``run`` then applies ``[logging]``).
    configure_logging(logging.DEBUG if debug else logging.WARNING, "auto")
    try:
        func = args.func
        code = anyio.run(func, args) if inspect.iscoroutinefunction(func) else func(args)
        return int(code or 0)
    except TaskerError as exc:
        if debug:
            raise
        denied = _permission_denied(exc)
        print(f"error: {_grant_hint(args, denied) if denied else exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader stopped early (`config show | grep -q key`, `| head`): it has what it
        # wanted, so this is no failure of ours (and must not fail a `pipefail` script).
        # stdout goes to /dev/null so that the interpreter's last flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # the last line of defence: one line, exit 1
        if debug:
            raise
        denied = _permission_denied(exc)
        if denied is not None:
            print(f"error: {_grant_hint(args, denied)}", file=sys.stderr)
            return 1
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {text}", file=sys.stderr)
        return 1


def print_json(value: Any) -> None:
    """Print a value as indented JSON (dates as ISO strings)."""
    print(json.dumps(value, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["__version__", "build_parser", "main", "print_json"]
