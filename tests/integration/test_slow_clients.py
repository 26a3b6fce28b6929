"""Slow and stalled subscribers against a real uvicorn: write timeouts, the slow-client
policies (``disconnect`` and ``latest``), the maximum stream lifetime, and isolation
(one client that never reads must not hold up the others)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from ssehub import Event, Hub
from ssehub._server import HubHttpToolsProtocol
from ssehub._wire import ServerEvent

from ..helpers import RunningServer, SSEStream, open_stream, run_server, wait_until

SMALL_RCVBUF = 4096


def serve(hub: Hub, http: Any = HubHttpToolsProtocol) -> AbstractAsyncContextManager[RunningServer]:
    """Like ``helpers.run_server``, with a choice of uvicorn's HTTP protocol class."""
    return run_server(hub, http=http, log_level="critical")


@contextlib.asynccontextmanager
async def stalled_client(port: int, topic: str) -> AsyncIterator[socket.socket]:
    """A raw connection with a tiny receive buffer that asks for a stream and then does
    not read (until the test reads it explicitly)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # before connect, so the advertised TCP window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = (
            f"GET /events?topic={topic} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        yield sock
    finally:
        sock.close()


async def read_until_closed(sock: socket.socket, timeout: float) -> int:
    """Read ``sock`` until EOF or a reset; return the number of bytes read."""
    loop = asyncio.get_running_loop()
    total = 0
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 1 << 16)
            except ConnectionResetError:
                return total
            if not chunk:
                return total
            total += len(chunk)


def server_connections(running: RunningServer) -> dict[int, Any]:
    """uvicorn's open connections, by client port."""
    by_port: dict[int, Any] = {}
    for conn in list(running.server.server_state.connections):
        client = getattr(conn, "client", None)
        if client:
            by_port[client[1]] = conn
    return by_port


def write_paused(running: RunningServer, port: int) -> bool:
    conn = server_connections(running).get(port)
    flow = getattr(conn, "flow", None)
    return bool(flow is not None and flow.write_paused)


def metric(hub: Hub, name: str, label: str, value: str) -> float:
    text = hub.metrics.render()[0].decode()
    pattern = rf'^{name}\{{{label}="{value}"\}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    assert match is not None, f"{name}{{{label}={value!r}}} not in the metrics"
    return float(match.group(1))


async def collect_until(stream: SSEStream, sentinel: str, timeout: float) -> list[ServerEvent]:
    """Every event of ``stream`` before the first one named ``sentinel``."""
    events: list[ServerEvent] = []
    while True:
        event = await stream.next(timeout)
        if event.event == sentinel:
            return events
        events.append(event)


async def burst(hub: Hub, topic: str, count: int) -> list[Event]:
    """Publish ``count`` events so that they are appended in one group commit and handed
    to the channels in one go: all are enqueued before the appender task runs again."""
    return list(await asyncio.gather(*(hub.publish(topic, {"n": n}) for n in range(count))))


