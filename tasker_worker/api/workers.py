"""``/api/workers``: register, heartbeat, deregister and read workers."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tasker_worker.api.context import ApiContext, ApiError, ctx_of, int_param, mutating, read_model
from tasker_worker.domain.modes import DeploymentMode
from tasker_worker.domain.workers import Heartbeat, WorkerRegistration, WorkerStatus, WorkerView
from tasker_worker.errors import WorkerNotFound


class Deregistration(BaseModel):
    """Optional body of ``DELETE /api/workers/{id}``."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="deregistered through the API", min_length=1, max_length=500)


class ModeRequest(BaseModel):
    """Body of ``POST /api/workers/{id}/mode``."""

    model_config = ConfigDict(extra="forbid")

    mode: DeploymentMode


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


def _status_or_none(raw: str) -> WorkerStatus | None:
    try:
        return WorkerStatus(raw)
    except ValueError:
        return None


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


async def register(request: Request) -> Response:
    """Register a worker: 201 with its id and status; 409 when a live worker holds the id."""
    ctx = ctx_of(request)
    registration = await read_model(request, WorkerRegistration)
    worker_id = await ctx.lifecycle.register(registration, on_conflict="error")
    view = await ctx.views.get(worker_id)
    return JSONResponse(
        _worker_json(view), status_code=201, headers={"Location": f"/api/workers/{quote(worker_id, safe='')}"}
    )


async def deregister(request: Request) -> Response:
    """Deregister a worker with a reason (body ``{"reason": ...}`` or ``?reason=``)."""
    ctx = ctx_of(request)
    worker_id = request.path_params["worker_id"]
    body = await read_model(request, Deregistration, empty_ok=True)
    reason = request.query_params.get("reason") or body.reason
    await ctx.lifecycle.deregister(worker_id, reason[:500])
    return JSONResponse(_worker_json(await ctx.views.get(worker_id)))


async def heartbeat(request: Request) -> Response:
    """Record a heartbeat: 200 with the worker's status; 404 for an unknown worker."""
    ctx = ctx_of(request)
    worker_id = request.path_params["worker_id"]
    beat = await read_model(request, Heartbeat, empty_ok=True)
    status = await ctx.lifecycle.heartbeat(worker_id, beat)
    return JSONResponse({"worker_id": worker_id, "status": status.value, "at": ctx.clock.now().isoformat()})


async def request_mode(request: Request) -> Response:
    """Ask a running worker to switch deployment mode: 202 (it switches at once when listening,
    else within a heartbeat interval); 404 when no live worker has this id."""
    ctx = ctx_of(request)
    worker_id = request.path_params["worker_id"]
    body = await read_model(request, ModeRequest)
    asked = await ctx.lifecycle.request_mode(body.mode.value, worker_id=worker_id)
    if not asked:
        raise WorkerNotFound(worker_id)
    return JSONResponse({"worker_id": worker_id, "requested_mode": body.mode.value}, status_code=202)


async def list_workers(request: Request) -> Response:
    """Workers, newest first: ``?status=``, ``?include_deregistered=true``, ``?limit=``."""
    ctx = ctx_of(request)
    raw_status = request.query_params.get("status")
    status = None
    if raw_status:
        status = SEED_STATUS_NAMES.get(raw_status.upper()) or _status_or_none(raw_status)
        if status is None:
            allowed = ", ".join([s.value for s in WorkerStatus] + list(SEED_STATUS_NAMES))
            raise ApiError(400, "invalid_request", f"status must be one of {allowed}, got {raw_status!r}") from None
    include = request.query_params.get("include_deregistered", "false").lower() in ("1", "true", "yes")
    views = await ctx.views.list(status, include_deregistered=include, limit=int_param(request, "limit", 1000))
    return JSONResponse({"workers": [_worker_json(v, ctx) for v in views], "count": len(views)})


async def get_worker(request: Request) -> Response:
    """One worker; 404 for an unknown id."""
    ctx = ctx_of(request)
    view = await ctx.views.get(request.path_params["worker_id"])
    return JSONResponse(_worker_json(view, ctx))


async def heartbeats(request: Request) -> Response:
    """A worker's newest heartbeats (``?limit=``, default 100)."""
    ctx = ctx_of(request)
    worker_id = request.path_params["worker_id"]
    rows = await ctx.views.heartbeats(worker_id, limit=int_param(request, "limit", 100))
    body = [{**row, "at": row["at"].isoformat()} for row in rows]
    return JSONResponse({"worker_id": worker_id, "heartbeats": body, "count": len(body)})


async def healthy(request: Request) -> Response:
    """Active workers with a heartbeat within ``[registry] stale_timeout``."""
    ctx = ctx_of(request)
    views = await ctx.views.healthy(ctx.clock.now(), ctx.config.registry.stale_timeout)
    return JSONResponse({"workers": [_worker_json(v, ctx) for v in views], "count": len(views)})


async def stats(request: Request) -> Response:
    """Counts by status, live cores and memory, and fleet throughput (steps/s, last minute)."""
    return JSONResponse(await ctx_of(request).views.stats())


def routes() -> list[Route]:
    """The worker routes (fixed paths before ``{worker_id}``)."""
    return [
        Route("/api/workers", mutating(register), methods=["POST"]),
        Route("/api/workers", list_workers, methods=["GET"]),
        Route("/api/workers/healthy", healthy, methods=["GET"]),
        Route("/api/workers/stats", stats, methods=["GET"]),
        Route("/api/workers/{worker_id}", get_worker, methods=["GET"]),
        Route("/api/workers/{worker_id}", mutating(deregister), methods=["DELETE"]),
        Route("/api/workers/{worker_id}/heartbeat", mutating(heartbeat), methods=["POST"]),
        Route("/api/workers/{worker_id}/mode", mutating(request_mode), methods=["POST"]),
        Route("/api/workers/{worker_id}/heartbeats", heartbeats, methods=["GET"]),
    ]
