"""HTTP details: CORS, compression middleware, Idempotency-Key, hop-by-hop headers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ssehub import BackendUnavailableError, Hub, create_app

from ..helpers import RunningServer, open_stream, run_server, wait_until

APP_ORIGIN = "https://app.example"
EVIL_ORIGIN = "https://evil.example"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        yield client


@contextlib.asynccontextmanager
async def cors_server(origins: Sequence[str]) -> AsyncIterator[RunningServer]:
    async with run_server(create_app(Hub(heartbeat_interval=0), cors_origins=origins)) as server:
        yield server


def cors_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("access-control-")}


async def preflight(
    http: httpx.AsyncClient, server: RunningServer, origin: str, method: str = "GET"
) -> httpx.Response:
    return await http.options(
        f"{server.url}/events",
        headers={
            "origin": origin,
            "access-control-request-method": method,
            "access-control-request-headers": "last-event-id",
        },
    )


async def stream_headers(server: RunningServer, origin: str) -> httpx.Headers:
    async with open_stream(server.url, ["t"], headers={"origin": origin}) as stream:
        assert stream.response.status_code == 200
        await stream.read_until_raw(b"\n\n")
        return stream.response.headers


async def test_cors_listed_origin_with_credentials(http: httpx.AsyncClient) -> None:
    async with cors_server([APP_ORIGIN]) as server:
        response = await preflight(http, server, APP_ORIGIN)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == APP_ORIGIN
        assert response.headers["access-control-allow-credentials"] == "true"
        allowed = [
            h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")
        ]
        assert "last-event-id" in allowed
        assert "GET" in response.headers["access-control-allow-methods"]

        # a publish from the browser may send Idempotency-Key
        response = await http.options(
            f"{server.url}/topics/t/events",
            headers={
                "origin": APP_ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type, idempotency-key",
            },
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == APP_ORIGIN

        headers = await stream_headers(server, APP_ORIGIN)
        assert headers["access-control-allow-origin"] == APP_ORIGIN
        assert headers["access-control-allow-credentials"] == "true"
        assert "origin" in headers["vary"].lower()
        assert headers["content-type"] == "text/event-stream; charset=utf-8"


async def test_cors_unlisted_origin_is_never_reflected(http: httpx.AsyncClient) -> None:
    async with cors_server([APP_ORIGIN]) as server:
        response = await preflight(http, server, EVIL_ORIGIN)
        assert response.status_code >= 400
        assert "access-control-allow-origin" not in response.headers

        headers = await stream_headers(server, EVIL_ORIGIN)
        assert "access-control-allow-origin" not in headers

        response = await http.get(
            f"{server.url}/health/stream-capacity", headers={"origin": EVIL_ORIGIN}
        )
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers


async def test_cors_wildcard_never_allows_credentials(http: httpx.AsyncClient) -> None:
    async with cors_server(["*", APP_ORIGIN]) as server:
        for origin in (APP_ORIGIN, EVIL_ORIGIN):
            response = await preflight(http, server, origin)
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == "*"
            assert "access-control-allow-credentials" not in response.headers

            headers = await stream_headers(server, origin)
            assert headers["access-control-allow-origin"] == "*"
            assert "access-control-allow-credentials" not in headers

            # a cookie does not turn the wildcard into a reflected origin
            response = await http.get(
                f"{server.url}/healthz", headers={"origin": origin, "cookie": "session=1"}
            )
            assert response.headers["access-control-allow-origin"] == "*"
            assert "access-control-allow-credentials" not in response.headers


async def test_no_cors_headers_without_origins(http: httpx.AsyncClient) -> None:
    async with cors_server([]) as server:
        response = await preflight(http, server, APP_ORIGIN)
        assert cors_headers(response.headers) == {}
        assert cors_headers(await stream_headers(server, APP_ORIGIN)) == {}


async def test_gzip_middleware_never_buffers_a_stream(http: httpx.AsyncClient) -> None:
    hub = Hub(heartbeat_interval=0)
    app = FastAPI(lifespan=hub.lifespan)
    app.state.hub = hub
    app.include_router(hub.router)
    app.add_middleware(GZipMiddleware, minimum_size=1)
    async with run_server(app) as server:
        # the middleware is active: a plain response is compressed
        await hub.publish("t", "seed")
        response = await http.get(f"{server.url}/metrics", headers={"accept-encoding": "gzip"})
        assert response.status_code == 200
        assert response.headers["content-encoding"] == "gzip"
        assert b"ssehub_events_published_total 1.0" in response.content

        async with open_stream(server.url, ["t"], headers={"accept-encoding": "gzip"}) as stream:
            assert stream.response.status_code == 200
            assert "content-encoding" not in stream.response.headers
            await stream.read_until_raw(b"\n\n", timeout=2)
            assert stream.raw.startswith(b": ssehub\n")  # raw bytes: not compressed
            for i in range(4):
                event_id = (await hub.publish("t", {"n": i})).event_id
                event = await stream.next(timeout=2)  # arrives before the next publish
                assert (event.id, event.data) == (event_id, f'{{"n":{i}}}')
            assert b'data: {"n":3}' in stream.raw


# -- Idempotency-Key ------------------------------------------------------------------


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    async with Hub(heartbeat_interval=0, idempotency_window=0.2) as hub:
        yield hub


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        yield client


async def post(
    client: httpx.AsyncClient, topic: str, key: str | None, data: Any = "x", **fields: Any
) -> httpx.Response:
    headers = {} if key is None else {"idempotency-key": key}
    return await client.post(
        f"/topics/{topic}/events", json={"data": data, **fields}, headers=headers
    )


async def stored(hub: Hub, topic: str) -> list[str]:
    events = await hub.event_log.read_after([topic], hub.event_log.origin(), limit=100)
    return [e.event_id for e in events]


async def test_idempotency_key_stores_once(client: httpx.AsyncClient, hub: Hub) -> None:
    first = await post(client, "a", "key-1", {"n": 1})
    second = await post(client, "a", "key-1", {"n": 1})
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert await stored(hub, "a") == [first.json()["id"]]

    other_key = await post(client, "a", "key-2", {"n": 1})
    assert other_key.status_code == 201
    assert other_key.json()["id"] != first.json()["id"]

    other_topic = await post(client, "b", "key-1", {"n": 1})
    assert other_topic.status_code == 201
    assert other_topic.json() == {"id": other_topic.json()["id"], "topic": "b"}
    assert other_topic.json()["id"] not in (first.json()["id"], other_key.json()["id"])

    no_key = [await post(client, "a", None) for _ in range(2)]
    assert no_key[0].json()["id"] != no_key[1].json()["id"]
    assert await stored(hub, "a") == [
        first.json()["id"],
        other_key.json()["id"],
        no_key[0].json()["id"],
        no_key[1].json()["id"],
    ]
    assert await stored(hub, "b") == [other_topic.json()["id"]]


async def test_idempotency_key_expires_after_the_window(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    loop = asyncio.get_running_loop()
    first = (await post(client, "a", "k")).json()["id"]
    stored_at = loop.time()
    assert (await post(client, "a", "k")).json()["id"] == first
    expired = asyncio.Event()
    loop.call_at(stored_at + hub.config.idempotency_window + 0.01, expired.set)
    await asyncio.wait_for(expired.wait(), 5)
    again = (await post(client, "a", "k")).json()["id"]
    assert again != first
    assert await stored(hub, "a") == [first, again]
    # and the new event is remembered under the key for a new window
    assert (await post(client, "a", "k")).json()["id"] == again


async def test_concurrent_duplicates_store_one_event(
    client: httpx.AsyncClient, hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hold the first append in the log until all five requests reached the hub, so the
    # duplicates arrive while the first publish is still in flight
    calls = 0
    hub_append = hub.append
    log_append = hub.event_log.append

    async def counting_append(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await hub_append(*args, **kwargs)

    async def gated_append(*args: Any, **kwargs: Any) -> Any:
        await wait_until(lambda: calls == 5, what="all five publishes in flight")
        return await log_append(*args, **kwargs)

    monkeypatch.setattr(hub, "append", counting_append)
    monkeypatch.setattr(hub.event_log, "append", gated_append)
    responses = await asyncio.gather(*(post(client, "a", "same", i) for i in range(5)))
    assert calls == 5
    assert {r.status_code for r in responses} == {201}
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert await stored(hub, "a") == list(ids)


@pytest.mark.parametrize("key", ["", "k" * 256])
async def test_invalid_idempotency_key_is_a_json_400(
    client: httpx.AsyncClient, hub: Hub, key: str
) -> None:
    response = await post(client, "a", key)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "Idempotency-Key" in response.json()["detail"]
    assert await stored(hub, "a") == []
    assert (await post(client, "a", "k" * 255)).status_code == 201


async def test_a_refused_publish_does_not_poison_its_key(
    client: httpx.AsyncClient, hub: Hub
) -> None:
    response = await post(client, "a", "k", event="bad\nname")
    assert response.status_code == 400
    assert await stored(hub, "a") == []
    response = await post(client, "a", "k", event="good")
    assert response.status_code == 201
    assert await stored(hub, "a") == [response.json()["id"]]


async def test_a_failed_append_does_not_poison_its_key(
    client: httpx.AsyncClient, hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    append = hub.event_log.append
    failures = 1

    async def flaky_append(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise BackendUnavailableError("the disk is on fire")
        return await append(*args, **kwargs)

    monkeypatch.setattr(hub.event_log, "append", flaky_append)
    response = await post(client, "a", "k")
    assert response.status_code == 503
    assert response.json()["error"] == "backend_unavailable"
    assert await stored(hub, "a") == []
    response = await post(client, "a", "k")
    assert response.status_code == 201
    assert await stored(hub, "a") == [response.json()["id"]]
    assert (await post(client, "a", "k")).json() == response.json()


# -- hop-by-hop headers ---------------------------------------------------------------

HOP_BY_HOP = (
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
)


class RecordHeaders:
    """ASGI middleware keeping the headers the app itself sends, before the server."""

    def __init__(self, app: ASGIApp, sink: list[list[tuple[bytes, bytes]]]) -> None:
        self.app = app
        self.sink = sink

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.sink.append(list(message.get("headers", [])))
            await send(message)

        await self.app(scope, receive, recording_send)


async def raw_response_head(server: RunningServer, target: str) -> tuple[str, dict[str, str]]:
    """Send a bare HTTP/1.1 request; return the status line and the response headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    status, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"duplicate header {name}"
        headers[name.lower()] = value.strip()
    return status, headers


