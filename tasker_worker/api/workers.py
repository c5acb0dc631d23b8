"""``/api/workers``: register, heartbeat, deregister and read workers."""

from __future__ import annotations

import uuid
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tasker_worker.api.context import ApiContext, ApiError, ctx_of
from tasker_worker.api.routing import JsonObject, Operation, Parameters, QueryBool, QueryInt
from tasker_worker.domain.modes import DeploymentMode
from tasker_worker.domain.workers import Heartbeat, Text, WorkerId, WorkerRegistration, WorkerStatus, WorkerView
from tasker_worker.errors import WorkerNotFound


class Deregistration(BaseModel):
    """Optional body of ``DELETE /api/workers/{id}``."""

    model_config = ConfigDict(extra="forbid")

    reason: Text = Field(default="deregistered through the API", min_length=1, max_length=500)


class ModeRequest(BaseModel):
    """Body of ``POST /api/workers/{id}/mode``."""

    model_config = ConfigDict(extra="forbid")

    mode: DeploymentMode


class HeartbeatBody(Heartbeat):
    """Body of ``POST /api/workers/{id}/heartbeat`` (optional: an empty body is a bare beat)."""

    model_config = ConfigDict(extra="forbid", title="Heartbeat")

    stats: JsonObject | None = None


#: tasker-core's spellings of worker states (``?status=HEALTHY``), beside ours.
SEED_STATUS_NAMES: dict[str, WorkerStatus] = {
    "HEALTHY": WorkerStatus.ACTIVE,
    "ACTIVE": WorkerStatus.ACTIVE,
    "STARTING": WorkerStatus.PENDING,
    "PENDING": WorkerStatus.PENDING,
    "UNHEALTHY": WorkerStatus.OFFLINE,
    "OFFLINE": WorkerStatus.OFFLINE,
    "STOPPED": WorkerStatus.DEREGISTERED,
    "DEREGISTERED": WorkerStatus.DEREGISTERED,
}
#: Every accepted ``?status=``: ours, then tasker-core's.
STATUS_NAMES: dict[str, WorkerStatus] = {**{s.value: s for s in WorkerStatus}, **SEED_STATUS_NAMES}


def _status_name(value: str) -> str:
    if value not in STATUS_NAMES:
        raise ValueError(f"must be one of {', '.join(STATUS_NAMES)}")
    return value


StatusName = Annotated[str, AfterValidator(_status_name), Field(json_schema_extra={"enum": list(STATUS_NAMES)})]


class WorkerPath(Parameters):
    """``{worker_id}``: a worker id as registered (printable, no ``/``)."""

    worker_id: WorkerId = Field(min_length=1, max_length=200)


class WorkerListQuery(Parameters):
    """``GET /api/workers`` parameters."""

    status: StatusName | None = None
    include_deregistered: QueryBool = False
    limit: QueryInt = Field(default=1000, ge=1, le=10_000)


class HeartbeatsQuery(Parameters):
    """``GET /api/workers/{id}/heartbeats`` parameters."""

    limit: QueryInt = Field(default=100, ge=1, le=10_000)


class DeregistrationQuery(Parameters):
    """``DELETE /api/workers/{id}`` parameters: the reason may come here instead of the body."""

    reason: Text | None = Field(default=None, min_length=1, max_length=500)


def _worker_json(view: WorkerView, ctx: ApiContext | None = None) -> dict[str, Any]:
    """A worker as JSON; the worker of this process with its figures of now (``"live": true``),
    any other with those of its last heartbeat."""
    body = view.model_dump(mode="json")
    live = ctx is not None and ctx.local_status is not None and view.worker_id == ctx.local_worker_id
    if live:
        assert ctx is not None and ctx.local_status is not None
        snap = ctx.local_status()
        counters = snap.get("counters") or {}
        body.update(
            stats=snap,
            processed=int(counters.get("processed", view.processed)),
            active_steps=int(snap.get("in_flight", view.active_steps)),
        )
    body["live"] = live
    return body


def generated_id(registration: WorkerRegistration) -> str:
    """An id for a registration that names none: ``name-hostname-pid-random``, made a valid id
    (the path segment of ``/api/workers/{worker_id}``: no ``/``, at most 200 characters, no space
    at either end), so that the worker can be read, beaten and deregistered by it."""
    stem = f"{registration.name}-{registration.hostname}-{registration.pid}".replace("/", "-")
    return f"{stem[:190].rstrip()}-{uuid.uuid4().hex[:6]}"


async def register(request: Request, body: WorkerRegistration) -> Response:
    """Register a worker: 201 with its id and status; 409 when a live worker holds the id."""
    ctx = ctx_of(request)
    if body.worker_id is None:
        body = body.model_copy(update={"worker_id": generated_id(body)})
    worker_id = await ctx.lifecycle.register(body, on_conflict="error")
    view = await ctx.views.get(worker_id)
    return JSONResponse(
        _worker_json(view), status_code=201, headers={"Location": f"/api/workers/{quote(worker_id, safe='')}"}
    )


async def deregister(request: Request, path: WorkerPath, query: DeregistrationQuery, body: Deregistration) -> Response:
    """Deregister a worker with a reason (body ``{"reason": ...}`` or ``?reason=``)."""
    ctx = ctx_of(request)
    await ctx.lifecycle.deregister(path.worker_id, query.reason or body.reason)
    return JSONResponse(_worker_json(await ctx.views.get(path.worker_id)))


