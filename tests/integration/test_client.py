"""ssehub.client (EventStream, publish) against a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ssehub import Hub, StreamProtocolError, StreamRefusedError
from ssehub.client import EventStream, ServerEvent, publish

from ..helpers import RunningServer, run_server, wait_until

FAST: dict[str, Any] = {"heartbeat_interval": 0, "retry_ms": 100, "shutdown_retry_ms": 100}
"""Hub settings that make clients come back quickly (tests must stay fast)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_on_port(app: FastAPI | Hub, port: int) -> AbstractAsyncContextManager[RunningServer]:
    """Like ``run_server`` but on a fixed port, so a client can reconnect to the same URL."""
    return run_server(app, port=port)


@contextlib.asynccontextmanager
async def consume(stream: EventStream) -> AsyncIterator[list[ServerEvent]]:
    """Iterate ``stream`` in a background task, collecting events into the yielded list."""
    received: list[ServerEvent] = []

    async def run() -> None:
        async for event in stream:
            received.append(event)

    task = asyncio.create_task(run())
    try:
        yield received
        if task.done():
            task.result()  # surface an unexpected error of the consumer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await stream.aclose()


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with run_server(Hub("memory://", **FAST)) as running:
        yield running


async def test_receives_published_events_and_tracks_last_event_id(server: RunningServer) -> None:
    stream = EventStream(server.url, ["a", "b"])
    async with consume(stream) as received:
        await wait_until(lambda: stream.connects == 1, what="connected")
        one = await publish(server.url, "a", {"x": 1}, event="tick")
        two = await publish(server.url, "b", raw_data="line 1\nline 2")
        await publish(server.url, "other", "not subscribed")
        three = await publish(server.url, "a", [1, "two"])
        await wait_until(lambda: len(received) >= 3, what="three events")
        assert [(e.id, e.event, e.data) for e in received] == [
            (one, "tick", '{"x":1}'),
            (two, "message", "line 1\nline 2"),
            (three, "message", '[1,"two"]'),
        ]
        assert int(one) < int(two) < int(three)
        assert stream.last_event_id == three
        assert stream.connects == 1


async def test_fresh_connect_takes_the_server_position(server: RunningServer) -> None:
    await publish(server.url, "p", "before")
    head = await publish(server.url, "p", "before, too")
    stream = EventStream(server.url, ["p"])
    assert stream.last_event_id == ""
    async with consume(stream) as received:
        # no event yet, but the first block's `id:` is where a reconnect would resume
        await wait_until(lambda: stream.last_event_id == head, what="position from server")
        after = await publish(server.url, "p", "after")
        await wait_until(lambda: len(received) == 1)
        assert [(e.id, e.data) for e in received] == [(after, '"after"')]


async def test_stopping_mid_batch_resumes_after_the_last_event_handed_out(
    server: RunningServer,
) -> None:
    start = await publish(server.url, "other", "a resume point")
    ids = [await publish(server.url, "batch", i) for i in range(3)]
    async with EventStream(server.url, ["batch"], last_event_id=start) as stream:
        # the three replayed events arrive in one write; take only the first
        async with contextlib.aclosing(aiter(stream)) as events:
            first = await asyncio.wait_for(anext(events), 5)
        assert first.id == ids[0]
        assert stream.last_event_id == ids[0]
        # a new iteration resumes after the event the consumer actually got
        async with contextlib.aclosing(aiter(stream)) as events:
            rest = [await asyncio.wait_for(anext(events), 5) for _ in range(2)]
        assert [e.id for e in rest] == ids[1:]
        assert stream.connects == 2


