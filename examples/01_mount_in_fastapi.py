"""Mount ssehub in your own FastAPI app: publish from an endpoint, stream with replay.

Run it from the project root (it serves on http://127.0.0.1:8000)::

    python examples/01_mount_in_fastapi.py
    # or: uvicorn examples.01_mount_in_fastapi:app

Then, in other terminals::

    curl -N 'http://127.0.0.1:8000/sse/events?topic=orders'     # the hub's own stream
    curl -N http://127.0.0.1:8000/me/feed -H 'X-User: alice'    # this app's stream
    curl -X POST http://127.0.0.1:8000/orders -H 'content-type: application/json' \\
         -d '{"item": "book", "quantity": 2}'

Events are kept in ``example.db`` (set ``SSEHUB_EXAMPLE_DB`` to use another file), so
a client that reconnects with ``Last-Event-ID`` gets what it missed, even across restarts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, Header
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field

from ssehub import Hub

hub = Hub(f"sqlite:///{os.environ.get('SSEHUB_EXAMPLE_DB', 'example.db')}")
app = FastAPI(title="ssehub example", lifespan=hub.lifespan)  # starts, drains, closes the hub
app.state.hub = hub
# /sse/events, /sse/topics/{topic}/events, /sse/healthz, ...
app.include_router(hub.router, prefix="/sse")


class Order(BaseModel):
    item: str = Field(min_length=1, max_length=100)
    quantity: int = Field(default=1, ge=1)


class CreatedOrder(Order):
    order_id: str
    event_id: str


@app.post("/orders", status_code=201)
async def create_order(order: Order) -> CreatedOrder:
    order_id = uuid.uuid4().hex
    # ... store the order in your database here ...
    payload = {"order_id": order_id, **order.model_dump(mode="json")}
    event = await hub.publish("orders", payload, event="order.created")
    return CreatedOrder(order_id=order_id, event_id=event.event_id, **order.model_dump())


async def current_user(
    x_user: Annotated[str, Header(pattern=r"^[a-z0-9_-]{1,50}$")] = "guest",
) -> str:
    """A stand-in for real authentication: the user name comes from an ``X-User`` header."""
    return x_user


@app.get("/me/feed", response_class=EventSourceResponse)
async def my_feed(
    user: Annotated[str, Depends(current_user)],
    last_event_id: Annotated[str | None, Header()] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Every order plus this user's own notifications, resumable with Last-Event-ID."""
    async for event in hub.subscribe(["orders", f"user:{user}"], last_event_id=last_event_id):
        yield event


if __name__ == "__main__":
    from ssehub import HubServer, server_config

    # HubServer tells the hub to close its streams on Ctrl+C / SIGTERM (plain uvicorn
    # would wait for the open streams, which never end by themselves); server_config
    # picks uvloop, httptools and a keep-alive timeout that suits long-lived streams.
    HubServer(server_config(app, hub, host="127.0.0.1", port=8000), hub).run()
