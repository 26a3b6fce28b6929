"""``ssehub serve``'s protocol serves a new stream without ASGI and without a task.

Each test runs the same requests under that protocol ("ssehub") and under plain uvicorn
httptools ("uvicorn", where the stream is an ASGI response): the bytes on the wire, the
endings and the client address the hub sees must be the same; only the task differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from ssehub import Hub, create_app, server_config
from ssehub._wire import SSEDecoder

from ..helpers import (
    SERVER_PROTOCOLS,
    open_stream,
    publish,
    read_chunk,
    run_server,
    wait_until,
)

BOTH = pytest.mark.parametrize("protocol", ["ssehub", "uvicorn"])


class RawConnection:
    """One keep-alive HTTP/1.1 connection, read as raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, target: str, headers: str = "") -> None:
        self.writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode("latin-1")
        )
        await self.writer.drain()

    async def read_until(self, needle: bytes, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(needle), timeout)


@contextlib.asynccontextmanager
async def raw_connection(port: int) -> AsyncIterator[RawConnection]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield RawConnection(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def without_date(head: bytes) -> bytes:
    return b"\r\n".join(line for line in head.split(b"\r\n") if not line.startswith(b"date:"))


@pytest.mark.parametrize(("protocol", "tasks_while_open"), [("ssehub", 0), ("uvicorn", 5)])
async def test_streams_hold_no_task_under_the_hub_protocol(
    protocol: str, tasks_while_open: int
) -> None:
    hub = Hub("memory://", heartbeat_interval=0)
    async with (
        run_server(hub, http=SERVER_PROTOCOLS[protocol]) as server,
        contextlib.AsyncExitStack() as stack,
        httpx.AsyncClient() as http,
    ):
        streams = [
            await stack.enter_async_context(open_stream(server.url, ["t"])) for _ in range(5)
        ]
        for stream in streams:
            await stream.read_until_raw(b"\n\n")
        event_id = await publish(http, server.url, "t", "hello")
        for stream in streams:
            event = await stream.next()
            assert (event.id, event.data) == (event_id, '"hello"')
        tasks = server.server.server_state.tasks
        await wait_until(lambda: len(tasks) == tasks_while_open, 5, "request tasks")
        assert hub.statistics().streams == 5


@BOTH
async def test_the_same_bytes_with_and_without_asgi(protocol: str) -> None:
    # The reference is written out here rather than taken from the other protocol, so
    # each run checks the whole head and the first chunk on its own.
    hub = Hub("memory://", heartbeat_interval=0, retry_ms=1500)
    async with run_server(hub, http=SERVER_PROTOCOLS[protocol]) as server:
        async with raw_connection(server.port) as connection:
            await connection.request("/events?topic=t", "Accept: text/event-stream\r\n")
            head = await connection.read_until(b"\r\n\r\n")
            first = await connection.read_until(b"\n\n\r\n")
    assert without_date(head) == (
        b"HTTP/1.1 200 OK\r\nserver: uvicorn\r\n"
        b"content-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache, no-transform\r\nx-accel-buffering: no\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    body = b": ssehub\nretry: 1500\nid: %d\n\n" % hub.statistics().head_id
    assert first == b"%x\r\n%b\r\n" % (len(body), body)


@BOTH
async def test_a_stream_the_hub_ends_leaves_the_connection_reusable(protocol: str) -> None:
    hub = Hub("memory://", heartbeat_interval=0, max_lifetime=0.3)
    async with (
        run_server(hub, http=SERVER_PROTOCOLS[protocol]) as server,
        raw_connection(server.port) as connection,
    ):
        await connection.request("/events?topic=t")
        await connection.read_until(b"\r\n\r\n")
        decoder, events = SSEDecoder(), []
        while (chunk := await asyncio.wait_for(read_chunk(connection.reader), 5)) is not None:
            events += decoder.feed(chunk)  # until the end of the response
        assert (events[-1].event, events[-1].data) == (
            "disconnect",
            json.dumps({"reason": "lifetime"}, separators=(",", ":")),
        )
        await wait_until(lambda: hub.statistics().streams == 0, 5, "stream released")

        # the same connection serves the next request (keep-alive)
        await connection.request("/healthz")
        head = await connection.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"content-length: 15\r\n" in head
        assert await asyncio.wait_for(connection.reader.readexactly(15), 5) == b'{"status":"ok"}'


@BOTH
async def test_the_client_address_comes_from_a_trusted_proxy(protocol: str) -> None:
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default; the per-address limit
    # shows which address the hub saw.
    hub = Hub("memory://", heartbeat_interval=0, max_streams_per_ip=1)
    async with (
        run_server(hub, http=SERVER_PROTOCOLS[protocol]) as server,
        open_stream(server.url, ["t"], headers={"x-forwarded-for": "203.0.113.5"}) as first,
        open_stream(server.url, ["t"], headers={"x-forwarded-for": "203.0.113.6"}) as second,
        httpx.AsyncClient() as http,
    ):
        await first.read_until_raw(b"\n\n")
        await second.read_until_raw(b"\n\n")
        refused = await http.get(
            f"{server.url}/events?topic=t", headers={"x-forwarded-for": "203.0.113.5"}
        )
        assert refused.status_code == 429
        assert refused.json()["error"] == "over_ip_limit"
        assert "203.0.113.5" in refused.json()["detail"]
        peers = sorted(sub.ip for sub in hub._streams)
        assert peers == ["203.0.113.5", "203.0.113.6"]


async def test_uvicorn_shutdown_drains_the_hub() -> None:
    # A plain uvicorn.Server (not ssehub serve's, which drains the hub on SIGTERM) with
    # the hub's protocol: uvicorn's shutdown waits for open responses, so the protocol
    # drains the hub; streams with a task (a resume with replay) and without both end.
    hub = Hub("memory://", heartbeat_interval=0)
    config = server_config(
        create_app(hub), hub, host="127.0.0.1", port=0, log_config=None, log_level="warning"
    )
    config.timeout_graceful_shutdown = 30  # far beyond the test's own timeouts
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or task.done(), 10, "server started")
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        async with httpx.AsyncClient() as http:
            first = await publish(http, url, "t", 1)
            await publish(http, url, "t", 2)
        async with (
            open_stream(url, ["t"]) as fresh,
            open_stream(url, ["t"], last_event_id=first) as resumed,
        ):
            await fresh.read_until_raw(b"\n\n")
            assert (await resumed.next()).data == "2"  # replayed: this one has a task
            assert len(server.server_state.tasks) == 1
            server.should_exit = True
            for stream in (fresh, resumed):
                events = await stream.read_to_end(timeout=10)
                assert [(e.event, json.loads(e.data)["reason"]) for e in events] == [
                    ("disconnect", "shutdown")
                ]
        await asyncio.wait_for(task, 10)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
    assert hub.state == "closed"
