"""``/openapi.json``: the OpenAPI 3.1 document, made from the operations' declarations.

Every operation (``routing.Operation``) names the pydantic models its path parameters, query
parameters and body are parsed with; their JSON Schemas are what this document publishes, so a
request the document calls valid is one the server accepts, and one it calls invalid is
answered 400. Summaries come from the handlers' docstrings, statuses from the declarations.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tasker_worker import __version__
from tasker_worker.api.routing import JSON_OBJECT_MARK, JSON_OBJECT_SCHEMA, JSON_VALUE_SCHEMA, Operation, Parameters
from tasker_worker.domain.workers import WorkerView

_REF = "#/components/schemas/{model}"
_ERROR = {"$ref": "#/components/schemas/Error"}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {}, "error_id": {"type": "string"}},
}


def _model_schema(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """``model``'s schema, its nested definitions moved into ``schemas``."""
    schema: dict[str, Any] = _json_objects(model.model_json_schema(ref_template=_REF))
    schemas.update(schema.pop("$defs", {}))
    return schema


def _json_objects(schema: Any) -> Any:
    """``schema`` with each ``JsonObject`` mark replaced by its schema."""
    if isinstance(schema, dict):
        if schema.get(JSON_OBJECT_MARK):
            return dict(JSON_OBJECT_SCHEMA)
        return {k: _json_objects(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_json_objects(v) for v in schema]
    return schema


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional parameter's schema without its ``null`` branch: absent is how it is left out."""
    branches = schema.get("anyOf")
    if branches:
        kept = [b for b in branches if b.get("type") != "null"]
        if len(kept) == 1:
            rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
            return {**rest, **kept[0]}
    return {k: v for k, v in schema.items() if k != "default" or v is not None}


def _parameters(model: type[Parameters], where: str, schemas: dict[str, Any]) -> list[dict[str, Any]]:
    schema = _model_schema(model, schemas)
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = {k: v for k, v in prop.items() if k != "title"}
        out.append(
            {
                "name": name,
                "in": where,
                "required": where == "path" or name in required,
                "schema": _not_null(prop),
            }
        )
    return out


def _operation(op: Operation, schemas: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, text in sorted(op.answers().items()):
        response: dict[str, Any] = {"description": text}
        if status >= 400:
            response["content"] = {"application/json": {"schema": _ERROR}}
        elif op.media_type != "application/json":
            response["content"] = {op.media_type: {"schema": {"type": "string"}}}
        else:
            response["content"] = {"application/json": {"schema": {}}}
        responses[str(status)] = response
    doc: dict[str, Any] = {
        "operationId": op.handler.__name__,
        "summary": op.summary,
        "responses": responses,
    }
    params: list[dict[str, Any]] = []
    if op.path_params is not None:
        params += _parameters(op.path_params, "path", schemas)
    if op.query is not None:
        params += _parameters(op.query, "query", schemas)
    if params:
        doc["parameters"] = params
    if op.body is not None:
        name = op.body.model_config.get("title") or op.body.__name__
        schemas[name] = _model_schema(op.body, schemas)
        doc["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=name)}}},
        }
    if op.secured:
        doc["security"] = [{"bearer": []}]
    return doc


def build(operations: list[Operation]) -> dict[str, Any]:
    """The document for these operations."""
    schemas: dict[str, Any] = {"Error": _ERROR_SCHEMA, "JsonValue": JSON_VALUE_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, schemas)
    schemas["WorkerView"] = _model_schema(WorkerView, schemas)  # what the worker routes answer
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
    return JSONResponse(build(request.app.state.operations))
