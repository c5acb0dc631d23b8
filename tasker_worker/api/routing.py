"""Each operation of the JSON API declared once: its method and path, its path and query
parameters and its body as pydantic models, its answers and whether it needs the token.

The router and the OpenAPI document (``openapi.py``) are both made from these declarations:
a request is parsed with the very models the document publishes (path and query parameters
too), so the document says exactly what the server enforces, and an operation cannot be
served without being documented. One Starlette route per path serves all of that path's
methods, so that a 405 names every allowed method in its ``Allow`` header (RFC 9110, 15.5.6).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError, WithJsonSchema
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tasker_worker.api.context import ApiError, bounded_body, mutating

M = TypeVar("M", bound=BaseModel)

#: A request handler of a declared operation: the request, then the parsed parts it declared
#: (``path=``, ``query=``, ``body=``).
Handler = Callable[..., Awaitable[Response]]

#: JSON strings may hold any character but NUL: PostgreSQL's text and jsonb cannot store it.
NO_NUL_PATTERN = "^[^\\x00]*$"

#: The schema of any JSON value the API stores as it is (a step's inputs and headers, a
#: heartbeat's stats): a component of the OpenAPI document, recursive.
JSON_VALUE_SCHEMA: dict[str, Any] = {
    "description": "Any JSON value whose strings (and keys) hold no NUL character",
    "anyOf": [
        {"type": "string", "pattern": NO_NUL_PATTERN},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
        {
            "type": "object",
            "propertyNames": {"pattern": NO_NUL_PATTERN},
            "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
        },
    ],
}


def _without_nul(value: Any, where: str = "") -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where or 'a string'} contains NUL (\\u0000), which PostgreSQL cannot store")
    elif isinstance(value, dict):
        for key, item in value.items():
            _without_nul(key, f"the key {where}{key[:40]!r}")
            _without_nul(item, f"{where}{key[:40]}")
    elif isinstance(value, list):
        for k, item in enumerate(value):
            _without_nul(item, f"{where}[{k}]")


def _storable(value: dict[str, Any]) -> dict[str, Any]:
    _without_nul(value)
    return value


#: The schema of a ``JsonObject``, referring to the ``JsonValue`` component.
JSON_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "propertyNames": {"pattern": NO_NUL_PATTERN},
    "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
}
#: Marks where ``openapi.py`` puts ``JSON_OBJECT_SCHEMA`` (pydantic resolves every ``$ref`` of a
#: model's schema itself, and this one is not a model's).
JSON_OBJECT_MARK = "x-tasker-json-object"

#: A JSON object stored as it is (jsonb): any object whose strings hold no NUL.
JsonObject = Annotated[
    dict[str, Any],
    AfterValidator(_storable),
    WithJsonSchema({"type": "object", JSON_OBJECT_MARK: True}),
]


def _query_bool(value: Any) -> Any:
    # Only the two spellings the document's boolean has: anything else ("yes", "1") is refused
    # rather than read as false.
    if isinstance(value, str):
        if value == "true":
            return True
        if value == "false":
            return False
        raise ValueError("must be true or false")
    return value


def _query_int(value: Any) -> Any:
    if isinstance(value, str):
        if not re.fullmatch(r"-?[0-9]{1,18}", value):
            raise ValueError("must be an integer")
        return int(value)
    return value


#: A boolean query parameter: ``true`` or ``false``.
QueryBool = Annotated[bool, BeforeValidator(_query_bool)]
#: An integer query parameter (its bounds are the field's).
QueryInt = Annotated[int, BeforeValidator(_query_int)]


class Parameters(BaseModel):
    """Path or query parameters of an operation: one field each (unknown query parameters are
    ignored, as HTTP caches and proxies may add their own)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


