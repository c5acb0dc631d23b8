"""HandlerRegistry: routes a step's ``handler`` name to the callable that runs it."""

from __future__ import annotations

import inspect
import types
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypedDict

from typing_extensions import Unpack

from tasker_worker.config.durations import parse_duration
from tasker_worker.domain.names import validate_handler_name, validate_namespace
from tasker_worker.domain.schedules import Cadence, tick_handler
from tasker_worker.domain.steps import MAX_ATTEMPT_LIMIT
from tasker_worker.domain.verdicts import HandlerPolicy, RetryPolicy
from tasker_worker.errors import UsageError

HandlerFunc = Callable[..., Any]


@dataclass(frozen=True)
class HandlerSpec:
    """A registered handler: ``func(ctx, step)``, sync or async."""

    name: str
    func: HandlerFunc
    is_async: bool
    #: Overrides ``[worker] handler_timeout``; a message's ``timeout`` overrides both.
    timeout: timedelta | None = None
    #: Capabilities this handler adds to the worker's registration (e.g. planning algorithms).
    capabilities: frozenset[str] = field(default_factory=frozenset)
    #: The capability a step's inputs need (a worker without it rejects the step).
    requires: Callable[[dict[str, Any]], str] | None = None
    #: The handler's own failure policy (None: ``[retry]`` as it is).
    policy: HandlerPolicy | None = None

    def retry_policy(self, default: RetryPolicy) -> RetryPolicy:
        """``default`` (``[retry]``) with this handler's own policy applied."""
        return default if self.policy is None else self.policy.applied_to(default)


@dataclass(frozen=True)
class PeriodicSpec:
    """Work run at each tick of ``cadence`` (``func(ctx)``), with its own timeout: on every
    worker, or (``fleet_once``) once per tick for the whole fleet, as a step of ``namespace``."""

    name: str
    func: HandlerFunc
    is_async: bool
    cadence: Cadence
    timeout: timedelta | None = None
    fleet_once: bool = False
    #: Fleet-wide: the namespace whose queue carries the tick steps (default: the worker's first).
    namespace: str | None = None
    #: Fleet-wide: on start, run the latest tick if it never ran (a tick missed while the fleet
    #: was down runs once on return).
    catch_up: bool = True


def _tick_runner(spec: PeriodicSpec) -> HandlerFunc:
    """The handler of a fleet-wide schedule's steps: ``spec.func`` with the periodic context
    (``worker_id``, ``state``, ``job``, ``log``, and ``tick``: the tick's time, ISO 8601)."""

    def context(ctx: Any, step: Any) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            worker_id=ctx.worker_id, state=ctx.state, job=spec.name, log=ctx.log, tick=step.inputs.get("tick")
        )

    if spec.is_async:

        async def run_async(ctx: Any, step: Any) -> Any:
            return await spec.func(context(ctx, step))

        return run_async

    def run_sync(ctx: Any, step: Any) -> Any:
        return spec.func(context(ctx, step))

    return run_sync


def _as_duration(value: str | timedelta | float | None) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)):
        return timedelta(seconds=float(value))
    return parse_duration(value)


Duration = str | timedelta | float


class HandlerOptions(TypedDict, total=False):
    """What ``handler`` (and ``register``) take besides the name."""

    #: Time a run may take (a step's ``timeout`` wins; default ``[worker] handler_timeout``).
    timeout: Duration | None
    #: Capabilities this handler adds to the worker's registration.
    capabilities: Iterable[str]
    #: Attempts before the step is dead-lettered (a step's ``attempt_limit`` wins).
    max_attempts: int | None
    #: ``(first, longest)`` retry delay: doubling from the first, capped at the longest.
    backoff: tuple[Duration, Duration] | None
    #: Exceptions to retry; any other is dead-lettered at once (``RetryableError`` always retries).
    retry_on: tuple[type[BaseException], ...] | None
    #: False: dead letters are recorded as outcomes without a copy in the DLQ.
    dlq: bool
    #: Snoozes (``Snooze``) per message, at most (default ``[retry] max_snoozes``).
    max_snoozes: int | None


