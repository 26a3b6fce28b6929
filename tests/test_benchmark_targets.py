"""The benchmark comparison targets (benchmarks/naive_app.py, benchmarks/floor_server.py)
speak the hub's HTTP API subset: each is started as a real process on a free port and
driven over HTTP, the way the load generator drives them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import free_port, open_stream, wait_until

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TARGETS = ["naive_app", "floor_server"]
FIRST_BLOCK = b": ok\nretry: 3000\n\n"


@dataclass
class Target:
    name: str
    url: str
    port: int
    proc: asyncio.subprocess.Process


@pytest.fixture(params=TARGETS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    """The target script running as a process, once ``/healthz`` answers; on teardown it is
    killed, and it must not have written anything to stderr (no noise, no tracebacks)."""
    name: str = request.param
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCHMARKS / f"{name}.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    stdout = stderr = b""
    try:
        deadline = time.monotonic() + 10
        async with httpx.AsyncClient(timeout=1) as http:
            while True:
                if proc.returncode is not None:
                    _, err = await proc.communicate()
                    raise AssertionError(f"{name} exited with {proc.returncode}: {err.decode()}")
                with contextlib.suppress(httpx.TransportError):
                    response = await http.get(f"{url}/healthz")
                    if response.status_code == 200:
                        assert response.json() == {"status": "ok"}
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} did not answer /healthz within 10 s")
                await asyncio.sleep(0.02)
        yield Target(name, url, port, proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        with contextlib.suppress(TimeoutError):
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 5)
    assert (stdout, stderr) == (b"", b""), f"{name} was noisy"


async def subscribers(http: httpx.AsyncClient, url: str) -> int:
    response = await http.get(f"{url}/health/stream-capacity")
    assert response.status_code == 200
    count: int = response.json()["subscribers"]
    return count


async def test_every_subscriber_gets_every_event_in_order(target: Target) -> None:
    url = target.url
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=5))
        streams = [
            await stack.enter_async_context(open_stream(url, topics))
            for topics in (["t"], ["t"], ["other", "t"])
        ]
        for stream in streams:
            assert stream.response.status_code == 200
            headers = stream.response.headers
            assert headers["content-type"] == "text/event-stream; charset=utf-8"
            assert headers["cache-control"].startswith("no-cache")
            assert headers["x-accel-buffering"] == "no"
            # the first block is what tells a client (and the load generator) it is subscribed
            await stream.read_until_raw(FIRST_BLOCK)
            assert stream.raw.startswith(FIRST_BLOCK)
        assert await subscribers(http, url) == 3

        payloads: list[tuple[Any, str | None]] = [
            ({"n": 0, "text": "héllo"}, None),
            ([1, 2, {"deep": None}], "tick"),
            ("plain string", None),
            (42, "number"),
            (None, None),
        ]
        ids: list[str] = []
        for data, event in payloads:
            body: dict[str, Any] = {"data": data}
            if event is not None:
                body["event"] = event
            response = await http.post(f"{url}/topics/t/events", json=body)
            assert response.status_code == 201
            answer = response.json()
            assert set(answer) == {"id", "topic"}
            assert answer["topic"] == "t"
            assert isinstance(answer["id"], str) and answer["id"].isdigit()
            ids.append(answer["id"])
        assert [int(i) for i in ids] == sorted({int(i) for i in ids})  # strictly increasing

        for stream in streams:
            received = await stream.take(5)
            assert [e.id for e in received] == ids
            assert [e.data for e in received] == [
                json.dumps(data, separators=(",", ":")) for data, _ in payloads
            ]
            assert [e.event for e in received] == [event or "message" for _, event in payloads]
        # one event as raw bytes on the wire (after the chunked framing is undone)
        assert f'id: {ids[1]}\nevent: tick\ndata: [1,2,{{"deep":null}}]\n\n'.encode() in (
            streams[0].raw
        )


async def test_a_subscriber_that_disconnects_is_removed(target: Target) -> None:
    url = target.url
    async with httpx.AsyncClient(timeout=5) as http:

        def count_is(expected: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await subscribers(http, url) == expected

            return check

        async with open_stream(url, ["t"]) as staying:
            await staying.read_until_raw(FIRST_BLOCK)
            async with open_stream(url, ["t"]) as leaving:
                await leaving.read_until_raw(FIRST_BLOCK)
                assert await subscribers(http, url) == 2
            # the naive app notices at once (Starlette's disconnect listener), the floor in
            # connection_lost; publishing to the topic keeps working either way
            response = await http.post(f"{url}/topics/t/events", json={"data": "after"})
            assert response.status_code == 201
            event_id = response.json()["id"]
            await wait_until(count_is(1), 5, "the closed stream is removed")
            event = await staying.next()
            assert (event.id, event.data) == (event_id, '"after"')
        await wait_until(count_is(0), 5, "the last stream is removed")
        response = await http.post(f"{url}/topics/t/events", json={"data": "nobody"})
        assert response.status_code == 201
        assert target.proc.returncode is None


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    answer: dict[str, Any] = json.loads(body)
    return status, answer


def post_request(topic: str, data: Any) -> bytes:
    body = json.dumps({"data": data}).encode()
    return (
        f"POST /topics/{topic}/events HTTP/1.1\r\nHost: bench\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_publisher_keep_alive_with_split_and_pipelined_requests(target: Target) -> None:
    async with open_stream(target.url, ["k"]) as stream:
        await stream.read_until_raw(FIRST_BLOCK)
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        try:
            # one request dribbled in small pieces: head split mid-line, body split
            request = post_request("k", {"part": 1})
            for start in range(0, len(request), 7):
                writer.write(request[start : start + 7])
                await writer.drain()
                await asyncio.sleep(0.002)
            assert await read_response(reader) == (201, {"id": "1", "topic": "k"})
            # two requests in one write on the same connection
            writer.write(post_request("k", {"part": 2}) + post_request("k", {"part": 3}))
            await writer.drain()
            assert await read_response(reader) == (201, {"id": "2", "topic": "k"})
            assert await read_response(reader) == (201, {"id": "3", "topic": "k"})
        finally:
            writer.close()
            await writer.wait_closed()
        received = await stream.take(3)
        assert [(e.id, e.data) for e in received] == [
            ("1", '{"part":1}'),
            ("2", '{"part":2}'),
            ("3", '{"part":3}'),
        ]
