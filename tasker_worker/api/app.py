"""The control-plane API application: context, routing, errors and the token check.

``create_app(ctx)`` returns a Starlette app over an ``ApiContext`` (pool, registry commands and
queries, config, and -- when the API runs inside ``run`` -- the local worker's status). Every
error is JSON ``{"error": ..., "detail": ...}``: 400 invalid input, 401 missing or wrong token,
404 unknown worker or route, 409 conflict or forbidden transition, 500 anything unexpected.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tasker_worker.config.models import TaskerConfig
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.domain.clock import Clock, SystemClock
from tasker_worker.errors import (
    InvalidTransition,
    TaskerError,
    UsageError,
    WorkerConflict,
    WorkerNotFound,
    first_line,
)
from tasker_worker.registry.commands import RegistryCommands
from tasker_worker.registry.leader import SupervisionService
from tasker_worker.registry.queries import RegistryQueries

log = logging.getLogger(__name__)

#: Request bodies larger than this are refused (413) before they are read.
MAX_BODY_BYTES = 1 << 20

Endpoint = Callable[[Request], Awaitable[Response]]
M = TypeVar("M", bound=BaseModel)


@dataclass
class ApiContext:
    """What the routes work with."""

    pool: AsyncConnectionPool
    config: TaskerConfig
    clock: Clock = field(default_factory=SystemClock)
    #: The worker running in this process, when the API is served by ``run``.
    local_status: Callable[[], dict[str, Any]] | None = None
    local_worker_id: str | None = None
    supervision: SupervisionService | None = None

    def __post_init__(self) -> None:
        self.commands = RegistryCommands(
            self.pool, self.clock, heartbeat_history=self.config.registry.heartbeat_history
        )
        self.queries = RegistryQueries(self.pool)
        self.client = QueueClient(self.pool)


class ApiError(Exception):
    """An error answered with ``status`` and a JSON body."""

    def __init__(self, status: int, error: str, detail: Any) -> None:
        super().__init__(f"{error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def error_response(status: int, error: str, detail: Any) -> JSONResponse:
    """The one error shape of the API."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


async def read_model(request: Request, model: type[M], *, empty_ok: bool = False) -> M:
    """Parse the JSON body into ``model``; 400 with the validation errors otherwise."""
    raw = await _bounded_body(request)
    if not raw.strip():
        if empty_ok:
            return model()
        raise ApiError(400, "invalid_request", "a JSON object body is required")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        detail = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise ApiError(400, "invalid_request", detail) from None


async def _bounded_body(request: Request) -> bytes:
    too_large = ApiError(413, "payload_too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise too_large
    return bytes(raw)


def int_param(request: Request, name: str, default: int, *, low: int = 1, high: int = 10_000) -> int:
    """An integer query parameter within ``[low, high]``; 400 otherwise."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_request", f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(400, "invalid_request", f"{name} must be between {low} and {high}, got {value}")
    return value


def ctx_of(request: Request) -> ApiContext:
    """The context the app was created with."""
    ctx: ApiContext = request.app.state.ctx
    return ctx


def mutating(endpoint: Endpoint) -> Endpoint:
    """Require ``Authorization: Bearer <[api] token>`` when a token is configured."""

    async def guarded(request: Request) -> Response:
        token = ctx_of(request).config.api.token
        if token:
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                return error_response(401, "unauthorized", "this route needs Authorization: Bearer <[api] token>")
        return await endpoint(request)

    guarded.__name__ = endpoint.__name__
    guarded.__doc__ = endpoint.__doc__
    return guarded


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.error, exc.detail)


async def _on_tasker_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TaskerError)
    if isinstance(exc, WorkerNotFound):
        return error_response(404, "not_found", str(exc))
    if isinstance(exc, WorkerConflict):
        return error_response(409, "conflict", str(exc))
    if isinstance(exc, InvalidTransition):
        return error_response(409, "invalid_transition", str(exc))
    if isinstance(exc, UsageError):
        return error_response(400, "invalid_request", str(exc))
    log.warning("%s %s failed: %s", request.method, request.url.path, exc)
    return error_response(500, "internal_error", str(exc))


async def _on_database_down(request: Request, exc: Exception) -> Response:
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path, first_line(exc))
    return error_response(503, "database_unavailable", first_line(exc))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    names = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    return error_response(exc.status_code, names.get(exc.status_code, "http_error"), exc.detail)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


def create_app(ctx: ApiContext) -> Starlette:
    """The ASGI application."""
    from tasker_worker.api import health, metrics, openapi, workers

    routes: list[Route] = [
        *workers.routes(),
        *health.routes(),
        Route("/api/queues", health.queues, methods=["GET"]),
        Route("/metrics", metrics.metrics, methods=["GET"]),
        Route("/openapi.json", openapi.document, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _on_api_error,
            TaskerError: _on_tasker_error,
            HTTPException: _on_http_error,
            psycopg.OperationalError: _on_database_down,
            Exception: _on_unexpected,
        },
    )
    app.state.ctx = ctx
    return app
