"""Rendering dashboard pages: the Jinja2 environment, its filters, and the response headers.

Autoescaping is on for every template, so a handler name, an error text or a worker name from
the database is shown as text whatever it contains; the Content-Security-Policy allows only the
package's own script and stylesheet, so even markup that slipped through would not run.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from tasker_worker import __version__

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

#: Seconds between a page's own refreshes (0: the page does not refresh, e.g. a confirmation).
REFRESH_S = 5
#: A page read from a read replica this far behind the primary says so at its top.
REPLICA_WARN_S = 5.0

#: The request header the page's script sends to get the page's content without its frame.
PARTIAL_HEADER = "x-tasker-partial"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Vary": "X-Tasker-Partial",
}


def age(seconds: float | None) -> str:
    """A duration for people: ``0.4 s``, ``42 s``, ``5 min``, ``3.2 h``, ``2.0 d``."""
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172_800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86_400:.1f} d"


def when(at: datetime | None) -> str:
    """A timestamp in UTC to the second."""
    if at is None:
        return "—"
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def mib(value: int | None) -> str:
    """Bytes as MiB."""
    return "—" if value is None else f"{value / 2**20:,.0f} MiB"


def percent(ratio: float | None) -> str:
    """A share as a percentage."""
    return "—" if ratio is None else f"{ratio * 100:.1f} %"


def figure(value: float | None) -> str:
    """A rate or a count, shortened."""
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}".rstrip("0").rstrip(".")


def pretty(value: Any) -> str:
    """JSON for reading, cut at 4000 characters."""
    text = json.dumps(value, indent=2, default=str, ensure_ascii=False)
    return text if len(text) <= 4000 else text[:4000] + "\n…"


def compact(value: Any) -> str:
    """JSON on one line, cut at 400 characters (event data in a table)."""
    text = json.dumps(value, separators=(", ", ": "), default=str, ensure_ascii=False)
    return text if len(text) <= 400 else text[:400] + "…"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"], default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(age=age, when=when, mib=mib, percent=percent, figure=figure, pretty=pretty, compact=compact)
    return env


ENV = _environment()


def render(
    request: Request,
    template: str,
    *,
    title: str,
    status: int = 200,
    refresh: int = REFRESH_S,
    **context: Any,
) -> HTMLResponse:
    """The page ``template`` (or, asked by the page's script, only its content)."""
    root = request.scope.get("root_path", "")
    ctx = request.app.state.ctx
    html = ENV.get_template(template).render(
        title=title,
        refresh=refresh,
        partial=request.headers.get(PARTIAL_HEADER) == "1",
        root=root,
        section=template.split(".")[0].split("_")[0],
        now=ctx.clock.now(),
        version=__version__,
        actions_enabled=bool(ctx.config.api.token),
        replica=ctx.replica,
        replica_warn_s=REPLICA_WARN_S,
        **context,
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
