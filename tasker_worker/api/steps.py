"""``/api/steps`` and ``/api/namespaces/{namespace}/steps``: producers that cannot speak SQL send
steps and read outcomes over HTTP, with ``tasker.enqueue_step``'s validation and idempotency."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tasker_worker.api.context import ApiError, ctx_of, int_param, mutating, read_model
from tasker_worker.domain.steps import MAX_ATTEMPT_LIMIT, MAX_STEP_TIMEOUT_S, OutcomeStatus
from tasker_worker.producer.client import AsyncClient


class StepSubmission(BaseModel):
    """Body of ``POST /api/namespaces/{namespace}/steps``."""

    model_config = ConfigDict(extra="forbid")

    handler: str = Field(min_length=1, max_length=200)
    inputs: dict[str, Any] = Field(default_factory=dict)
    #: The step's id: one already sent or done is answered with that step (200, not 201).
    step_uuid: uuid.UUID | None = None
    task_uuid: uuid.UUID | None = None
    correlation_id: uuid.UUID | None = None
    delay: int = Field(default=0, ge=0, le=366 * 86_400)
    attempt_limit: int | None = Field(default=None, ge=1, le=MAX_ATTEMPT_LIMIT)
    timeout: float | None = Field(default=None, gt=0, le=MAX_STEP_TIMEOUT_S)
    headers: dict[str, Any] | None = None
    #: Name the step on ``tasker_outcome`` when its outcome is recorded.
    notify: bool = False


async def send(request: Request) -> Response:
    """Enqueue a step: 201 with its step_uuid and msg_id; 200 when the step_uuid was already
    sent or done (that step); 400 invalid; 404 no such namespace queue."""
    ctx = ctx_of(request)
    body = await read_model(request, StepSubmission)
    client = AsyncClient(pool=ctx.pool)
    ref = await client.send_step(
        request.path_params["namespace"],
        body.handler,
        body.inputs,
        step_uuid=body.step_uuid,
        task_uuid=body.task_uuid,
        correlation_id=body.correlation_id,
        delay=body.delay,
        attempt_limit=body.attempt_limit,
        timeout=body.timeout,
        headers=body.headers,
        notify=body.notify,
    )
    return JSONResponse(ref.as_json(), status_code=201 if ref.created else 200)


async def get_step(request: Request) -> Response:
    """A step's outcome; ``{"status": "pending", "state": ...}`` while a step sent with a
    step_uuid has none yet; 404 when neither is known."""
    ctx = ctx_of(request)
    try:
        step_uuid = uuid.UUID(request.path_params["step_uuid"])
    except ValueError:
        raise ApiError(400, "invalid_request", "step_uuid must be a UUID") from None
    client = AsyncClient(pool=ctx.pool)
    result = await client.get_result(step_uuid)
    if result is not None:
        return JSONResponse(result.as_json())
    queued = await client.find_queued(step_uuid)
    if queued is None:
        raise ApiError(404, "not_found", f"no outcome and no pending step {step_uuid}")
    return JSONResponse({**queued, "status": "pending"})


async def list_steps(request: Request) -> Response:
    """Outcomes, newest first: ``?namespace=``, ``?status=``, ``?limit=`` (at most 1000)."""
    ctx = ctx_of(request)
    status = request.query_params.get("status")
    if status is not None and status not in {s.value for s in OutcomeStatus}:
        allowed = ", ".join(s.value for s in OutcomeStatus)
        raise ApiError(400, "invalid_request", f"status must be one of {allowed}, got {status!r}")
    results = await AsyncClient(pool=ctx.pool).list_results(
        namespace=request.query_params.get("namespace") or None,
        status=status,
        limit=int_param(request, "limit", 100, high=1000),
    )
    return JSONResponse({"steps": [r.as_json() for r in results], "count": len(results)})


def routes() -> list[Route]:
    """The step routes."""
    return [
        Route("/api/steps", list_steps, methods=["GET"]),
        Route("/api/steps/{step_uuid}", get_step, methods=["GET"]),
        Route("/api/namespaces/{namespace}/steps", mutating(send), methods=["POST"]),
    ]
