"""Stream limits, the capacity endpoint and the metrics, against a real uvicorn."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ssehub import Hub

from ..helpers import RunningServer, SSEStream, open_stream, publish, run_server, wait_until

OVERLOAD_RETRY_MS = 4000
JSON_ACCEPT = {"accept": "application/json"}
Query = list[tuple[str, str | int | float | bool | None]]


def stream_client(local_address: str | None = None) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=local_address)
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(10.0, read=None))


@contextlib.asynccontextmanager
async def open_streams(
    url: str, n: int, client: httpx.AsyncClient, topic: str = "t"
) -> AsyncIterator[list[SSEStream]]:
    """Open ``n`` live streams (each has sent its first bytes) on one client."""
    async with contextlib.AsyncExitStack() as stack:
        streams = []
        for _ in range(n):
            stream = await stack.enter_async_context(open_stream(url, [topic], client=client))
            assert stream.response.status_code == 200
            await stream.read_until_raw(b"\n\n", timeout=5)
            assert b"overloaded" not in stream.raw
            streams.append(stream)
        yield streams


async def assert_sse_refusal(url: str, client: httpx.AsyncClient, reason: str) -> None:
    """A request accepting text/event-stream is refused with 200, retry:, overloaded, end."""
    async with open_stream(url, ["t"], client=client) as stream:
        response = stream.response
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await stream.read_to_end(timeout=5)  # the body ends by itself
    assert stream.ended
    assert [event.event for event in events] == ["overloaded"]
    event = events[0]
    assert event.retry is not None
    assert OVERLOAD_RETRY_MS / 2 <= event.retry <= OVERLOAD_RETRY_MS
    body = json.loads(event.data)
    assert body["reason"] == reason
    assert isinstance(body["detail"], str) and body["detail"]


async def assert_json_refusal(
    url: str, client: httpx.AsyncClient, status: int, error: str, headers: dict[str, str]
) -> None:
    response = await client.get(f"{url}/events", params={"topic": "t"}, headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) == round(OVERLOAD_RETRY_MS / 1000)
    body = response.json()
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]


async def test_max_streams_refuses_by_accept_header_and_frees_a_slot() -> None:
    hub = Hub(max_streams=3, overload_retry_ms=OVERLOAD_RETRY_MS, heartbeat_interval=0)
    async with run_server(hub) as server, stream_client() as client:
        async with contextlib.AsyncExitStack() as stack:
            streams = []
            for _ in range(3):
                stream = await stack.enter_async_context(
                    open_stream(server.url, ["t"], client=client)
                )
                await stream.read_until_raw(b"\n\n")
                streams.append(stream)
            assert hub.capacity()["subscribers"] == 3

            await assert_sse_refusal(server.url, client, "over_capacity")
            await assert_json_refusal(server.url, client, 503, "over_capacity", JSON_ACCEPT)
            await assert_json_refusal(server.url, client, 503, "over_capacity", {})
            assert hub.capacity()["subscribers"] == 3

            # the open streams are untouched by the refusals
            event_id = await publish(client, server.url, "t", "still here")
            for stream in streams:
                assert (await stream.next()).id == event_id

            # one closes: a slot frees up and a new stream is accepted
            await stack.aclose()
        await wait_until(lambda: hub.capacity()["subscribers"] == 0, what="streams released")
        async with open_streams(server.url, 3, client):
            assert hub.capacity()["subscribers"] == 3


async def test_a_closed_stream_frees_its_slot() -> None:
    hub = Hub(max_streams=3, overload_retry_ms=OVERLOAD_RETRY_MS, heartbeat_interval=0)
    async with run_server(hub) as server, stream_client() as client:
        async with open_streams(server.url, 2, client):
            async with open_stream(server.url, ["t"], client=client) as third:
                await third.read_until_raw(b"\n\n")
                await assert_json_refusal(server.url, client, 503, "over_capacity", {})
            await wait_until(lambda: hub.capacity()["subscribers"] == 2, what="slot freed")
            async with open_stream(server.url, ["t"], client=client) as again:
                assert again.response.status_code == 200
                await again.read_until_raw(b"\n\n")
                assert b"overloaded" not in again.raw
                assert "content-length" not in again.response.headers  # a live stream
                assert hub.capacity()["subscribers"] == 3
                event_id = await publish(client, server.url, "t", 1)
                assert (await again.next()).id == event_id


async def test_max_streams_per_ip() -> None:
    hub = Hub(max_streams_per_ip=2, overload_retry_ms=OVERLOAD_RETRY_MS, heartbeat_interval=0)
    async with (
        run_server(hub) as server,
        stream_client() as client,
        stream_client(local_address="127.0.0.2") as other,
    ):
        async with open_streams(server.url, 2, client):
            await assert_json_refusal(server.url, client, 429, "over_ip_limit", JSON_ACCEPT)
            await assert_sse_refusal(server.url, client, "over_ip_limit")
            # another source address is still accepted, up to its own limit
            async with open_streams(server.url, 2, other):
                assert hub.capacity()["subscribers"] == 4
                await assert_json_refusal(server.url, other, 429, "over_ip_limit", {})
        await wait_until(lambda: hub.capacity()["subscribers"] == 0, what="streams released")
        # the per-address count went back down
        async with open_streams(server.url, 2, client):
            pass


async def test_too_many_topics_is_a_json_400() -> None:
    hub = Hub(max_topics=3, heartbeat_interval=0)
    async with run_server(hub) as server, stream_client() as client:
        for path in ("/events", "/poll"):
            params: Query = [("topic", f"t{i}") for i in range(4)]
            params.append(("timeout", "0"))
            response = await client.get(server.url + path, params=params, headers=JSON_ACCEPT)
            assert response.status_code == 400, path
            assert response.json()["error"] == "invalid_request"
            assert "limit is 3" in response.json()["detail"]
            # an EventSource gets the same 400: it is a client error, not overload
            response = await client.get(
                server.url + path, params=params, headers={"accept": "text/event-stream"}
            )
            assert response.status_code == 400, path
        # at the limit is fine
        at_limit: Query = [("topic", f"t{i}") for i in range(3)]
        at_limit.append(("timeout", "0"))
        response = await client.get(f"{server.url}/poll", params=at_limit)
        assert response.status_code == 200
        assert hub.statistics().subscribers == 0


async def get_capacity(client: httpx.AsyncClient, server: RunningServer) -> dict[str, object]:
    response = await client.get(f"{server.url}/health/stream-capacity")
    assert response.status_code == 200
    body: dict[str, object] = response.json()
    return body


async def test_capacity_endpoint_follows_live_counts_and_drain() -> None:
    hub = Hub(max_streams=10, poll_threshold=0.5, poll_interval_ms=1500, heartbeat_interval=0)
    async with run_server(hub) as server, stream_client() as client:
        assert await get_capacity(client, server) == {
            "subscribers": 0,
            "max_subscribers": 10,
            "utilization": 0.0,
            "accepting": True,
            "recommended_transport": "sse",
            "poll_interval_ms": 1500,
        }
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(open_streams(server.url, 4, client))
            body = await get_capacity(client, server)
            assert (body["subscribers"], body["utilization"]) == (4, 0.4)
            assert body["accepting"] is True
            assert body["recommended_transport"] == "sse"

            await stack.enter_async_context(open_streams(server.url, 1, client))
            body = await get_capacity(client, server)
            assert (body["subscribers"], body["utilization"]) == (5, 0.5)
            assert body["accepting"] is True
            assert body["recommended_transport"] == "poll"  # at the threshold

            await stack.enter_async_context(open_streams(server.url, 5, client))
            body = await get_capacity(client, server)
            assert (body["subscribers"], body["utilization"]) == (10, 1.0)
            assert body["accepting"] is False
            assert body["recommended_transport"] == "poll"
            assert body["max_subscribers"] == 10

            # long-polls are not streams: they do not count
            response = await client.get(f"{server.url}/poll", params={"topic": "t", "timeout": "0"})
            assert response.status_code == 200

            response = await client.get(f"{server.url}/readyz")
            assert response.status_code == 200
            await hub.drain(grace=5)
            body = await get_capacity(client, server)
            assert body["subscribers"] == 0
            assert body["accepting"] is False
            assert body["recommended_transport"] == "poll"
            response = await client.get(f"{server.url}/readyz")
            assert response.status_code == 503
            assert response.json()["error"] == "unavailable"
            assert "retry-after" in response.headers


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def get_metrics(
    client: httpx.AsyncClient, server: RunningServer
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get(f"{server.url}/metrics")
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain; version=")
    assert "version=0.0.4" in content_type
    return scrape(response.text)


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_count_what_happened() -> None:
    hub = Hub(heartbeat_interval=0)
    async with run_server(hub) as server, stream_client() as client:
        samples = await get_metrics(client, server)
        assert value(samples, "ssehub_events_published_total") == 0
        assert value(samples, "ssehub_streams_opened_total") == 0
        assert value(samples, "ssehub_open_streams") == 0

        # a live stream receives three events
        async with open_stream(server.url, ["m"], client=client) as live:
            await live.read_until_raw(b"\n\n")
            ids = [await publish(client, server.url, "m", i) for i in range(3)]
            assert [e.id for e in await live.take(3)] == ids
            samples = await get_metrics(client, server)
            assert value(samples, "ssehub_open_streams") == 1
        await wait_until(lambda: hub.capacity()["subscribers"] == 0)

        # a resume with nothing else on the topic replays the last two from the log
        async with open_stream(server.url, ["m"], client=client, last_event_id=ids[0]) as replay:
            assert [e.id for e in await replay.take(2)] == ids[1:]

            # a malformed resume point and a future one get resets
            for bad in ("not-an-id", str(int(ids[-1]) + 1000)):
                async with open_stream(
                    server.url, ["m"], client=client, last_event_id=bad
                ) as reset:
                    assert (await reset.next()).event == "reset"
            await wait_until(lambda: hub.capacity()["subscribers"] == 1)

            async def closed_as_client_gone() -> bool:
                samples = await get_metrics(client, server)
                return value(samples, "ssehub_streams_closed_total", reason="client_gone") == 3

            await wait_until(closed_as_client_gone, what="closes counted")
            samples = await get_metrics(client, server)
            assert value(samples, "ssehub_events_published_total") == 3
            assert value(samples, "ssehub_streams_opened_total") == 4
            assert value(samples, "ssehub_streams_closed_total", reason="shutdown") == 0
            # every event written: 3 live and 2 replayed (the replay is also counted apart)
            assert value(samples, "ssehub_deliveries_total") == 5
            assert value(samples, "ssehub_delivered_bytes_total") > 0
            assert value(samples, "ssehub_replayed_events_total") == 2
            assert value(samples, "ssehub_resets_total", reason="malformed") == 1
            assert value(samples, "ssehub_resets_total", reason="future") == 1
            assert value(samples, "ssehub_open_streams") == 1
            assert value(samples, "ssehub_log_events") == 3
            assert value(samples, "ssehub_head_id") == int(ids[-1])
            assert value(samples, "ssehub_max_streams") == hub.config.max_streams
            assert value(samples, "ssehub_draining") == 0
            assert value(samples, "ssehub_publish_to_write_seconds_count") > 0
            assert value(samples, "ssehub_publish_to_write_seconds_bucket", le="+Inf") == value(
                samples, "ssehub_publish_to_write_seconds_count"
            )

            # draining closes the replayed stream with reason shutdown
            await hub.drain(grace=5)
            events = await replay.read_to_end()
            assert [e.event for e in events] == ["disconnect"]
            samples = await get_metrics(client, server)
            assert value(samples, "ssehub_streams_closed_total", reason="shutdown") == 1
            assert value(samples, "ssehub_streams_closed_total", reason="client_gone") == 3
            assert value(samples, "ssehub_open_streams") == 0
            assert value(samples, "ssehub_draining") == 1
            assert value(samples, "ssehub_streams_refused_total", reason="over_capacity") == 0


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream"])
async def test_refusals_are_counted(accept: str) -> None:
    hub = Hub(max_streams=1, overload_retry_ms=OVERLOAD_RETRY_MS, heartbeat_interval=0)
    async with run_server(hub) as server, stream_client() as client:
        async with open_streams(server.url, 1, client):
            response = await client.get(
                f"{server.url}/events", params={"topic": "t"}, headers={"accept": accept}
            )
            assert response.status_code == (503 if accept == "application/json" else 200)
            samples = await get_metrics(client, server)
            assert value(samples, "ssehub_streams_refused_total", reason="over_capacity") == 1
            # a refusal is not an opened stream
            assert value(samples, "ssehub_streams_opened_total") == 1


async def test_streams_refused_while_draining() -> None:
    hub = Hub(shutdown_retry_ms=2000, heartbeat_interval=0)
    async with run_server(hub) as server, stream_client() as client:
        await hub.drain(grace=5)
        async with open_stream(server.url, ["t"], client=client) as stream:
            assert stream.response.status_code == 200
            events = await stream.read_to_end()
        assert [e.event for e in events] == ["disconnect"]
        assert json.loads(events[0].data) == {"reason": "shutdown"}
        assert events[0].retry is not None and 400 <= events[0].retry <= 2000
        response = await client.get(f"{server.url}/events", params={"topic": "t"})
        assert response.status_code == 503
        assert response.json()["error"] == "unavailable"
        assert response.headers["retry-after"].isdigit()
        samples = await get_metrics(client, server)
        assert value(samples, "ssehub_streams_refused_total", reason="draining") == 2
        assert value(samples, "ssehub_streams_opened_total") == 0
