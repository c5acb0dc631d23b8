"""The dashboard's pages (GET): overview, workers, a worker, steps, dead letters, modes."""

from __future__ import annotations

import logging
import uuid

import psycopg
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from tasker_worker.api.context import Endpoint, ctx_of
from tasker_worker.api.dashboard import reads
from tasker_worker.api.dashboard.render import REFRESH_S, render
from tasker_worker.domain.modes import DeploymentMode
from tasker_worker.domain.names import dlq_name, queue_name, validate_namespace
from tasker_worker.errors import InvalidName, QueueNotFound, WorkerNotFound, first_line

log = logging.getLogger(__name__)

MODES = [m.value for m in DeploymentMode]


def _int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name, "")
    return int(raw) if raw.isdigit() and len(raw) < 10 else None


def refused(request: Request, status: int, heading: str, detail: str, *, refresh: int = 0) -> Response:
    """A page saying why a request was not served."""
    return render(
        request, "message.html", title=heading, status=status, refresh=refresh, heading=heading, detail=detail
    )


def html_errors(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` answering a database outage with a page (503) that keeps trying, instead of
    the API's JSON error."""

    async def page(request: Request) -> Response:
        try:
            await ctx_of(request).replica_state()  # how stale the page's reads are (shown on it)
            return await endpoint(request)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.warning("%s %s: the database is unavailable: %s", request.method, request.url.path, first_line(exc))
            return refused(
                request,
                503,
                "The database is unavailable",
                "The page could not be read from the database; it tries again by itself.",
                refresh=REFRESH_S,
            )

    page.__name__ = endpoint.__name__
    page.__doc__ = endpoint.__doc__
    return page


async def overview(request: Request) -> Response:
    """Per namespace the depth, the oldest message, steps/s, errors and the DLQ; fleet health."""
    ctx = ctx_of(request)
    data = await request.app.state.overview.get(ctx)
    done = request.query_params.get("flow")
    return render(
        request,
        "overview.html",
        title="Overview",
        overview=data,
        flow_done=done if done in ("pause", "resume") else None,
        flow_namespace=request.query_params.get("namespace", "")[:40],
    )


async def workers(request: Request) -> Response:
    """Every worker: state, mode, heartbeat age, active steps, CPU, memory, open circuits."""
    ctx = ctx_of(request)
    include_gone = request.query_params.get("all") == "1"
    rows = await reads.gather_workers_page(ctx, include_gone=include_gone)
    return render(request, "workers.html", title="Workers", rows=rows, include_gone=include_gone)


async def worker(request: Request) -> Response:
    """One worker: details, health, heartbeat history, event timeline, its mode switch."""
    ctx = ctx_of(request)
    worker_id = request.path_params["worker_id"]
    try:
        page = await reads.gather_worker_page(ctx, worker_id)
    except WorkerNotFound:
        return refused(request, 404, "No such worker", f"No worker is registered as {worker_id!r}.")
    return render(
        request,
        "worker.html",
        title=f"Worker {worker_id}",
        page=page,
        modes=MODES,
        asked=request.query_params.get("asked") == "1",
        asked_mode=request.query_params.get("mode") if request.query_params.get("mode") in MODES else None,
    )


async def steps(request: Request) -> Response:
    """Look a step up by step_uuid; the newest failures with their reasons."""
    ctx = ctx_of(request)
    raw = request.query_params.get("step_uuid", "").strip()
    namespace = request.query_params.get("namespace", "").strip() or None
    if raw:
        try:
            step_uuid = uuid.UUID(raw)
        except ValueError:
            return refused(request, 400, "Not a step_uuid", f"{raw[:100]!r} is not a UUID.")
        target = f"{request.scope.get('root_path', '')}/steps/{step_uuid}"
        if namespace:
            target += f"?namespace={namespace}" if _valid_namespace(namespace) else ""
        return RedirectResponse(target, status_code=303)
    failures = await reads.recent_failures(ctx)
    return render(request, "steps.html", title="Steps", failures=failures)


async def step(request: Request) -> Response:
    """One step: status, attempts, times, result or error, where its message is, its events."""
    ctx = ctx_of(request)
    try:
        step_uuid = uuid.UUID(request.path_params["step_uuid"])
    except ValueError:
        return refused(request, 400, "Not a step_uuid", "The address does not end in a UUID.")
    namespace = request.query_params.get("namespace") or None
    if namespace is not None and not _valid_namespace(namespace):
        return refused(request, 400, "Not a namespace", f"{namespace[:100]!r} is not a valid namespace.")
    page = await reads.gather_step_page(ctx, step_uuid, namespace)
    said = {
        "cancelled": "Cancelled: taken off its queue.",
        "cancelling": "Asked to stop: its worker records it cancelled.",
    }
    return render(
        request,
        "step.html",
        title=f"Step {step_uuid}",
        page=page,
        cancel_state=said.get(request.query_params.get("cancel", "")),
        status=200 if page.found else 404,
    )


async def dead_letter_index(request: Request) -> Response:
    """Every namespace with the size of its dead-letter queue."""
    ctx = ctx_of(request)
    namespaces, _ = reads.pair_queues(await reads.glance(ctx))
    return render(request, "dlq_index.html", title="Dead letters", namespaces=sorted(namespaces.items()))


async def dead_letters(request: Request) -> Response:
    """A namespace's dead letters with their reasons, and the buttons that requeue them."""
    ctx = ctx_of(request)
    namespace = request.path_params["namespace"]
    if not _valid_namespace(namespace):
        return refused(request, 400, "Not a namespace", f"{namespace[:100]!r} is not a valid namespace.")
    try:
        letters = await reads.gather_dead_letters(ctx, namespace)
    except QueueNotFound:
        return refused(request, 404, "No such namespace", f"Namespace {namespace!r} has no queue.")
    glances = {g.queue: g for g in await reads.glance(ctx)}
    dlq = glances.get(dlq_name(queue_name(namespace)))
    return render(
        request,
        "dlq.html",
        title=f"Dead letters of {namespace}",
        namespace=namespace,
        letters=letters,
        dlq=dlq,
        requeued=_int(request, "requeued"),
        remaining=_int(request, "remaining"),
        limit=reads.REQUEUE_ALL_LIMIT,
    )


async def confirm_requeue(request: Request) -> Response:
    """The confirmation of a requeue (one dead letter, or all of them): token and a button."""
    ctx = ctx_of(request)
    namespace = request.path_params["namespace"]
    if not _valid_namespace(namespace):
        return refused(request, 400, "Not a namespace", f"{namespace[:100]!r} is not a valid namespace.")
    msg_id = _int(request, "msg_id")
    everything = request.query_params.get("all") == "1"
    if msg_id is None and not everything:
        return refused(request, 400, "Nothing to requeue", "Name a dead letter (msg_id) or ask for all of them.")
    letter = None
    if msg_id is not None:
        try:
            letters = await reads.gather_dead_letters(ctx, namespace)
        except QueueNotFound:
            return refused(request, 404, "No such namespace", f"Namespace {namespace!r} has no queue.")
        letter = next((x for x in letters if x.msg_id == msg_id), None)
    return render(
        request,
        "confirm.html",
        title="Requeue dead letters",
        refresh=0,
        namespace=namespace,
        msg_id=msg_id,
        letter=letter,
        limit=reads.REQUEUE_ALL_LIMIT,
    )


async def modes(request: Request) -> Response:
    """Switch a namespace's or a worker's deployment mode."""
    ctx = ctx_of(request)
    rows = await reads.gather_workers_page(ctx, include_gone=False)
    return render(
        request,
        "modes.html",
        title="Deployment modes",
        rows=rows,
        namespaces=await reads.known_namespaces(ctx),
        modes=MODES,
        asked=_int(request, "asked"),
        asked_mode=request.query_params.get("mode") if request.query_params.get("mode") in MODES else None,
    )


def _valid_namespace(namespace: str) -> bool:
    try:
        validate_namespace(namespace)
    except InvalidName:
        return False
    return True