async def cancel(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def as_dict(event: ServerEvent) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(event.data)
    return data


# -- 1. stalled clients are cut -----------------------------------------------------------


@pytest.mark.parametrize("transport_extension", [True, False], ids=["hub-protocol", "plain"])
async def test_stalled_clients_are_cut_while_normal_clients_get_everything(
    transport_extension: bool,
) -> None:
    write_timeout = 0.5
    stalled, normal = 3, 2
    hub = Hub("memory://", write_timeout=write_timeout, heartbeat_interval=0, ring_size=100_000)
    http: Any = HubHttpToolsProtocol if transport_extension else "httptools"
    payload = "x" * (64 * 1024)
    async with serve(hub, http) as running, contextlib.AsyncExitStack() as stack:
        socks = [
            await stack.enter_async_context(stalled_client(running.port, "t"))
            for _ in range(stalled)
        ]
        stalled_ports = {sock.getsockname()[1] for sock in socks}
        streams = [
            await stack.enter_async_context(open_stream(running.url, ["t"])) for _ in range(normal)
        ]
        await wait_until(lambda: hub.statistics().streams == stalled + normal, 5, "all streams")
        readers = [asyncio.create_task(collect_until(s, "end", timeout=20)) for s in streams]
        stack.push_async_callback(cancel, *readers)  # if the test fails before they end

        published: list[Event] = []
        paused_at: dict[int, float] = {}
        cut_at: float | None = None
        deadline = time.monotonic() + 15
        while cut_at is None:
            assert len(published) < 1000 and time.monotonic() < deadline, (
                f"stalled streams not cut after {len(published)} events of 64 KiB: "
                f"{hub.statistics().streams} streams open"
            )
            published.append(await hub.publish("t", raw_data=f"{len(published)} {payload}"))
            now = time.monotonic()
            for port in stalled_ports - paused_at.keys():
                if write_paused(running, port):
                    paused_at[port] = now
            if hub.statistics().streams == normal:
                cut_at = now
            else:
                await asyncio.sleep(0.005)  # pacing, so the normal clients keep up

        # every stalled client filled its buffers first; it was cut within the write
        # timeout of that (plus scheduling slack on a loaded machine)
        assert paused_at.keys() == stalled_ports
        assert cut_at - max(paused_at.values()) < write_timeout + 1.5
        assert metric(hub, "ssehub_streams_closed_total", "reason", "stalled") == stalled

        await hub.publish("t", "bye", event="end")
        for reader in readers:
            received = await reader
            assert [e.id for e in received] == [e.event_id for e in published]
            assert [e.data for e in received] == [e.data for e in published]
        assert hub.statistics().streams == normal  # the normal clients were never cut

        if transport_extension:
            # aborted at once: uvicorn forgot the connections without waiting for the
            # client to read what was buffered
            await wait_until(
                lambda: not stalled_ports & server_connections(running).keys(),
                5,
                "stalled connections aborted",
            )
        for sock in socks:
            # whatever was still in flight, then EOF (or a reset): the connection is closed
            await read_until_closed(sock, timeout=10)


# -- 2. the disconnect policy ---------------------------------------------------------------


async def test_slow_subscriber_is_disconnected_and_resumes_exactly_once() -> None:
    hub = Hub("memory://", heartbeat_interval=0, ring_size=4)
    async with run_server(hub) as running:
        async with open_stream(running.url, ["t"]) as stream:
            await stream.read_until_raw(b"\n\n")
            before = [await hub.publish("t", {"before": n}) for n in range(3)]
            got = await stream.take(3)
            assert [e.id for e in got] == [e.event_id for e in before]

            missed = await burst(hub, "t", 50)  # overflows the ring of 4 at once

            rest = await stream.read_to_end(timeout=5)
            assert stream.ended
            assert [e.event for e in rest] == ["disconnect"], rest
            assert as_dict(rest[-1]) == {"reason": "slow"}
            assert rest[-1].retry is not None and rest[-1].retry > 0
            resume = stream.last_event_id
            assert resume == before[-1].event_id  # nothing of the burst was delivered
        assert metric(hub, "ssehub_streams_closed_total", "reason", "slow") == 1
        assert metric(hub, "ssehub_lagging_subscribers_total", "policy", "disconnect") == 1

        async with open_stream(running.url, ["t"], last_event_id=resume) as again:
            replayed = await again.take(len(missed))
            assert [e.id for e in replayed] == [e.event_id for e in missed]
            assert [as_dict(e) for e in replayed] == [{"n": n} for n in range(50)]
            live = await hub.publish("t", "live")
            after = await again.next()
            # no duplicate at the seam between replay and live
            assert (after.event, after.id) == ("message", live.event_id)
        await wait_until(lambda: hub.statistics().streams == 0, 5, "streams released")


# -- 3. the latest policy -------------------------------------------------------------------


async def expect_skip_to_latest(hub: Hub, stream: SSEStream, topic: str, newest: Event) -> None:
    reset = await stream.next()
    assert reset.event == "reset"
    data = as_dict(reset)
    assert data["reason"] == "lagged" and data["topic"] == topic
    assert data["current_id"].isdigit()
    following = await stream.next()
    assert (following.event, following.id) == ("message", newest.event_id)
    # the stream stays open and continues live
    live = await hub.publish(topic, "live")
    nxt = await stream.next()
    assert (nxt.event, nxt.id) == ("message", live.event_id)


async def test_latest_policy_skips_to_the_newest_event_and_keeps_the_stream() -> None:
    hub = Hub("memory://", heartbeat_interval=0, ring_size=4, slow_policy="latest")
    async with run_server(hub) as running, open_stream(running.url, ["t"]) as stream:
        await stream.read_until_raw(b"\n\n")
        first = await hub.publish("t", "first")
        assert (await stream.next()).id == first.event_id
        events = await burst(hub, "t", 50)
        await expect_skip_to_latest(hub, stream, "t", events[-1])
        assert hub.statistics().streams == 1
        assert metric(hub, "ssehub_lagging_subscribers_total", "policy", "latest") == 1
        assert metric(hub, "ssehub_streams_closed_total", "reason", "slow") == 0


async def test_per_topic_latest_policy_while_another_topic_disconnects() -> None:
    hub = Hub("memory://", heartbeat_interval=0, ring_size=4, topic_policies={"prices.*": "latest"})
    async with (
        run_server(hub) as running,
        open_stream(running.url, ["prices.eur"]) as prices,
        open_stream(running.url, ["orders"]) as orders,
    ):
        await prices.read_until_raw(b"\n\n")
        await orders.read_until_raw(b"\n\n")
        both = await asyncio.gather(burst(hub, "prices.eur", 50), burst(hub, "orders", 50))
        prices_events, _ = both

        rest = await orders.read_to_end(timeout=5)
        assert [e.event for e in rest] == ["disconnect"]
        assert as_dict(rest[0]) == {"reason": "slow"} and rest[0].retry is not None

        await expect_skip_to_latest(hub, prices, "prices.eur", prices_events[-1])
        assert hub.statistics().streams == 1
        assert metric(hub, "ssehub_lagging_subscribers_total", "policy", "latest") == 1
        assert metric(hub, "ssehub_lagging_subscribers_total", "policy", "disconnect") == 1


# -- 4. maximum lifetime --------------------------------------------------------------------


async def test_streams_end_after_their_maximum_lifetime() -> None:
    max_lifetime = 0.5
    hub = Hub("memory://", heartbeat_interval=0, max_lifetime=max_lifetime)

    async def one(url: str) -> tuple[float, list[ServerEvent]]:
        started = time.monotonic()  # before the request: the server's timer starts later
        async with open_stream(url, ["t"]) as stream:
            events = await stream.read_to_end(timeout=5)
        return time.monotonic() - started, events

    async with run_server(hub) as running:
        results = await asyncio.gather(*(one(running.url) for _ in range(4)))
        for lifetime, events in results:
            assert [e.event for e in events] == ["disconnect"]
            assert as_dict(events[0]) == {"reason": "lifetime"}
            assert events[0].retry is not None
            # jittered to 80-100 % of max_lifetime; generous slack above for load
            assert 0.8 * max_lifetime <= lifetime <= max_lifetime + 1.0, lifetime
        assert metric(hub, "ssehub_streams_closed_total", "reason", "lifetime") == 4
        assert hub.statistics().streams == 0


# -- 5. a client that never reads does not slow the others ----------------------------------


async def test_a_client_that_never_reads_does_not_delay_the_others() -> None:
    hub = Hub("memory://", heartbeat_interval=0)  # default write timeout (30 s): never cut
    filler = "f" * (32 * 1024)
    async with (
        run_server(hub) as running,
        stalled_client(running.port, "t") as sock,
        open_stream(running.url, ["t"]) as stream,
        contextlib.AsyncExitStack() as stack,
    ):
        port = sock.getsockname()[1]
        await wait_until(lambda: hub.statistics().streams == 2, 5, "both streams open")
        await stream.read_until_raw(b"\n\n")
        reader = asyncio.create_task(collect_until(stream, "end", timeout=20))
        stack.push_async_callback(cancel, reader)

        # fill the slow client's buffers until its writes would wait
        for _ in range(500):
            if write_paused(running, port):
                break
            await hub.publish("t", raw_data=filler, event="filler")
            await asyncio.sleep(0.002)
        assert write_paused(running, port), "the slow client never stalled"

        started = time.monotonic()
        measured = [await hub.publish("t", {"n": n}) for n in range(100)]
        publish_time = time.monotonic() - started
        await hub.publish("t", "done", event="end")
        received = await asyncio.wait_for(reader, 5)
        arrival = time.time()
        elapsed = time.monotonic() - started

        got = [e for e in received if e.event == "message"]
        assert [e.id for e in got] == [e.event_id for e in measured]
        assert publish_time < 2, publish_time
        assert elapsed < 3, elapsed  # all 100 arrived within a couple of seconds
        assert arrival - measured[0].time < 3
        # the slow client is still connected, just behind
        assert hub.statistics().streams == 2 and write_paused(running, port)