class PeriodicOptions(TypedDict, total=False):
    """What ``periodic`` takes besides ``every``."""

    #: A cron expression (five fields, UTC) instead of ``every``.
    cron: str | None
    #: The job's name (default: the function's).
    name: str | None
    timeout: Duration | None
    #: Each tick runs on exactly one worker of the fleet (an ordinary step, sent once).
    fleet_once: bool
    #: Fleet-wide: the namespace carrying the tick steps (default: the worker's first).
    namespace: str | None
    #: Fleet-wide: on start, run the latest tick if it never ran.
    catch_up: bool


def _policy(options: HandlerOptions) -> HandlerPolicy | None:
    max_attempts = options.get("max_attempts")
    backoff = options.get("backoff")
    retry_on = options.get("retry_on")
    dlq = options.get("dlq", True)
    max_snoozes = options.get("max_snoozes")
    if max_attempts is None and backoff is None and retry_on is None and dlq and max_snoozes is None:
        return None
    if max_snoozes is not None and not 0 <= max_snoozes <= 100_000:
        raise UsageError(f"max_snoozes must be between 0 and 100000, got {max_snoozes}")
    if max_attempts is not None and not 1 <= max_attempts <= MAX_ATTEMPT_LIMIT:
        raise UsageError(f"max_attempts must be between 1 and {MAX_ATTEMPT_LIMIT}, got {max_attempts}")
    base = longest = None
    if backoff is not None:
        base, longest = (_as_duration(d) for d in backoff)
        if base is None or longest is None or base.total_seconds() <= 0 or longest < base:
            raise UsageError(f"backoff must be (first, longest) with 0 < first <= longest, got {backoff!r}")
    if retry_on is not None and not all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on):
        raise UsageError("retry_on must be a tuple of exception classes")
    return HandlerPolicy(
        max_attempts, base, longest, tuple(retry_on) if retry_on is not None else None, dlq, max_snoozes
    )