async def test_resumes_after_server_restart_with_every_event_exactly_once(tmp_path: Path) -> None:
    backend = f"sqlite:///{tmp_path}/hub.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stream = EventStream(url, ["r"])
    async with contextlib.AsyncExitStack() as stack:
        first = contextlib.AsyncExitStack()  # stopped half-way, while the client runs
        stack.push_async_callback(first.aclose)
        await first.enter_async_context(serve_on_port(Hub(backend, **FAST), port))
        received = await stack.enter_async_context(consume(stream))
        await wait_until(lambda: stream.connects == 1, what="connected")
        ids = [await publish(url, "r", i) for i in range(3)]
        await wait_until(lambda: len(received) == 3, what="first three")
        await first.aclose()
        # the stream was closed with `event: disconnect`; the client is retrying the port
        assert stream.last_event_id == ids[-1]
        async with run_server(Hub(backend, **FAST)) as elsewhere:
            ids += [await publish(elsewhere.url, "r", i) for i in range(3, 6)]
        async with serve_on_port(Hub(backend, **FAST), port):
            await wait_until(lambda: len(received) == 6, what="missed events replayed")
            ids.append(await publish(url, "r", 6))
            await wait_until(lambda: len(received) == 7, what="live after replay")
            assert [e.data for e in received] == [str(i) for i in range(7)]
            assert [e.id for e in received] == ids
            assert stream.last_event_id == ids[-1]
            assert stream.connects >= 2
            assert all(e.event == "message" for e in received)  # no disconnect leaked


async def test_resume_point_survives_a_connection_that_carried_no_event(tmp_path: Path) -> None:
    # A resumed stream has no `id:` of its own and the shutdown disconnect carries none:
    # the client must keep its resume point across such a connection.
    backend = f"sqlite:///{tmp_path}/hub.db"
    port = free_port()
    async with serve_on_port(Hub(backend, **FAST), port) as first:
        seen = await publish(first.url, "k", "seen")
    url = f"http://127.0.0.1:{port}"
    stream = EventStream(url, ["k"], last_event_id=seen)
    async with contextlib.AsyncExitStack() as stack:
        second = contextlib.AsyncExitStack()
        stack.push_async_callback(second.aclose)
        await second.enter_async_context(serve_on_port(Hub(backend, **FAST), port))
        received = await stack.enter_async_context(consume(stream))
        await wait_until(lambda: stream.connects == 1, what="connected")
        await second.aclose()
        # that connection got nothing but `event: disconnect`
        assert received == []
        assert stream.last_event_id == seen
        async with run_server(Hub(backend, **FAST)) as elsewhere:
            missed = await publish(elsewhere.url, "k", "missed")
        async with serve_on_port(Hub(backend, **FAST), port) as again:
            await wait_until(lambda: len(received) == 1, what="missed event replayed")
            assert [(e.id, e.data) for e in received] == [(missed, '"missed"')]
            assert stream.last_event_id == missed
            await wait_until(lambda: again.hub.statistics().subscribers == 1)


async def test_invalid_topic_raises_without_retrying(server: RunningServer) -> None:
    requests: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        requests.append(request)

    async with httpx.AsyncClient(event_hooks={"request": [count]}) as http:
        stream = EventStream(server.url, ["no spaces allowed"], client=http)
        with pytest.raises(StreamRefusedError) as caught:
            async with asyncio.timeout(5):
                async for _ in stream:
                    pass
    assert caught.value.status_code == 400
    assert "topic" in caught.value.detail
    assert len(requests) == 1
    assert stream.connects == 0


async def test_reconnect_false_ends_after_one_connection(server: RunningServer) -> None:
    stream = EventStream(server.url, ["once"], reconnect=False)
    received: list[ServerEvent] = []

    async def run() -> None:
        async for event in stream:
            received.append(event)

    async with stream:
        task = asyncio.create_task(run())
        await wait_until(lambda: stream.connects == 1, what="connected")
        only = await publish(server.url, "once", "only")
        await wait_until(lambda: len(received) == 1)
        await server.hub.drain(grace=2)  # the server closes the stream
        await asyncio.wait_for(task, 5)  # iteration ends without reconnecting
    assert [(e.id, e.event) for e in received] == [(only, "message")]
    assert stream.connects == 1


class Script:
    """A fake SSE endpoint answering the queued responses in order, recording requests."""

    def __init__(self, *responses: Response) -> None:
        self.responses = list(responses)
        self.requests: list[Request] = []
        self.app = FastAPI()
        self.app.add_api_route("/events", self.endpoint)

    async def endpoint(self, request: Request) -> Response:
        self.requests.append(request)
        if not self.responses:
            return Response(status_code=500)
        return self.responses.pop(0)


