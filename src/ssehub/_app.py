"""The standalone application: a FastAPI app around one hub."""

from __future__ import annotations

from fastapi import FastAPI

from ._hub import Hub


def create_app(hub: Hub | None = None, *, backend: str | None = None) -> FastAPI:
    """A FastAPI app serving ``hub``'s HTTP API at the root, with the hub's lifespan.

    Give a ready ``hub``, or a ``backend`` URL to create one with default settings.
    """
    from . import __version__

    if hub is None:
        hub = Hub(backend) if backend else Hub()
    app = FastAPI(title="ssehub", version=__version__, lifespan=hub.lifespan)
    app.state.hub = hub
    app.include_router(hub.router)
    return app