class HandlerRegistry:
    """Handlers by step name, and periodic jobs."""

    def __init__(self) -> None:
        self._handlers: dict[str, HandlerSpec] = {}
        self._periodic: dict[str, PeriodicSpec] = {}
        #: Around every handler call, the first registered outermost (``middleware``).
        self.middlewares: list[Middleware] = []

    def middleware(self, func: Middleware) -> Middleware:
        """Register ``async func(ctx, step, call_next)`` around every handler call: it runs what
        it likes before and after ``await call_next()`` (which runs the next middleware, then the
        handler, and returns its result), or returns without calling it to short-circuit (a
        result, ``ctx.snooze(...)``), or raises as a handler would. Applied in registration order,
        the first outermost."""
        if not inspect.iscoroutinefunction(func):
            raise UsageError("a middleware is an async function (ctx, step, call_next)")
        self.middlewares.append(func)
        return func

    def register(
        self,
        name: str,
        func: HandlerFunc,
        *,
        requires: Callable[[dict[str, Any]], str] | None = None,
        replace: bool = False,
        **options: Unpack[HandlerOptions],
    ) -> HandlerSpec:
        """Register ``func`` for steps whose ``handler`` is ``name`` (``HandlerOptions``)."""
        validate_handler_name(name)
        if not callable(func):
            raise UsageError(f"handler {name!r} is not callable")
        if name in self._handlers and not replace:
            raise UsageError(f"handler {name!r} is already registered")
        spec = HandlerSpec(
            name=name,
            func=func,
            is_async=inspect.iscoroutinefunction(func),
            timeout=_as_duration(options.get("timeout")),
            capabilities=frozenset(options.get("capabilities", ())),
            requires=requires,
            policy=_policy(options),
        )
        self._handlers[name] = spec
        return spec

    def handler(self, name: str, **options: Unpack[HandlerOptions]) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator form of ``register``: ``@registry.handler("charge", max_attempts=5,
        backoff=("10s", "10m"), timeout="30s", retry_on=(ConnectionError,), dlq=True)``."""

        def decorate(func: HandlerFunc) -> HandlerFunc:
            self.register(name, func, **options)
            return func

        return decorate

    def periodic(
        self, every: Duration | None = None, **options: Unpack[PeriodicOptions]
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator: run ``func(ctx)`` at each tick of ``every`` (ticks aligned to the epoch)
        or of ``cron`` (five fields, UTC). With ``fleet_once`` each tick runs on exactly one
        worker of the fleet: every worker enqueues the tick's step under the same step_uuid,
        which is sent once, and whichever worker claims it runs it."""
        cron = options.get("cron")
        name = options.get("name")
        timeout = options.get("timeout")
        fleet_once = options.get("fleet_once", False)
        namespace = options.get("namespace")
        catch_up = options.get("catch_up", True)
        cadence = Cadence(every=_as_duration(every), cron=cron)
        if namespace is not None:
            validate_namespace(namespace)

        def decorate(func: HandlerFunc) -> HandlerFunc:
            job = name or str(getattr(func, "__name__", "periodic"))
            validate_handler_name(tick_handler(job))
            if job in self._periodic:
                raise UsageError(f"periodic job {job!r} is already registered")
            spec = PeriodicSpec(
                name=job,
                func=func,
                is_async=inspect.iscoroutinefunction(func),
                cadence=cadence,
                timeout=_as_duration(timeout),
                fleet_once=fleet_once,
                namespace=namespace,
                catch_up=catch_up,
            )
            self._periodic[job] = spec
            if fleet_once:
                self.register(tick_handler(job), _tick_runner(spec), timeout=spec.timeout)
            return func

        return decorate

    def get(self, name: str) -> HandlerSpec | None:
        """The handler registered under ``name``, if any."""
        return self._handlers.get(name)

    @property
    def names(self) -> list[str]:
        """Registered handler names, sorted."""
        return sorted(self._handlers)

    @property
    def periodic_jobs(self) -> list[PeriodicSpec]:
        """Registered periodic jobs."""
        return list(self._periodic.values())

    def capabilities(self) -> list[str]:
        """Every capability of every handler (``handler:<name>`` plus declared ones)."""
        caps = {f"handler:{n}" for n in self._handlers}
        for spec in self._handlers.values():
            caps.update(spec.capabilities)
        return sorted(caps)


#: ``async def middleware(ctx, step, call_next) -> result``.
Middleware = Callable[[Any, Any, Callable[[], Awaitable[Any]]], Awaitable[Any]]


class RegistersHandlers:
    """The ``handler`` and ``periodic`` decorators of anything holding a ``registry`` — a
    ``Worker`` or a ``HandlerHarness`` — so one ``register(worker)`` function serves both."""

    registry: HandlerRegistry

    def handler(self, name: str, **options: Unpack[HandlerOptions]) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator: register a sync or async ``func(ctx, step)`` for steps named ``name``
        (``HandlerOptions``: timeout, max_attempts, backoff, retry_on, dlq, capabilities)."""
        return self.registry.handler(name, **options)

    def periodic(
        self, every: Duration | None = None, **options: Unpack[PeriodicOptions]
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator: run ``func(ctx)`` at each tick of ``every`` or ``cron`` while the worker
        runs; once per fleet with ``fleet_once`` (see ``HandlerRegistry.periodic``)."""
        return self.registry.periodic(every, **options)

    def middleware(self, func: Middleware) -> Middleware:
        """Decorator: run ``async func(ctx, step, call_next)`` around every handler call
        (``HandlerRegistry.middleware``)."""
        return self.registry.middleware(func)