def sse(body: str, *, content_type: str = "text/event-stream") -> Response:
    return Response(body.encode(), media_type=content_type)


async def test_retries_overload_and_errors_then_stops_on_204() -> None:
    script = Script(
        sse(": hi\nretry: 10\n\nid: 7\nevent: e\ndata: one\n\n"),
        Response(status_code=503, headers={"Retry-After": "0"}),
        Response(status_code=429, headers={"Retry-After": "0"}),
        Response(b"<html>", media_type="text/html"),  # a captive portal: retried
        sse("data: two\n\nevent: disconnect\ndata: {}\n\n"),  # the control event is hidden
        Response(status_code=204),
    )
    async with run_server(script.app) as fake, EventStream(fake.url, ["t1", "t2"]) as stream:
        async with asyncio.timeout(5):
            received = [event async for event in stream]
    assert [(e.id, e.event, e.data) for e in received] == [
        ("7", "e", "one"),
        ("7", "message", "two"),
    ]
    assert stream.connects == 2
    assert stream.retry_ms == 10
    assert len(script.requests) == 6
    assert [r.query_params.getlist("topic") for r in script.requests] == [["t1", "t2"]] * 6
    assert [r.headers.get("last-event-id") for r in script.requests] == [None] + ["7"] * 5
    assert all(r.headers["accept"] == "text/event-stream" for r in script.requests)


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_refusals_raise_at_once(status: int) -> None:
    body = json.dumps({"error": "nope", "detail": "go away"})
    script = Script(Response(body, status_code=status, media_type="application/json"))
    async with run_server(script.app) as fake, EventStream(fake.url, ["t"]) as stream:
        with pytest.raises(StreamRefusedError) as caught:
            async with asyncio.timeout(5):
                async for _ in stream:
                    pass
    assert (caught.value.status_code, caught.value.detail) == (
        status,
        f"server answered {status}: go away",
    )
    assert len(script.requests) == 1


async def test_without_reconnect_errors_are_raised_not_retried() -> None:
    script = Script(
        Response(status_code=503, headers={"Retry-After": "0"}),
        Response(b"<html>", media_type="text/html"),
    )
    async with run_server(script.app) as fake:
        async with EventStream(fake.url, ["t"], reconnect=False) as stream:
            with pytest.raises(StreamRefusedError) as caught:
                async for _ in stream:
                    pass
            assert caught.value.status_code == 503
        async with EventStream(fake.url, ["t"], reconnect=False) as stream:
            with pytest.raises(StreamProtocolError, match="text/html"):
                async for _ in stream:
                    pass
    assert len(script.requests) == 2


async def test_aclose_stops_an_iteration_running_in_another_task(server: RunningServer) -> None:
    stream = EventStream(server.url, ["idle"])
    received: list[ServerEvent] = []

    async def run() -> None:
        async for event in stream:
            received.append(event)

    task = asyncio.create_task(run())
    try:
        await wait_until(lambda: stream.connects == 1, what="connected")
        await stream.aclose()
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert received == []
    await wait_until(lambda: server.hub.statistics().subscribers == 0, what="released")


async def test_publish_returns_the_id_and_raises_on_refusal(server: RunningServer) -> None:
    async with httpx.AsyncClient() as http:
        first = await publish(server.url, "pub", {"n": 1}, client=http)
        second = await publish(server.url, "pub", raw_data="plain\ntext", event="note", client=http)
    assert first.isdigit() and int(second) > int(first)
    with pytest.raises(StreamRefusedError) as caught:
        await publish(server.url, "bad topic?", 1)
    assert caught.value.status_code == 400
    assert "topic" in caught.value.detail
    with pytest.raises(StreamRefusedError) as caught:
        await publish(server.url, "pub", 1, event="two\nlines")
    assert caught.value.status_code == 400
    with pytest.raises(ValueError, match="not both"):
        await publish(server.url, "pub", 1, raw_data="x")
    # nothing of the refused publishes was stored
    assert server.hub.statistics().head_id == int(second)
