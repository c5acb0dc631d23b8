"""The control-plane API application: its routes and how each error becomes a JSON response.

``create_app(ctx)`` returns a Starlette app over an ``ApiContext`` (pool, the fleet's lifecycle
and views, config, and -- when the API runs inside ``run`` -- the local worker's status), and
with ``[api] dashboard`` the operators' pages (``api.dashboard``, HTML). Every API
error is JSON ``{"error": ..., "detail": ...}``: 400 invalid input, 401 missing or wrong token,
404 unknown worker or route, 409 conflict or forbidden transition, 413 a body over the limit, 500
anything unexpected and 503 the database unavailable (these two with a generic detail and an
``error_id`` that the server's log line carries with the cause).
"""

from __future__ import annotations

import logging
import uuid

import psycopg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tasker_worker.api import dashboard, flow, health, metrics, openapi, routing, steps, workers
from tasker_worker.api.context import ApiContext as ApiContext
from tasker_worker.api.context import ApiError, error_response
from tasker_worker.api.routing import Operation
from tasker_worker.errors import (
    HeartbeatFailed,
    InvalidTransition,
    QueueNotFound,
    StepValidationError,
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


#: How each typed error is answered: (class, HTTP status, ``error``), the first match wins.
#: A forbidden state transition is a 409, not a 400: the request is well formed, the worker's
#: state is what conflicts with it (RFC 9110, 15.5.10), and sent again later it may succeed.
ERROR_STATUS: tuple[tuple[type[TaskerError], int, str], ...] = (
    (WorkerNotFound, 404, "not_found"),
    (WorkerConflict, 409, "conflict"),
    (HeartbeatFailed, 409, "heartbeat_failed"),
    (InvalidTransition, 409, "invalid_transition"),
    (UsageError, 400, "invalid_request"),
    (StepValidationError, 400, "invalid_request"),
    (QueueNotFound, 404, "queue_not_found"),
)


async def _on_tasker_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TaskerError)
    for kind, status, error in ERROR_STATUS:
        if isinstance(exc, kind):
            return error_response(status, error, str(exc))
    return _internal(request, exc, 500, "internal_error")


async def _on_database_down(request: Request, exc: Exception) -> Response:
    return _internal(request, exc, 503, "database_unavailable")


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    names = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    response = error_response(exc.status_code, names.get(exc.status_code, "http_error"), exc.detail)
    # A 405's Allow (every method of the path: routing.py serves a path from one route).
    response.headers.update(exc.headers or {})
    return response


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    return _internal(request, exc, 500, "internal_error")


def _internal(request: Request, exc: Exception, status: int, error: str) -> Response:
    """A failure of ours (or of the database): the client gets a generic body and an error id;
    the exception's text, which may name hosts, tables or data, goes to the log under that id."""
    error_id = uuid.uuid4().hex[:16]
    unexpected = status == 500 and not isinstance(exc, TaskerError)
    log.log(
        logging.ERROR if unexpected else logging.WARNING,
        "%s %s failed (error_id=%s): %s",
        request.method,
        request.url.path,
        error_id,
        first_line(exc),
        exc_info=exc if unexpected else None,
        extra={"error_id": error_id},
    )
    detail = "the database is unavailable" if status == 503 else "internal error"
    return JSONResponse(
        {"error": error, "detail": f"{detail}; the server log has the cause under this error_id", "error_id": error_id},
        status_code=status,
    )


def api_operations() -> list[Operation]:
    """Every operation of the JSON API, as ``/openapi.json`` documents them."""
    return [
        *workers.operations(),
        *steps.operations(),
        *flow.operations(),
        *health.operations(),
        Operation("GET", "/metrics", metrics.metrics, media_type="text/plain"),
    ]


def create_app(ctx: ApiContext) -> Starlette:
    """The ASGI application."""
    operations = api_operations()
    routes: list[BaseRoute] = [
        *routing.routes(operations),
        Route("/openapi.json", openapi.document, methods=["GET"], include_in_schema=False),
        *(routing.one_route_per_path(dashboard.routes()) if ctx.config.api.dashboard else []),
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
    app.state.operations = operations
    app.state.overview = dashboard.OverviewCache()
    return app
