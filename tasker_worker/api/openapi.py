"""``/openapi.json``: the OpenAPI 3.1 document, built from the routes themselves.

Paths and summaries come from the app's routes and their docstrings, request and response
schemas from the pydantic models, so the document cannot drift from what is served.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tasker_worker import __version__
from tasker_worker.api.flow import LimitsRequest
from tasker_worker.api.steps import StepSubmission
from tasker_worker.api.workers import Deregistration, ModeRequest
from tasker_worker.domain.workers import Heartbeat, WorkerRegistration, WorkerView

_ERROR = {"$ref": "#/components/schemas/Error"}

#: (method, path) -> request body schema and the statuses the route answers besides 200.
_SHAPES: dict[tuple[str, str], tuple[str | None, dict[str, str]]] = {
    ("POST", "/api/workers"): (
        "WorkerRegistration",
        {"201": "registered", "400": "invalid body", "409": "id held by a live worker"},
    ),
    ("DELETE", "/api/workers/{worker_id}"): (
        "Deregistration",
        {"404": "unknown worker", "409": "already deregistered"},
    ),
    ("POST", "/api/workers/{worker_id}/heartbeat"): (
        "Heartbeat",
        {"400": "invalid body", "404": "unknown worker", "409": "deregistered"},
    ),
    ("POST", "/api/workers/{worker_id}/mode"): (
        "ModeRequest",
        {"202": "requested", "400": "invalid body", "404": "no live worker with this id"},
    ),
    ("GET", "/api/workers"): (None, {"400": "invalid status or limit"}),
    ("GET", "/api/workers/{worker_id}"): (None, {"404": "unknown worker"}),
    ("GET", "/api/workers/{worker_id}/heartbeats"): (None, {"400": "invalid limit", "404": "unknown worker"}),
    ("POST", "/api/namespaces/{namespace}/steps"): (
        "StepSubmission",
        {"201": "enqueued", "400": "invalid body", "404": "no such namespace queue"},
    ),
    ("GET", "/api/steps"): (None, {"400": "invalid status or limit"}),
    ("GET", "/api/steps/{step_uuid}"): (None, {"400": "not a UUID", "404": "unknown step"}),
    ("GET", "/api/queues/{namespace}/flow"): (None, {"400": "invalid namespace"}),
    ("POST", "/api/queues/{namespace}/pause"): (None, {"400": "invalid namespace"}),
    ("POST", "/api/queues/{namespace}/resume"): (None, {"400": "invalid namespace"}),
    ("POST", "/api/queues/{namespace}/limits"): ("LimitsRequest", {"400": "invalid namespace or body"}),
    ("GET", "/health/ready"): (None, {"503": "not ready"}),
    ("GET", "/health/detailed"): (None, {"503": "unhealthy"}),
}


def _operation(method: str, route: Route, secured: bool) -> dict[str, Any]:
    doc = (route.endpoint.__doc__ or "").strip()
    body, statuses = _SHAPES.get((method, route.path), (None, {}))
    responses: dict[str, Any] = {}
    if "201" not in statuses and "202" not in statuses:
        responses["200"] = {"description": "OK"}
    for code, text in statuses.items():
        content = {"application/json": {"schema": _ERROR}} if code.startswith("4") else None
        responses[code] = {"description": text, **({"content": content} if content else {})}
    responses["500"] = {
        "description": "unexpected error (generic detail; the log has the cause under error_id)",
        "content": {"application/json": {"schema": _ERROR}},
    }
    op: dict[str, Any] = {"summary": doc.splitlines()[0] if doc else route.path, "responses": responses}
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in route.param_convertors
    ]
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {
            "required": method == "POST" and body != "Heartbeat",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    if secured:
        op["security"] = [{"bearer": []}]
        responses["401"] = {"description": "missing or wrong bearer token (when [api] token is set)"}
    return op


def build(routes: list[Any]) -> dict[str, Any]:
    """The document for these routes."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or not route.include_in_schema or route.path == "/openapi.json":
            continue
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            paths.setdefault(route.path, {})[method.lower()] = _operation(method, route, method in ("POST", "DELETE"))
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "detail"],
            "properties": {"error": {"type": "string"}, "detail": {}, "error_id": {"type": "string"}},
        }
    }
    for model in (
        WorkerRegistration,
        Heartbeat,
        WorkerView,
        Deregistration,
        ModeRequest,
        StepSubmission,
        LimitsRequest,
    ):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))  # nested enums become components of their own
        schemas[model.__name__] = schema
    return {
        "openapi": "3.1.0",
        "info": {"title": "tasker-worker control plane", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


async def document(request: Request) -> Response:
    """The OpenAPI document of this API."""
    return JSONResponse(build(list(request.app.routes)))