def _errors(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    return [
        {"field": prefix + ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


def parse_parameters(model: type[Parameters], values: dict[str, str], where: str) -> Parameters:
    """``values`` (path or query) as ``model``; 400 naming each invalid one."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ApiError(400, "invalid_request", _errors(exc, f"{where}.")) from None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_surrogates(value: Any) -> None:
    if isinstance(value, str):
        value.encode("utf-8")  # a lone surrogate (an escape like "\ud800") is no text
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_surrogates(key)
            _no_surrogates(item)
    elif isinstance(value, list):
        for item in value:
            _no_surrogates(item)


def decode_json(raw: bytes) -> Any:
    """A request body as JSON, strictly: no ``NaN``/``Infinity``, no number out of a float's
    range, no lone surrogate; 400 (``invalid_json``) otherwise."""
    try:
        data = json.loads(raw, parse_float=_finite, parse_constant=_refuse_constant)
        _no_surrogates(data)
    except (UnicodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {str(exc)[:200]}") from None
    return data


async def read_model(request: Request, model: type[M], *, empty_ok: bool = False) -> M:
    """Parse the JSON body into ``model`` (strictly: ``1`` is not ``true``, ``"5"`` is not
    ``5``); 400 with the validation errors otherwise."""
    raw = await bounded_body(request)
    if not raw.strip():
        if empty_ok:
            return model()
        raise ApiError(400, "invalid_request", "a JSON object body is required")
    data = decode_json(raw)
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise ApiError(400, "invalid_request", _errors(exc)) from None


@dataclass(frozen=True)
class Operation:
    """One operation of the API (see the module's docstring)."""

    method: str
    path: str
    handler: Handler
    #: Statuses it answers besides 200 (or its ``success`` status), each with what it means.
    responses: dict[int, str] = field(default_factory=dict)
    path_params: type[Parameters] | None = None
    query: type[Parameters] | None = None
    body: type[BaseModel] | None = None
    #: Whether a request must have a body (else an empty body is the model's defaults).
    body_required: bool = True
    #: The status of success (201 for a creation, 202 for a request accepted for later).
    success: int = 200
    #: Mutating: needs ``Authorization: Bearer <[api] token>`` when a token is set.
    secured: bool = False
    #: The media type of a successful answer.
    media_type: str = "application/json"
    #: Whether it reads the database (then a 503 is one of its answers).
    database: bool = True

    @property
    def summary(self) -> str:
        """The first line of the handler's docstring."""
        doc = (self.handler.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else f"{self.method} {self.path}"

    def answers(self) -> dict[int, str]:
        """Every status this operation can answer, with what it means."""
        out = {self.success: "OK" if self.success == 200 else self.responses.get(self.success, "OK")}
        if self.path_params or self.query or self.body:
            out[400] = "invalid request: a parameter or the body breaks the rules of this document"
        if self.body:
            out[413] = "body over 64 KiB"
        if self.secured:
            out[401] = "missing or wrong bearer token (when [api] token is set)"
        out.update(self.responses)
        out[500] = "unexpected error (generic detail; the log has the cause under error_id)"
        if self.database:
            out.setdefault(503, "the database is unavailable (generic detail, with an error_id)")
        return out

    def endpoint(self) -> Callable[[Request], Awaitable[Response]]:
        """The Starlette endpoint: parse what is declared, then call the handler."""

        async def endpoint(request: Request) -> Response:
            parts: dict[str, Any] = {}
            if self.path_params is not None:
                parts["path"] = parse_parameters(self.path_params, dict(request.path_params), "path")
            if self.query is not None:
                parts["query"] = parse_parameters(self.query, dict(request.query_params), "query")
            if self.body is not None:
                parts["body"] = await read_model(request, self.body, empty_ok=not self.body_required)
            return await self.handler(request, **parts)

        endpoint.__name__ = self.handler.__name__
        endpoint.__doc__ = self.handler.__doc__
        return mutating(endpoint) if self.secured else endpoint


def _dispatch(
    by_method: dict[str, Callable[[Request], Awaitable[Response]]],
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" and "GET" in by_method else request.method
        handler = by_method.get(method)
        if handler is None:  # Route checks methods first; kept for a route built by hand
            raise HTTPException(405, headers={"Allow": ", ".join(sorted(by_method))})
        return await handler(request)

    return endpoint


def routes(operations: Iterable[Operation]) -> list[BaseRoute]:
    """One route per path, serving each declared method of it."""
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for op in operations:
        methods = by_path.setdefault(op.path, {})
        if op.method in methods:
            raise ValueError(f"{op.method} {op.path} is declared twice")
        methods[op.method] = op.endpoint()
    return [Route(path, _dispatch(methods), methods=list(methods)) for path, methods in by_path.items()]


def one_route_per_path(routes_in: Iterable[BaseRoute]) -> list[BaseRoute]:
    """``routes_in`` with the routes that share a path merged into one (the dashboard's GET and
    POST pages), so that their 405 names every method; order kept, at the first of each path."""
    merged: dict[str, list[Route]] = {}
    order: list[BaseRoute | str] = []
    for route in routes_in:
        if isinstance(route, Route) and route.methods:
            if route.path not in merged:
                merged[route.path] = []
                order.append(route.path)
            merged[route.path].append(route)
        else:
            order.append(route)
    out: list[BaseRoute] = []
    for item in order:
        if not isinstance(item, str):
            out.append(item)
            continue
        group = merged[item]
        if len(group) == 1:
            out.append(group[0])
            continue
        by_method = {m: r.endpoint for r in group for m in (r.methods or ()) if m != "HEAD"}
        out.append(
            Route(item, _dispatch(by_method), methods=list(by_method), include_in_schema=group[0].include_in_schema)
        )
    return out
