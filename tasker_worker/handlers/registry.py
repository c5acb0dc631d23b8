"""HandlerRegistry: routes a step's ``handler`` name to the callable that runs it."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tasker_worker.config.durations import parse_duration
from tasker_worker.domain.names import validate_handler_name
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


@dataclass(frozen=True)
class PeriodicSpec:
    """Work run every ``every`` (``func(ctx)``), with its own timeout."""

    name: str
    func: HandlerFunc
    is_async: bool
    every: timedelta
    timeout: timedelta | None = None


def _as_duration(value: str | timedelta | float | None) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)):
        return timedelta(seconds=float(value))
    return parse_duration(value)


class HandlerRegistry:
    """Handlers by step name, and periodic jobs."""

    def __init__(self) -> None:
        self._handlers: dict[str, HandlerSpec] = {}
        self._periodic: dict[str, PeriodicSpec] = {}

    def register(
        self,
        name: str,
        func: HandlerFunc,
        *,
        timeout: str | timedelta | float | None = None,
        capabilities: Iterable[str] = (),
        requires: Callable[[dict[str, Any]], str] | None = None,
        replace: bool = False,
    ) -> HandlerSpec:
        """Register ``func`` for steps whose ``handler`` is ``name``."""
        validate_handler_name(name)
        if not callable(func):
            raise UsageError(f"handler {name!r} is not callable")
        if name in self._handlers and not replace:
            raise UsageError(f"handler {name!r} is already registered")
        spec = HandlerSpec(
            name=name,
            func=func,
            is_async=inspect.iscoroutinefunction(func),
            timeout=_as_duration(timeout),
            capabilities=frozenset(capabilities),
            requires=requires,
        )
        self._handlers[name] = spec
        return spec

    def handler(
        self, name: str, *, timeout: str | timedelta | float | None = None, capabilities: Iterable[str] = ()
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator form of ``register``."""

        def decorate(func: HandlerFunc) -> HandlerFunc:
            self.register(name, func, timeout=timeout, capabilities=capabilities)
            return func

        return decorate

    def periodic(
        self, every: str | timedelta | float, *, name: str | None = None, timeout: str | timedelta | float | None = None
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator: run ``func(ctx)`` every ``every``."""
        interval = _as_duration(every)
        if interval is None or interval.total_seconds() <= 0:
            raise UsageError("periodic work needs a positive interval")

        def decorate(func: HandlerFunc) -> HandlerFunc:
            job = name or str(getattr(func, "__name__", "periodic"))
            self._periodic[job] = PeriodicSpec(
                name=job,
                func=func,
                is_async=inspect.iscoroutinefunction(func),
                every=interval,
                timeout=_as_duration(timeout),
            )
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


class RegistersHandlers:
    """The ``handler`` and ``periodic`` decorators of anything holding a ``registry`` — a
    ``Worker`` or a ``HandlerHarness`` — so one ``register(worker)`` function serves both."""

    registry: HandlerRegistry

    def handler(
        self, name: str, *, timeout: str | timedelta | float | None = None
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator: register a sync or async ``func(ctx, step)`` for steps named ``name``."""
        return self.registry.handler(name, timeout=timeout)

    def periodic(
        self, every: str | timedelta | float, *, name: str | None = None, timeout: str | timedelta | float | None = None
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator: run ``func(ctx)`` every ``every`` while the worker runs."""
        return self.registry.periodic(every, name=name, timeout=timeout)
