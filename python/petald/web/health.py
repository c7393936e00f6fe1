"""The swarm health page: `health_routes(view_provider)` gives Starlette routes for a page (`/`)
and its JSON (`/api/status`), to serve on their own (`petald status --web`) or mounted under a
prefix of another app (e.g. `Mount("/health", routes=health_routes(...))` in `petald api`).

`view_provider()` returns the status as `petald status --json` prints it (petald.cli.status,
with the client's latency probes filled in); it is called on the trio loop for every request.
The page is static (page.html, a package resource): its small inline script fetches the JSON
every few seconds and builds the DOM with `textContent` only, so nothing a peer announced (a
model name, a public name) is ever parsed as HTML. A Content-Security-Policy allowing only that
script (by hash) and same-origin fetches backs this up: no other script, style sheet or image
source, and nothing from outside the machine."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ViewProvider = Callable[[], dict[str, Any]]


@cache
def page() -> tuple[bytes, str]:
    """(the page's bytes, its Content-Security-Policy)."""
    text = resources.files("petald.web").joinpath("page.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", text, flags=re.S)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in scripts
    )
    csp = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return text.encode(), csp


def health_routes(view_provider: ViewProvider) -> list[Route]:
    """The page at `/` and its data at `/api/status` (GET only)."""

    async def index(_: Request) -> Response:
        body, csp = page()
        return Response(
            body,
            media_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": csp,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-store",
            },
        )

    async def status(_: Request) -> Response:
        # json.dumps escapes nothing HTML-specific, but the type is application/json with
        # nosniff: a browser never renders it as a page.
        return Response(
            json.dumps(view_provider()),
            media_type="application/json",
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
        )

    return [
        Route("/", index, methods=["GET"]),
        Route("/api/status", status, methods=["GET"]),
    ]