async def test_streams_carry_no_hop_by_hop_headers() -> None:
    sink: list[list[tuple[bytes, bytes]]] = []
    hub = Hub(heartbeat_interval=0, max_streams=1)
    app = create_app(hub)
    app.add_middleware(RecordHeaders, sink=sink)
    async with run_server(app) as server, open_stream(server.url, ["t"]) as stream:
        await stream.read_until_raw(b"\n\n")
        # what the hub sends: no hop-by-hop header, no length (the body never ends)
        names = [name.decode().lower() for name, _ in sink[-1]]
        assert not set(names) & set(HOP_BY_HOP)
        assert "content-length" not in names
        assert sorted(names) == ["cache-control", "content-type", "x-accel-buffering"]

        # the overload refusal (a complete body) has none either
        status, headers = await raw_response_head(server, "/events?topic=t")
        assert status == "HTTP/1.1 200 OK"
        names = [name.decode().lower() for name, _ in sink[-1]]
        assert not set(names) & set(HOP_BY_HOP)
        assert "connection" not in headers  # uvicorn keeps HTTP/1.1 defaults implicit
        assert headers["content-length"].isdigit()

    # on the wire, uvicorn frames the endless body with chunked encoding and adds
    # nothing else hop-by-hop: keep-alive is HTTP/1.1's default, so no Connection header
    async with run_server(Hub(heartbeat_interval=0)) as server:
        status, headers = await raw_response_head(server, "/events?topic=t")
        assert status == "HTTP/1.1 200 OK"
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        assert headers["cache-control"] == "no-cache, no-transform"
        assert headers["x-accel-buffering"] == "no"
        assert headers.get("transfer-encoding") == "chunked"
        assert not {"connection", "keep-alive", "upgrade", "content-length"} & set(headers)
