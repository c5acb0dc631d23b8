"""The control-plane API application: its routes and how each error becomes a JSON response.

``create_app(ctx)`` returns a Starlette app over an ``ApiContext`` (pool, the fleet's lifecycle
and views, config, and -- when the API runs inside ``run`` -- the local worker's status). Every
error is JSON ``{"error": ..., "detail": ...}``: 400 invalid input, 401 missing or wrong token,
404 unknown worker or route, 409 conflict or forbidden transition, 500 anything unexpected.
"""

from __future__ import annotations

import logging

import psycopg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tasker_worker.api import health, metrics, openapi, workers
from tasker_worker.api.context import ApiContext as ApiContext
from tasker_worker.api.context import ApiError, error_response
from tasker_worker.errors import (
    InvalidTransition,
    TaskerError,
    UsageError,
    WorkerConflict,
    WorkerNotFound,
    first_line,
)

log = logging.getLogger(__name__)


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
