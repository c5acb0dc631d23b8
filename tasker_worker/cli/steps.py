"""``steps show|wait|cancel|list``: a step's outcome, or where it is (and how far) while it has none."""

from __future__ import annotations

import argparse
import getpass
import json
import uuid
from typing import Any

from tasker_worker.cli.admin import producer
from tasker_worker.domain.names import namespace_of
from tasker_worker.domain.results import StepProgress, StepResult
from tasker_worker.domain.steps import OutcomeStatus
from tasker_worker.errors import UsageError


def _step_uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise UsageError(f"not a step_uuid: {text!r}") from None


def _line(result: StepResult) -> str:
    took = ""
    if result.started_at is not None:
        took = f" in {(result.finished_at - result.started_at).total_seconds() * 1000:.1f} ms"
    detail = json.dumps(result.result) if result.succeeded else json.dumps(result.error)
    return (
        f"{result.step_uuid}  {result.status.value}  {result.namespace}/{result.handler}  "
        f"attempts={result.attempts} worker={result.worker_id} finished {result.finished_at:%Y-%m-%d %H:%M:%S}{took}  "
        f"{detail[:300]}"
    )


async def steps_show(args: argparse.Namespace) -> int:
    """``steps show UUID [--namespace N] [--json]``: exit 0 when found, 1 when not."""
    step_uuid = _step_uuid(args.step_uuid)
    async with producer(args, read=True) as client:
        result = await client.get_result(step_uuid, namespace=args.namespace)
        queued = None if result is not None else await client.find_queued(step_uuid, namespace=args.namespace)
        progress = await client.get_progress(step_uuid, namespace=args.namespace) if queued is not None else None
    if result is not None:
        print(json.dumps(result.as_json(), indent=2) if args.json else _line(result))
        return 0
    if queued is not None:
        if args.json:
            print(json.dumps({**queued, "progress": progress.as_json() if progress else None}, indent=2))
        else:
            by = f" by {queued['claimed_by']}" if queued["claimed_by"] else ""
            print(
                f"{step_uuid}  {queued['state']}{by}  {queued['queue']} msg {queued['msg_id']}  "
                f"attempts={queued['attempts']} visible at {queued['visible_at']}"
            )
            if progress is not None:
                print(f"  progress {_progress_line(progress)}")
        return 0
    hint = "" if args.namespace else " (give --namespace to look for it in a queue)"
    print(f"{step_uuid}: no outcome and no message found{hint}")
    return 1


def _progress_line(progress: StepProgress) -> str:
    done = "" if progress.fraction is None else f"{progress.fraction:.0%}"
    note = f" {progress.note}" if progress.note else ""
    data = f" {json.dumps(progress.data)[:200]}" if progress.data is not None else ""
    return f"{done}{note}{data} (at {progress.updated_at:%H:%M:%S})".strip()


async def steps_cancel(args: argparse.Namespace) -> int:
    """``steps cancel UUID [--namespace N]``: a queued step is cancelled at once, a running one
    is asked to stop (exit 0 for either); exit 1 when it is finished or not found."""
    step_uuid = _step_uuid(args.step_uuid)
    async with producer(args) as client:
        namespace = args.namespace
        if namespace is None:
            queued = await client.find_queued(step_uuid)
            namespace = namespace_of(queued["queue"]) if queued else None
        if namespace is None:
            raise UsageError(f"{step_uuid}: no message found by its step_uuid; give --namespace")
        state = await client.cancel(namespace, step_uuid, by=args.by or _who())
    words = {
        "cancelled": "cancelled (taken off its queue)",
        "cancelling": "asked to stop: its worker records it cancelled once the handler has stopped",
        "running": "running, and this database cannot ask it to stop (migrate it)",
        "finished": "already finished",
        "not_found": "not found",
    }
    print(f"{step_uuid}: {words[state]}")
    return 0 if state in ("cancelled", "cancelling") else 1


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


async def steps_wait(args: argparse.Namespace) -> int:
    """``steps wait UUID [--timeout S] [--json]``: exit 0 when it succeeded, 1 otherwise."""
    step_uuid = _step_uuid(args.step_uuid)
    if not 0 < args.timeout <= 86_400:
        raise UsageError("--timeout must be between 0 and 86400 seconds")

    def show(progress: StepProgress) -> None:
        if not args.json:
            print(f"progress {_progress_line(progress)}", flush=True)

    async with producer(args) as client:
        result = await client.wait_for(
            step_uuid,
            timeout=args.timeout,
            namespace=args.namespace,
            poll_interval=args.poll_interval,
            on_progress=show,
        )
    print(json.dumps(result.as_json(), indent=2) if args.json else _line(result))
    return 0 if result.succeeded else 1


async def steps_list(args: argparse.Namespace) -> int:
    """``steps list [--namespace N] [--status S] [--limit K] [--json]``: newest outcomes first."""
    if not 1 <= args.limit <= 1000:
        raise UsageError("--limit must be between 1 and 1000")
    async with producer(args, read=True) as client:
        results = await client.list_results(namespace=args.namespace, status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps([r.as_json() for r in results], indent=2))
    elif not results:
        print("no outcomes")
    for result in [] if args.json else results:
        print(_line(result))
    return 0


def add_commands(sub: Any, command: Any) -> None:
    """Wire ``steps`` into the parser."""
    steps = sub.add_parser("steps", help="step outcomes", description="Look steps up and wait for them.")
    s_sub = steps.add_subparsers(dest="steps_command", metavar="COMMAND", required=True)
    p = command(s_sub, "show", steps_show, "a step's outcome, or where its message is")
    p.add_argument("step_uuid")
    p.add_argument("--namespace", help="look for the message in this namespace's queue")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command(s_sub, "wait", steps_wait, "wait for a step's outcome (exit 0 when it succeeded)")
    p.add_argument("step_uuid")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument("--poll-interval", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument("--namespace", help="its namespace (which cluster it is on, when namespaces live on several)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command(s_sub, "cancel", steps_cancel, "cancel a step: a queued one at once, a running one asked to stop")
    p.add_argument("step_uuid")
    p.add_argument("--namespace", help="its namespace (found by its step_uuid when it was sent with one)")
    p.add_argument("--by", help="who asks (recorded in its outcome; default cli:<user>)")
    p = command(s_sub, "list", steps_list, "recent outcomes, newest first")
    p.add_argument("--namespace")
    p.add_argument("--status", choices=[s.value for s in OutcomeStatus])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print JSON")