async def heartbeat(request: Request, path: WorkerPath, body: HeartbeatBody) -> Response:
    """Record a heartbeat: 200 with the worker's status; 404 for an unknown worker."""
    ctx = ctx_of(request)
    status = await ctx.lifecycle.heartbeat(path.worker_id, body)
    return JSONResponse({"worker_id": path.worker_id, "status": status.value, "at": ctx.clock.now().isoformat()})


async def request_mode(request: Request, path: WorkerPath, body: ModeRequest) -> Response:
    """Ask a running worker to switch deployment mode: 202 (it switches at once when listening,
    else within a heartbeat interval); 404 when no live worker has this id."""
    ctx = ctx_of(request)
    asked = await ctx.lifecycle.request_mode(body.mode.value, worker_id=path.worker_id)
    if not asked:
        raise WorkerNotFound(path.worker_id)
    return JSONResponse({"worker_id": path.worker_id, "requested_mode": body.mode.value}, status_code=202)


async def list_workers(request: Request, query: WorkerListQuery) -> Response:
    """Workers, newest first: ``?status=``, ``?include_deregistered=true``, ``?limit=``."""
    ctx = ctx_of(request)
    status = STATUS_NAMES[query.status] if query.status else None
    views = await ctx.read_views.list(status, include_deregistered=query.include_deregistered, limit=query.limit)
    return JSONResponse({"workers": [_worker_json(v, ctx) for v in views], "count": len(views)})


def _gone(view: WorkerView) -> ApiError:
    """404 for a deregistered worker: DELETE (or its own shutdown) ended it for good, so it is no
    longer there to read (RFC 9110's 404 rather than 410: clients and fuzzers expect 404 after a
    DELETE); its final record stays listed with ``?include_deregistered=true``."""
    when = view.deregistered_at.isoformat() if view.deregistered_at else "?"
    return ApiError(
        404,
        "not_found",
        f"worker {view.worker_id} was deregistered at {when} ({view.deregister_reason}); "
        "GET /api/workers?include_deregistered=true lists it with its final figures",
    )


async def get_worker(request: Request, path: WorkerPath) -> Response:
    """One worker; 404 for an unknown id, and once it is deregistered."""
    ctx = ctx_of(request)
    view = await ctx.read_views.get(path.worker_id)
    if view.status is WorkerStatus.DEREGISTERED:
        raise _gone(view)
    return JSONResponse(_worker_json(view, ctx))


async def heartbeats(request: Request, path: WorkerPath, query: HeartbeatsQuery) -> Response:
    """A worker's newest heartbeats (``?limit=``, default 100); 404 once it is deregistered."""
    ctx = ctx_of(request)
    view = await ctx.read_views.get(path.worker_id)
    if view.status is WorkerStatus.DEREGISTERED:
        raise _gone(view)
    rows = await ctx.read_views.heartbeats(path.worker_id, limit=query.limit)
    body = [{**row, "at": row["at"].isoformat()} for row in rows]
    return JSONResponse({"worker_id": path.worker_id, "heartbeats": body, "count": len(body)})


async def healthy(request: Request) -> Response:
    """Active workers with a heartbeat within ``[registry] stale_timeout``."""
    ctx = ctx_of(request)
    views = await ctx.read_views.healthy(ctx.clock.now(), ctx.config.registry.stale_timeout)
    return JSONResponse({"workers": [_worker_json(v, ctx) for v in views], "count": len(views)})


async def stats(request: Request) -> Response:
    """Counts by status, live cores and memory, and fleet throughput (steps/s, last minute)."""
    return JSONResponse(await ctx_of(request).read_views.stats())


def operations() -> list[Operation]:
    """The worker operations (fixed paths before ``{worker_id}``)."""
    unknown = {404: "unknown worker"}
    gone = {404: "unknown or deregistered worker (a deregistered one is listed with ?include_deregistered=true)"}
    return [
        Operation(
            "POST",
            "/api/workers",
            register,
            {201: "registered", 409: "the id is held by a live worker"},
            body=WorkerRegistration,
            success=201,
            secured=True,
        ),
        Operation("GET", "/api/workers", list_workers, query=WorkerListQuery),
        Operation("GET", "/api/workers/healthy", healthy),
        Operation("GET", "/api/workers/stats", stats),
        Operation("GET", "/api/workers/{worker_id}", get_worker, gone, path_params=WorkerPath),
        Operation(
            "DELETE",
            "/api/workers/{worker_id}",
            deregister,
            {**unknown, 409: "already deregistered"},
            path_params=WorkerPath,
            query=DeregistrationQuery,
            body=Deregistration,
            body_required=False,
            secured=True,
        ),
        Operation(
            "POST",
            "/api/workers/{worker_id}/heartbeat",
            heartbeat,
            {**unknown, 409: "the worker is deregistered (heartbeat_failed)"},
            path_params=WorkerPath,
            body=HeartbeatBody,
            body_required=False,
            secured=True,
        ),
        Operation(
            "POST",
            "/api/workers/{worker_id}/mode",
            request_mode,
            {202: "requested", 404: "no live worker with this id"},
            path_params=WorkerPath,
            body=ModeRequest,
            success=202,
            secured=True,
        ),
        Operation(
            "GET",
            "/api/workers/{worker_id}/heartbeats",
            heartbeats,
            unknown,
            path_params=WorkerPath,
            query=HeartbeatsQuery,
        ),
    ]
