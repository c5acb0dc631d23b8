"""The dashboard's actions (POST): requeue dead letters, switch deployment modes.

Every action needs the operator token (``[api] token``) in the form (or as ``Authorization:
Bearer``), also on loopback, where the JSON API lets mutations through without one: a page in
the operator's browser can be made to post to ``127.0.0.1`` by any other site it visits, and a
secret the other site cannot know is what stops that. Without ``[api] token`` configured the
actions are switched off (403). A refused action changes nothing.
"""

from __future__ import annotations

import hmac
import uuid
from urllib.parse import parse_qs, quote, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from tasker_worker.api.context import ApiError, bounded_body, ctx_of
from tasker_worker.api.dashboard import reads
from tasker_worker.api.dashboard.pages import MODES, refused
from tasker_worker.db import flow as flow_db
from tasker_worker.domain.names import queue_name, validate_namespace
from tasker_worker.errors import InvalidName, QueueNotFound

Form = dict[str, list[str]]


async def _form(request: Request) -> Form:
    """The urlencoded body (bounded like every API body)."""
    raw = await bounded_body(request)
    try:
        return parse_qs(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=1100)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_request", f"the form could not be read: {exc}") from None


def _one(form: Form, name: str) -> str:
    values = form.get(name) or [""]
    return values[0].strip()


def _authorized(request: Request, form: Form) -> Response | None:
    """None when the request carries the operator token; else the page refusing it."""
    token = ctx_of(request).config.api.token
    if not token:
        return refused(
            request,
            403,
            "Actions are switched off",
            "Set [api] token (TASKER__API__TOKEN) to requeue dead letters and switch modes from the dashboard.",
        )
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    given = _one(form, "token") or (bearer.strip() if scheme.lower() == "bearer" else "")
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        return refused(
            request, 401, "Operator token needed", "The operator token is missing or wrong; nothing was changed."
        )
    return None


def _redirect(request: Request, path: str, **query: object) -> Response:
    root = request.scope.get("root_path", "")
    return RedirectResponse(f"{root}{path}?{urlencode(query)}", status_code=303)


async def requeue(request: Request) -> Response:
    """Requeue one dead letter (``msg_id``) or the oldest ``REQUEUE_ALL_LIMIT`` (``all=1``),
    confirmed (``confirm=yes``); each is recorded as a DeadLetterRequeued event."""
    namespace = request.path_params["namespace"]
    form = await _form(request)
    denied = _authorized(request, form)
    if denied is not None:
        return denied
    try:
        queue = queue_name(namespace)
    except InvalidName as exc:
        return refused(request, 400, "Not a namespace", str(exc))
    if _one(form, "confirm") != "yes":
        return refused(request, 400, "Not confirmed", "A requeue is done from its confirmation page.")
    everything = _one(form, "all") == "1"
    raw_id = _one(form, "msg_id")
    if not everything and not (raw_id.isdigit() and len(raw_id) < 19):
        return refused(request, 400, "Nothing to requeue", "Name a dead letter (msg_id) or ask for all of them.")
    ctx = ctx_of(request)
    try:
        moved = await (await ctx.client_of(namespace)).requeue_dead_letters(
            queue,
            None if everything else [int(raw_id)],
            actor="dashboard",
            limit=reads.REQUEUE_ALL_LIMIT,
        )
    except QueueNotFound:
        return refused(request, 404, "No such namespace", f"Namespace {namespace!r} has no queue.")
    remaining = 0
    if everything and len(moved) == reads.REQUEUE_ALL_LIMIT:
        remaining = 1  # at least one slice more may wait; the page shows the DLQ's size
    return _redirect(request, f"/dlq/{namespace}", requeued=len(moved), remaining=remaining)


async def switch_mode(request: Request) -> Response:
    """Ask a namespace's workers (``namespace``) or one worker (``worker_id``) to switch to
    ``mode``; they switch at once when listening, else within a heartbeat interval."""
    form = await _form(request)
    denied = _authorized(request, form)
    if denied is not None:
        return denied
    mode = _one(form, "mode")
    if mode not in MODES:
        return refused(request, 400, "Not a deployment mode", f"Choose one of {', '.join(MODES)}.")
    namespace = _one(form, "namespace") or None
    worker_id = _one(form, "worker_id") or None
    if (namespace is None) == (worker_id is None):
        return refused(request, 400, "Whose mode?", "Name either a namespace or a worker.")
    if namespace is not None:
        try:
            validate_namespace(namespace)
        except InvalidName as exc:
            return refused(request, 400, "Not a namespace", str(exc))
    asked = await ctx_of(request).lifecycle.request_mode(mode, worker_id=worker_id, namespace=namespace)
    if worker_id is not None:
        if not asked:
            return refused(request, 404, "No such live worker", f"No live worker is registered as {worker_id!r}.")
        return _redirect(request, f"/workers/{quote(worker_id, safe='')}", asked=1, mode=mode)
    return _redirect(request, "/modes", asked=len(asked), mode=mode)


async def pause_or_resume(request: Request) -> Response:
    """Pause (``action=pause``) or resume (``action=resume``) a namespace (``namespace``):
    applied by every worker at its next claim; recorded as a QueuePaused or QueueResumed event."""
    form = await _form(request)
    denied = _authorized(request, form)
    if denied is not None:
        return denied
    action = _one(form, "action")
    if action not in ("pause", "resume"):
        return refused(request, 400, "Pause or resume?", "Choose pause or resume.")
    namespace = _one(form, "namespace")
    try:
        validate_namespace(namespace)
    except InvalidName as exc:
        return refused(request, 400, "Not a namespace", str(exc))
    pool = await ctx_of(request).pool_of(namespace)
    if action == "pause":
        await flow_db.pause(pool, namespace, "dashboard")
    else:
        await flow_db.resume(pool, namespace, "dashboard")
    request.app.state.overview.forget()
    return _redirect(request, "/", flow=action, namespace=namespace)


async def cancel_step(request: Request) -> Response:
    """Cancel a step (``namespace`` in the form): a queued one at once, a running one asked to
    stop; recorded with who asked (``dashboard``)."""
    form = await _form(request)
    denied = _authorized(request, form)
    if denied is not None:
        return denied
    try:
        step_uuid = uuid.UUID(request.path_params["step_uuid"])
    except ValueError:
        return refused(request, 400, "Not a step_uuid", "The address does not end in a UUID.")
    namespace = _one(form, "namespace")
    try:
        validate_namespace(namespace)
    except InvalidName as exc:
        return refused(request, 400, "Not a namespace", str(exc))
    state = await ctx_of(request).producer.cancel(namespace, step_uuid, by="dashboard")
    if state not in ("cancelled", "cancelling"):
        return refused(request, 409, "Not cancelled", f"The step is {state.replace('_', ' ')}.")
    return _redirect(request, f"/steps/{step_uuid}", cancel=state)
