"""The standalone application: a FastAPI app around one hub."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from ._hub import Hub

CORS_REQUEST_HEADERS = ("Last-Event-ID", "Authorization", "Content-Type", "Idempotency-Key")


def create_app(
    hub: Hub | None = None,
    *,
    backend: str | None = None,
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """A FastAPI app serving ``hub``'s HTTP API at the root, with the hub's lifespan.

    Give a ready ``hub``, or a ``backend`` URL to create one with default settings.
    ``cors_origins`` lists the browser origins allowed to call the hub; they may send
    credentials (cookies) and the ``Last-Event-ID`` header. ``"*"`` allows any origin
    but then never with credentials: an origin is never reflected blindly.
    """
    from . import __version__

    if hub is None:
        hub = Hub(backend) if backend else Hub()
    app = FastAPI(title="ssehub", version=__version__, lifespan=hub.lifespan)
    app.state.hub = hub
    app.include_router(hub.router)
    origins = list(dict.fromkeys(cors_origins))
    if origins:
        wildcard = "*" in origins
        app.add_middleware(
            CORSMiddleware,
            allow_origins=["*"] if wildcard else origins,
            allow_credentials=not wildcard,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=list(CORS_REQUEST_HEADERS),
            max_age=600,
        )
    return app
