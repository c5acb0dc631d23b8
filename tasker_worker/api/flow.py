"""``/api/queues/{namespace}/...``: flow control over HTTP (pause, resume, limits).

The same calls as ``tasker-worker queue pause|resume|limit``: stored in ``tasker.queue_flow`` and
applied inside every worker's next claim. Changes need the operator token.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tasker_worker.api.context import ctx_of, mutating, read_model
from tasker_worker.db import flow as flow_db
from tasker_worker.domain.flow import QueueFlow, Rate
from tasker_worker.domain.names import validate_namespace
from tasker_worker.errors import UsageError

#: Who a change made through the API is recorded as.
API_ACTOR = "api"


class LimitsRequest(BaseModel):
    """Body of ``POST /api/queues/{namespace}/limits``: a field left out stays as it is, 0
    removes a limit (``"0"`` the rate)."""

    model_config = ConfigDict(extra="forbid")

    max_running: int | None = Field(default=None, ge=0, le=1_000_000)
    key_max_running: int | None = Field(default=None, ge=0, le=1_000_000)
    #: ``"20/s"``, ``"100/m"``, ``"5/h"``, ``"30/10s"``; ``"0"`` removes it.
    rate: str | None = Field(default=None, max_length=32)
    burst: int | None = Field(default=None, ge=1, le=1_000_000)


def _namespace(request: Request) -> str:
    namespace: str = request.path_params["namespace"]
    validate_namespace(namespace)
    return namespace


async def get_flow(request: Request) -> Response:
    """The flow control in force for a namespace (no limit: every field empty)."""
    namespace = _namespace(request)
    found = await flow_db.read_flow(ctx_of(request).pool, namespace)
    return JSONResponse((found[0] if found else QueueFlow(namespace)).as_json())


async def pause(request: Request) -> Response:
    """Pause a namespace: no worker starts a new step of it until it is resumed."""
    namespace = _namespace(request)
    changed = await flow_db.pause(ctx_of(request).pool, namespace, API_ACTOR)
    return JSONResponse({"namespace": namespace, "paused": True, "changed": changed})


async def resume(request: Request) -> Response:
    """Resume a paused namespace (its listening workers claim at once)."""
    namespace = _namespace(request)
    changed = await flow_db.resume(ctx_of(request).pool, namespace, API_ACTOR)
    return JSONResponse({"namespace": namespace, "paused": False, "changed": changed})


async def set_limits(request: Request) -> Response:
    """Change a namespace's fleet-wide limits; answers the flow control now in force."""
    namespace = _namespace(request)
    body = await read_model(request, LimitsRequest)
    remove_rate = body.rate is not None and body.rate.strip() == "0"
    rate = None if body.rate is None or remove_rate else Rate.parse(body.rate, body.burst)
    if body.burst is not None and rate is None:
        raise UsageError("burst goes with rate")
    found = await flow_db.set_limits(
        ctx_of(request).pool,
        namespace,
        max_running=body.max_running,
        key_max_running=body.key_max_running,
        rate=rate,
        remove_rate=remove_rate,
        by=API_ACTOR,
    )
    return JSONResponse((found or QueueFlow(namespace)).as_json())


def routes() -> list[Route]:
    """The flow control routes."""
    return [
        Route("/api/queues/{namespace}/flow", get_flow, methods=["GET"]),
        Route("/api/queues/{namespace}/pause", mutating(pause), methods=["POST"]),
        Route("/api/queues/{namespace}/resume", mutating(resume), methods=["POST"]),
        Route("/api/queues/{namespace}/limits", mutating(set_limits), methods=["POST"]),
    ]


__all__ = ["LimitsRequest", "routes"]
