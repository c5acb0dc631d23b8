"""The operators' dashboard: server-rendered pages over the API's context.

``routes()`` mounts it at ``/`` beside the JSON API: the overview, workers, steps, dead letters
and modes pages (``pages``), the two actions (``actions``), and the package's own stylesheet and
script under ``/static`` (nothing is fetched from elsewhere). What the pages show is gathered in
``reads``; ``render`` holds the templates' environment and the security headers.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from tasker_worker.api.dashboard import actions, pages
from tasker_worker.api.dashboard.reads import OverviewCache
from tasker_worker.api.dashboard.render import STATIC

__all__ = ["OverviewCache", "routes"]


def _page(path: str, endpoint: Any, method: str = "GET") -> Route:
    # HTML for people: not part of the JSON API's OpenAPI document.
    return Route(path, pages.html_errors(endpoint), methods=[method], include_in_schema=False)


def routes() -> list[BaseRoute]:
    """The dashboard's routes (fixed paths before parameters)."""
    return [
        _page("/", pages.overview),
        _page("/workers", pages.workers),
        _page("/workers/{worker_id}", pages.worker),
        _page("/steps", pages.steps),
        _page("/steps/{step_uuid}", pages.step),
        _page("/steps/{step_uuid}/cancel", actions.cancel_step, "POST"),
        _page("/dlq", pages.dead_letter_index),
        _page("/dlq/{namespace}", pages.dead_letters),
        _page("/dlq/{namespace}/requeue", pages.confirm_requeue),
        _page("/dlq/{namespace}/requeue", actions.requeue, "POST"),
        _page("/modes", pages.modes),
        _page("/modes", actions.switch_mode, "POST"),
        _page("/flow", actions.pause_or_resume, "POST"),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
