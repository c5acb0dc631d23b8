"""``/api/steps`` and ``/api/namespaces/{namespace}/steps``: producers that cannot speak SQL send
steps and read outcomes over HTTP, with ``tasker.enqueue_step``'s validation and idempotency."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tasker_worker.api.context import ApiError, ctx_of
from tasker_worker.api.routing import NO_NUL_PATTERN, JsonObject, Operation, Parameters, QueryInt
from tasker_worker.domain.names import HANDLER_MAX_LEN, HANDLER_PATTERN
from tasker_worker.domain.steps import MAX_ATTEMPT_LIMIT, MAX_STEP_TIMEOUT_S, OutcomeStatus
from tasker_worker.domain.workers import Namespace, WholeNumber, whole_number

#: A UUID in its canonical text form, the only one the document's ``format: uuid`` promises.
UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


def _canonical_uuid(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(UUID_PATTERN[1:-1], value):
        raise ValueError("must be a UUID (8-4-4-4-12 hexadecimal digits)")
    return value


#: A UUID given as text in its canonical form.
CanonicalUUID = Annotated[
    uuid.UUID, BeforeValidator(_canonical_uuid), Field(json_schema_extra={"pattern": UUID_PATTERN})
]


class UniqueWindow(BaseModel):
    """A send unique within a window: a second send of ``key`` within ``seconds`` is answered
    with the first step (200, ``created: false``); with ``debounce`` the queued step's inputs
    are replaced by the new ones."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=200, pattern=NO_NUL_PATTERN)
    seconds: float = Field(gt=0, le=366 * 86_400)
    debounce: bool = False


class StepSubmission(BaseModel):
    """Body of ``POST /api/namespaces/{namespace}/steps``."""

    model_config = ConfigDict(extra="forbid")

    handler: str = Field(min_length=1, max_length=HANDLER_MAX_LEN, pattern=HANDLER_PATTERN)
    inputs: JsonObject = Field(default_factory=dict)
    #: The step's id: one already sent or done is answered with that step (200, not 201).
    step_uuid: CanonicalUUID | None = None
    task_uuid: CanonicalUUID | None = None
    correlation_id: CanonicalUUID | None = None
    delay: WholeNumber = Field(default=0, ge=0, le=366 * 86_400)
    attempt_limit: Annotated[int, Field(ge=1, le=MAX_ATTEMPT_LIMIT), BeforeValidator(whole_number)] | None = None
    timeout: float | None = Field(default=None, gt=0, le=MAX_STEP_TIMEOUT_S)
    headers: JsonObject | None = None
    #: Name the step on ``tasker_outcome`` when its outcome is recorded.
    notify: bool = False
    #: Flow control: 0 (first, the default) to 9; claims round-robin across groups; capped per key.
    priority: Annotated[int, Field(ge=0, le=9), BeforeValidator(whole_number)] | None = None
    group: Annotated[str, Field(min_length=1, max_length=128, pattern=NO_NUL_PATTERN)] | None = None
    concurrency_key: Annotated[str, Field(min_length=1, max_length=128, pattern=NO_NUL_PATTERN)] | None = None
    #: A unique window: a second send of its key within it is answered with the first step.
    unique: UniqueWindow | None = None


class NamespacePath(Parameters):
    """``{namespace}``: a namespace (its queue ``worker_<namespace>_queue``)."""

    namespace: Namespace


class StepPath(Parameters):
    """``{step_uuid}``."""

    step_uuid: CanonicalUUID


class StepListQuery(Parameters):
    """``GET /api/steps`` parameters."""

    namespace: Namespace | None = None
    status: OutcomeStatus | None = None
    limit: QueryInt = Field(default=100, ge=1, le=1000)


async def send(request: Request, path: NamespacePath, body: StepSubmission) -> Response:
    """Enqueue a step: 201 with its step_uuid and msg_id; 200 when the step_uuid was already
    sent or done (that step); 400 invalid; 404 no such namespace queue."""
    ctx = ctx_of(request)
    client = ctx.producer
    ref = await client.send_step(
        path.namespace,
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
        priority=body.priority,
        group=body.group,
        concurrency_key=body.concurrency_key,
        unique_key=body.unique.key if body.unique else None,
        unique_for=body.unique.seconds if body.unique else None,
        debounce=body.unique.debounce if body.unique else False,
    )
    return JSONResponse(ref.as_json(), status_code=201 if ref.created else 200)


async def get_step(request: Request, path: StepPath) -> Response:
    """A step's outcome; ``{"status": "pending", "state": ...}`` while a step sent with a
    step_uuid has none yet; 404 when neither is known."""
    ctx = ctx_of(request)
    client = ctx.read_producer
    result = await client.get_result(path.step_uuid)
    if result is not None:
        return JSONResponse(result.as_json())
    queued = await client.find_queued(path.step_uuid)
    if queued is None:
        raise ApiError(404, "not_found", f"no outcome and no pending step {path.step_uuid}")
    progress = await client.get_progress(path.step_uuid)
    return JSONResponse({**queued, "status": "pending", "progress": progress.as_json() if progress else None})


class StepInNamespacePath(Parameters):
    """``{namespace}`` and ``{step_uuid}``."""

    namespace: Namespace
    step_uuid: CanonicalUUID


async def cancel(request: Request, path: StepInNamespacePath) -> Response:
    """Cancel a step: a queued one at once (``cancelled``), a running one asked to stop
    (``cancelling``: recorded ``cancelled`` once its handler has stopped); 409 when it is
    finished, 404 when not found."""
    state = await ctx_of(request).producer.cancel(path.namespace, path.step_uuid, by="api")
    if state == "finished":
        raise ApiError(409, "conflict", f"step {path.step_uuid} has finished")
    if state == "not_found":
        raise ApiError(404, "not_found", f"no step {path.step_uuid} in namespace {path.namespace}")
    return JSONResponse({"step_uuid": str(path.step_uuid), "state": state})


async def list_steps(request: Request, query: StepListQuery) -> Response:
    """Outcomes, newest first: ``?namespace=``, ``?status=``, ``?limit=`` (at most 1000)."""
    ctx = ctx_of(request)
    results = await ctx.read_producer.list_results(namespace=query.namespace, status=query.status, limit=query.limit)
    return JSONResponse({"steps": [r.as_json() for r in results], "count": len(results)})


def operations() -> list[Operation]:
    """The step operations."""
    return [
        Operation("GET", "/api/steps", list_steps, query=StepListQuery),
        Operation("GET", "/api/steps/{step_uuid}", get_step, {404: "unknown step"}, path_params=StepPath),
        Operation(
            "POST",
            "/api/namespaces/{namespace}/steps",
            send,
            {
                201: "enqueued",
                200: "the step_uuid was already sent or done: this is that step (nothing sent)",
                404: "no queue for this namespace",
            },
            path_params=NamespacePath,
            body=StepSubmission,
            success=201,
            secured=True,
        ),
        Operation(
            "POST",
            "/api/namespaces/{namespace}/steps/{step_uuid}/cancel",
            cancel,
            {404: "no such step in this namespace", 409: "the step has finished"},
            path_params=StepInNamespacePath,
            secured=True,
        ),
    ]
