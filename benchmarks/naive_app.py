"""The "before" picture: an SSE fan-out written the way FastAPI tutorials and blog posts do it.

Correct but naive, on purpose. It is a benchmark target, not a pattern to copy:

- a module-level dict ``topic -> set of asyncio.Queue``, one unbounded queue per subscriber;
- publishing puts the event into every subscriber's queue (``await queue.put(...)``);
- each stream is a ``StreamingResponse`` over an async generator that polls
  ``request.is_disconnected()`` before every event, waits on its queue with
  ``asyncio.wait_for(queue.get(), 15)`` (a heartbeat comment on timeout), and formats
  (``json.dumps`` + f-string) every event once per subscriber;
- a global id counter in memory, no replay log.

It runs on the same server stack as ssehub (uvicorn with uvloop and httptools), so a
comparison measures the application pattern, not the server.

    python benchmarks/naive_app.py --host 127.0.0.1 --port 8001

HTTP API (the subset that the benchmark load generator uses):

- ``GET /events?topic=a&topic=b`` -> ``text/event-stream``: ``: ok`` + ``retry: 3000``,
  then ``id: N`` / ``event: E``? / ``data: <compact JSON>`` per event;
- ``POST /topics/{topic}/events`` with ``{"data": ..., "event"?: "..."}`` -> 201
  ``{"id": "N", "topic": "..."}`` once the event sits in every subscriber's queue;
- ``GET /healthz`` -> ``{"status": "ok"}``;
- ``GET /health/stream-capacity`` -> ``{"subscribers": <open streams>}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

HEARTBEAT_SECONDS = 15.0
RETRY_MS = 3000

app = FastAPI(title="naive SSE fan-out (benchmark target)")

# topic -> the queues of its subscribers (one queue per open stream)
subscribers: dict[str, set[asyncio.Queue[tuple[int, str | None, Any]]]] = {}
open_streams = 0
last_id = 0


class PublishIn(BaseModel):
    data: Any = None
    event: str | None = None


@app.get("/events")
async def events(
    request: Request, topic: Annotated[list[str], Query(min_length=1)]
) -> StreamingResponse:
    async def event_generator() -> AsyncIterator[str]:
        global open_streams
        queue: asyncio.Queue[tuple[int, str | None, Any]] = asyncio.Queue()
        for name in topic:
            subscribers.setdefault(name, set()).add(queue)
        open_streams += 1
        try:
            yield f": ok\nretry: {RETRY_MS}\n\n"
            while True:
                if await request.is_disconnected():
                    break
                try:
                    event_id, event, data = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    yield ": ping\n\n"
                    continue
                message = f"id: {event_id}\n"
                if event is not None:
                    message += f"event: {event}\n"
                message += f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
                yield message
        finally:
            open_streams -= 1
            for name in topic:
                queues = subscribers.get(name)
                if queues is not None:
                    queues.discard(queue)
                    if not queues:
                        del subscribers[name]

    return StreamingResponse(
        event_generator(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@app.post("/topics/{topic:path}/events", status_code=201)
async def publish(topic: str, body: PublishIn) -> dict[str, str]:
    global last_id
    last_id += 1
    item = (last_id, body.event, body.data)
    for queue in subscribers.get(topic, ()):
        await queue.put(item)
    return {"id": str(last_id), "topic": topic}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/health/stream-capacity")
async def stream_capacity() -> dict[str, int]:
    return {"subscribers": open_streams}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="naive SSE fan-out (benchmark target)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=65,
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
