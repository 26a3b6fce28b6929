"""Test helpers: a real uvicorn on an ephemeral port, SSE stream readers, wait_until."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from ssehub import Hub, create_app
from ssehub._server import HubHttpToolsProtocol
from ssehub._wire import ServerEvent, SSEDecoder

SERVER_PROTOCOLS: dict[str, Any] = {"ssehub": HubHttpToolsProtocol, "uvicorn": "httptools"}
SERVER_PROTOCOL = os.environ.get("SSEHUB_TEST_SERVER", "ssehub")
"""How :func:`run_server` serves unless a test says: ``ssehub`` (the protocol of
``ssehub serve``, which serves streams without ASGI) or ``uvicorn`` (plain uvicorn
httptools: the hub as any ASGI server runs it). scripts/test runs the integration tests
both ways."""


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = ""
) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what or predicate}")
        await asyncio.sleep(0.01)


async def read_chunk(reader: asyncio.StreamReader) -> bytes | None:
    """The next chunk of a chunked HTTP/1.1 body read raw, or None at its last chunk."""
    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
    if size == 0:
        await reader.readuntil(b"\r\n")
        return None
    return (await reader.readexactly(size + 2))[:-2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (free when this returns)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class RunningServer:
    def __init__(self, server: uvicorn.Server, app: FastAPI) -> None:
        self.server = server
        self.app = app
        port = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.port = port

    @property
    def hub(self) -> Hub:
        hub: Hub = self.app.state.hub
        return hub


@contextlib.asynccontextmanager
async def run_server(
    app: FastAPI | Hub, *, port: int = 0, **options: Any
) -> AsyncIterator[RunningServer]:
    """Serve ``app`` (or a hub's standalone app) on 127.0.0.1, on ``port`` (0: an
    ephemeral one), in this event loop, with extra uvicorn ``options`` (e.g. ``http=``);
    on exit drain the hub's streams and stop the server."""
    if isinstance(app, Hub):
        app = create_app(app)
    options.setdefault("log_level", "warning")
    options.setdefault("http", SERVER_PROTOCOLS[SERVER_PROTOCOL])
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="on", log_config=None, **options
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or task.done(), 10, "server started")
        if task.done():
            task.result()
            raise RuntimeError("server exited during startup")
        running = RunningServer(server, app)
        yield running
    finally:
        hub = getattr(app.state, "hub", None)
        if isinstance(hub, Hub) and hub.state == "running":
            await hub.drain(grace=5)
        server.should_exit = True
        await asyncio.wait_for(task, 15)


class SSEStream:
    """Reads a live text/event-stream response event by event."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.decoder = SSEDecoder()
        self.raw = bytearray()
        self._events: deque[ServerEvent] = deque()
        self._chunks = response.aiter_raw()
        self.ended = False

    async def _read_chunk(self) -> bool:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self.ended = True
            return False
        self.raw += chunk
        self._events.extend(self.decoder.feed(chunk))
        return True

    async def next(self, timeout: float = 5.0) -> ServerEvent:
        async with asyncio.timeout(timeout):
            while not self._events:
                if not await self._read_chunk():
                    raise EOFError("stream ended")
        return self._events.popleft()

    async def take(self, n: int, timeout: float = 5.0) -> list[ServerEvent]:
        return [await self.next(timeout) for _ in range(n)]

    async def read_until_raw(self, needle: bytes, timeout: float = 5.0) -> None:
        """Read until ``needle`` occurs in the raw bytes received so far."""
        async with asyncio.timeout(timeout):
            while needle not in self.raw:
                if not await self._read_chunk():
                    raise EOFError(f"stream ended before {needle!r}")

    async def read_to_end(self, timeout: float = 5.0) -> list[ServerEvent]:
        async with asyncio.timeout(timeout):
            while await self._read_chunk():
                pass
        events = list(self._events)
        self._events.clear()
        return events

    @property
    def last_event_id(self) -> str:
        return self.decoder.last_event_id


@contextlib.asynccontextmanager
async def open_stream(
    base_url: str,
    topics: Sequence[str],
    *,
    last_event_id: str | None = None,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/events",
    client: httpx.AsyncClient | None = None,
) -> AsyncIterator[SSEStream]:
    """Open ``GET /events?topic=...`` and yield an :class:`SSEStream` once headers arrive."""
    query: list[tuple[str, str | int | float | bool | None]] = [("topic", t) for t in topics]
    query += [(k, str(v)) for k, v in (params or {}).items()]
    all_headers = {"accept": "text/event-stream", **(headers or {})}
    if last_event_id is not None:
        all_headers["last-event-id"] = last_event_id
    own = client is None
    http = client or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
    try:
        async with http.stream(
            "GET", base_url + path, params=query, headers=all_headers
        ) as response:
            yield SSEStream(response)
    finally:
        if own:
            await http.aclose()


async def publish(
    client: httpx.AsyncClient, base_url: str, topic: str, data: Any, **fields: Any
) -> str:
    response = await client.post(f"{base_url}/topics/{topic}/events", json={"data": data, **fields})
    assert response.status_code == 201, response.text
    event_id: str = response.json()["id"]
    return event_id
