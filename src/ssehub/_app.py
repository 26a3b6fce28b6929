"""The standalone application: a FastAPI app around one hub."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, Final

from fastapi import FastAPI, Request, Response
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ._hub import Hub
from ._routes import EVENTS_SUFFIX, TOPICS_PREFIX, EventsEndpoint, PublishEndpoint

CORS_REQUEST_HEADERS = ("Last-Event-ID", "Authorization", "Content-Type", "Idempotency-Key")
CORS_EXPOSED_HEADERS = ("Retry-After",)
"""Response headers a cross-origin script may read: ssehub.js waits ``Retry-After``."""

DASHBOARD_CACHE: Final = "no-cache"
"""The page is revalidated on every load (cheap: its ETag answers 304)."""
SCRIPT_CACHE: Final = "public, max-age=600"
"""ssehub.js may be reused for ten minutes, then revalidated by its ETag."""


@functools.cache
def static_file(name: str) -> bytes:
    """A file of the package's ``static/`` folder, read once per process."""
    return (resources.files("ssehub") / "static" / name).read_bytes()


def _inline_script_hashes(page: bytes) -> str:
    """CSP sources allowing exactly the page's inline scripts (by their SHA-256)."""
    scripts = re.findall(rb"<script[^>]*>(.*?)</script>", page, flags=re.DOTALL)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in scripts
        if script.strip()
    )


def static_endpoint(
    body: bytes, media_type: str, headers: dict[str, str]
) -> Callable[[Request], Awaitable[Response]]:
    """A GET endpoint answering ``body`` with an ETag (and 304 to a matching
    ``If-None-Match``), plus ``headers``."""
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    all_headers = {"ETag": etag, "X-Content-Type-Options": "nosniff", **headers}

    async def endpoint(request: Request) -> Response:
        wanted = request.headers.get("if-none-match", "")
        tags = {tag.strip().removeprefix("W/") for tag in wanted.split(",")}
        if etag in tags or "*" in tags:
            return Response(status_code=304, headers=all_headers)
        return Response(body, media_type=media_type, headers=all_headers)

    return endpoint


def static_routes() -> list[Route]:
    """``GET /`` (the dashboard page) and ``GET /ssehub.js`` (the browser client)."""
    page = static_file("dashboard.html")
    policy = (
        "default-src 'self'; "
        f"script-src 'self' {_inline_script_hashes(page)}; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
    )
    dashboard = static_endpoint(
        page,
        "text/html; charset=utf-8",
        {"Cache-Control": DASHBOARD_CACHE, "Content-Security-Policy": policy},
    )
    script = static_endpoint(
        static_file("ssehub.js"), "text/javascript; charset=utf-8", {"Cache-Control": SCRIPT_CACHE}
    )
    return [
        Route("/", dashboard, methods=["GET"], include_in_schema=False),
        Route("/ssehub.js", script, methods=["GET"], include_in_schema=False),
    ]


def create_app(
    hub: Hub | None = None,
    *,
    backend: str | None = None,
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """A FastAPI app serving ``hub``'s HTTP API at the root, with the hub's lifespan,
    the dashboard page at ``/`` and the browser client at ``/ssehub.js``.

    Give a ready ``hub``, or a ``backend`` URL to create one with default settings.
    ``cors_origins`` lists the browser origins allowed to call the hub; they may send
    credentials (cookies) and the ``Last-Event-ID`` header. ``"*"`` allows any origin
    but then never with credentials: an origin is never reflected blindly.
    """
    from . import __version__

    if hub is None:
        hub = Hub(backend) if backend else Hub()
    app = HubApp(title="ssehub", version=__version__, lifespan=hub.lifespan)
    app.state.hub = hub
    app.include_router(hub.router)
    app.router.routes.extend(static_routes())
    app.bare_events = EventsEndpoint(hub)
    events: ASGIApp = app.bare_events
    publish: ASGIApp = PublishEndpoint(hub)
    origins = list(dict.fromkeys(cors_origins))
    if origins:
        wildcard = "*" in origins
        cors: dict[str, Any] = {
            "allow_origins": ["*"] if wildcard else origins,
            "allow_credentials": not wildcard,
            "allow_methods": ["GET", "POST", "OPTIONS"],
            "allow_headers": list(CORS_REQUEST_HEADERS),
            "expose_headers": list(CORS_EXPOSED_HEADERS),
            "max_age": 600,
        }
        app.add_middleware(CORSMiddleware, **cors)
        events = CORSMiddleware(events, **cors)
        publish = CORSMiddleware(publish, **cors)
    app.events_endpoint = events
    app.publish_endpoint = publish
    app.own_middleware = len(app.user_middleware)
    return app


class HubApp(FastAPI):
    """The standalone app. ``GET /events`` and ``POST /topics/{topic}/events`` skip
    FastAPI's middleware and routing stack and go straight to bare endpoints (through
    CORS when configured): the frames and objects a framework keeps alive for a request
    are paid per open stream, and its routing per publish. Once someone adds a middleware
    of their own, every request takes the normal path through it."""

    events_endpoint: ASGIApp | None = None
    publish_endpoint: ASGIApp | None = None
    bare_events: EventsEndpoint | None = None
    own_middleware = 0

    @property
    def hub(self) -> Hub:
        hub: Hub = self.state.hub
        return hub

    def direct_events(self, has_origin: bool) -> EventsEndpoint | None:
        """The bare ``GET /events`` endpoint, for a server that serves streams itself
        (``ssehub serve``), when a request would reach it unchanged: no middleware of
        the user's, and no CORS headers to add (CORS wraps the endpoint, and the request
        has an ``Origin`` header: CORS passes requests without one through untouched)."""
        if self.bare_events is None or len(self.user_middleware) != self.own_middleware:
            return None
        if has_origin and self.events_endpoint is not self.bare_events:
            return None
        return self.bare_events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # (async on purpose: servers tell ASGI 3 apps by a coroutine __call__)
        if (
            self.events_endpoint is not None
            and self.publish_endpoint is not None
            and scope["type"] == "http"
            and len(self.user_middleware) == self.own_middleware
        ):
            path: str = scope["path"]
            method = scope["method"]
            if path == "/events" and method == "GET":
                await self.events_endpoint(scope, receive, send)
                return
            if (
                method == "POST"
                and path.startswith(TOPICS_PREFIX)
                and path.endswith(EVENTS_SUFFIX)
                and len(path) > len(TOPICS_PREFIX) + len(EVENTS_SUFFIX)
            ):
                await self.publish_endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
