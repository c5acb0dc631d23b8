"""``/api/queues/{namespace}/...``: flow control over HTTP (pause, resume, limits).

The same calls as ``tasker-worker queue pause|resume|limit``: stored in ``tasker.queue_flow`` and
applied inside every worker's next claim. Changes need the operator token.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tasker_worker.api.context import ctx_of
from tasker_worker.api.routing import Operation, Parameters
from tasker_worker.db import flow as flow_db
from tasker_worker.domain.flow import QueueFlow, Rate
from tasker_worker.domain.workers import Namespace, whole_number

#: Who a change made through the API is recorded as.
API_ACTOR = "api"

#: A rate as ``tasker-worker queue limit --rate`` takes it, or "0" to remove it.
RATE_PATTERN = r"^(0|[1-9][0-9]{0,8} */ *([1-9][0-9]{0,5})? *(s|sec|second|m|min|minute|h|hour))$"


#: A limit: a whole number, 0 to remove it.
_Limit = Annotated[int, Field(ge=0, le=1_000_000), BeforeValidator(whole_number)]


class LimitsRequest(BaseModel):
    """Body of ``POST /api/queues/{namespace}/limits``: a field left out stays as it is, 0
    removes a limit (``"0"`` the rate)."""

    model_config = ConfigDict(extra="forbid")

    # The bounds sit inside the optional type: on the field, pydantic would not publish them.
    max_running: _Limit | None = None
    key_max_running: _Limit | None = None
    #: ``"20/s"``, ``"100/m"``, ``"5/h"``, ``"30/10s"``; ``"0"`` removes it.
    rate: Annotated[str, Field(max_length=32, pattern=RATE_PATTERN)] | None = None
    #: How many may start at once (default 1); alone, it changes the burst of the rate in force.
    burst: Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(whole_number)] | None = None


class QueuePath(Parameters):
    """``{namespace}``: a namespace (its queue ``worker_<namespace>_queue``)."""

    namespace: Namespace


async def get_flow(request: Request, path: QueuePath) -> Response:
    """The flow control in force for a namespace (no limit: every field empty)."""
    found = await flow_db.read_flow(await ctx_of(request).read_pool_of(path.namespace), path.namespace)
    return JSONResponse((found[0] if found else QueueFlow(path.namespace)).as_json())


async def pause(request: Request, path: QueuePath) -> Response:
    """Pause a namespace: no worker starts a new step of it until it is resumed."""
    changed = await flow_db.pause(await ctx_of(request).pool_of(path.namespace), path.namespace, API_ACTOR)
    return JSONResponse({"namespace": path.namespace, "paused": True, "changed": changed})


async def resume(request: Request, path: QueuePath) -> Response:
    """Resume a paused namespace (its listening workers claim at once)."""
    changed = await flow_db.resume(await ctx_of(request).pool_of(path.namespace), path.namespace, API_ACTOR)
    return JSONResponse({"namespace": path.namespace, "paused": False, "changed": changed})


async def set_limits(request: Request, path: QueuePath, body: LimitsRequest) -> Response:
    """Change a namespace's fleet-wide limits; answers the flow control now in force."""
    remove_rate = body.rate is not None and body.rate.strip() == "0"
    rate = None if body.rate is None or remove_rate else Rate.parse(body.rate, body.burst)
    found = await flow_db.set_limits(
        await ctx_of(request).pool_of(path.namespace),
        path.namespace,
        max_running=body.max_running,
        key_max_running=body.key_max_running,
        rate=rate,
        burst=body.burst,
        remove_rate=remove_rate,
        by=API_ACTOR,
    )
    return JSONResponse((found or QueueFlow(path.namespace)).as_json())


def operations() -> list[Operation]:
    """The flow control operations."""
    return [
        Operation("GET", "/api/queues/{namespace}/flow", get_flow, path_params=QueuePath),
        Operation("POST", "/api/queues/{namespace}/pause", pause, path_params=QueuePath, secured=True),
        Operation("POST", "/api/queues/{namespace}/resume", resume, path_params=QueuePath, secured=True),
        Operation(
            "POST",
            "/api/queues/{namespace}/limits",
            set_limits,
            path_params=QueuePath,
            body=LimitsRequest,
            secured=True,
        ),
    ]


__all__ = ["LimitsRequest", "operations"]
