"""Several hubs on one Redis: shared ids, live fan-out across nodes, resume anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio

from ssehub import Hub

from ..helpers import RunningServer, open_stream, publish, run_server, wait_until


@contextlib.asynccontextmanager
async def nodes(redis_url: str, prefix: str, count: int = 2) -> AsyncIterator[list[RunningServer]]:
    """``count`` hubs, each on its own uvicorn, sharing one Redis key prefix."""
    backend = f"{redis_url}?prefix={prefix}"
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(run_server(Hub(backend, heartbeat_interval=0)))
            for _ in range(count)
        ]
        yield servers


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def test_publish_on_any_node_reaches_every_node_in_one_order(
    redis_url: str, redis_prefix: str, http: httpx.AsyncClient
) -> None:
    async with nodes(redis_url, redis_prefix) as (a, b):
        async with open_stream(a.url, ["x", "y"]) as on_a, open_stream(b.url, ["x", "y"]) as on_b:
            await on_a.read_until_raw(b"\n\n")
            await on_b.read_until_raw(b"\n\n")
            ids = []
            for i in range(10):  # sequential: alternate nodes and topics
                ids.append(await publish(http, (a, b)[i % 2].url, "xy"[i // 2 % 2], i))
            # and concurrent, from both nodes at once
            ids += await asyncio.gather(
                *(publish(http, (a, b)[i % 2].url, "xy"[i % 2], i) for i in range(10, 40))
            )
            got_a = [(e.id, e.data) for e in await on_a.take(40)]
            got_b = [(e.id, e.data) for e in await on_b.take(40)]
            assert got_a == got_b  # same events, same ids, same order on both nodes
            assert [int(i) for i, _ in got_a] == sorted(int(i) for i in ids)
            assert len(set(ids)) == 40


async def test_resume_on_another_node_misses_nothing(
    redis_url: str, redis_prefix: str, http: httpx.AsyncClient
) -> None:
    async with nodes(redis_url, redis_prefix) as (a, b):
        async with open_stream(a.url, ["r"]) as stream:
            first = await publish(http, a.url, "r", "seen on a")
            assert (await stream.next()).id == first
            resume_from = stream.last_event_id
        missed = [await publish(http, (a, b)[i % 2].url, "r", i) for i in range(5)]
        async with open_stream(b.url, ["r"], last_event_id=resume_from) as stream:
            assert [e.id for e in await stream.take(5)] == missed
            live = await publish(http, a.url, "r", "live")
            assert (await stream.next()).id == live
            assert b"event: reset" not in stream.raw


async def test_an_id_just_acknowledged_elsewhere_is_not_from_the_future(
    redis_url: str, redis_prefix: str, http: httpx.AsyncClient
) -> None:
    """A client that got an id from node A and reconnects to B at once resumes there,
    even if B's backplane has not delivered that event yet."""
    async with nodes(redis_url, redis_prefix) as (a, b):
        for i in range(20):
            acknowledged = await publish(http, a.url, "f", i)
            async with open_stream(b.url, ["f"], last_event_id=acknowledged) as stream:
                following = await publish(http, a.url, "f", "next")
                event = await stream.next()
                assert (event.event, event.id) == ("message", following)


async def test_backplane_reconnect_fills_the_gap_from_the_streams(
    redis_url: str, redis_prefix: str, http: httpx.AsyncClient
) -> None:
    async with nodes(redis_url, redis_prefix) as (a, b):
        async with open_stream(b.url, ["g"]) as on_b:
            await on_b.read_until_raw(b"\n\n")
            before = [await publish(http, a.url, "g", i) for i in range(3)]
            assert [e.id for e in await on_b.take(3)] == before
            # cut every pub/sub connection: B's backplane misses what is published now
            admin = redis.asyncio.Redis.from_url(redis_url)
            try:
                backplane = b.hub._backplane
                assert backplane is not None
                await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                during = [await publish(http, a.url, "g", i) for i in range(3, 8)]
                await wait_until(lambda: backplane.connected, timeout=10, what="reconnected")
            finally:
                await admin.aclose()
            after = [await publish(http, a.url, "g", i) for i in range(8, 10)]
            got = [e.id for e in await on_b.take(7)]
            assert got == during + after


async def test_lost_history_resyncs_streams_instead_of_a_silent_gap(
    own_redis_url: str, redis_prefix: str, http: httpx.AsyncClient
) -> None:
    """If the log no longer holds what the backplane missed, the streams of those topics
    are told to reconnect, and their resume then says reset instead of skipping events."""
    async with nodes(own_redis_url, redis_prefix) as (a, b):
        async with open_stream(b.url, ["h"]) as on_b:
            await on_b.read_until_raw(b"\n\n")
            seen = await publish(http, a.url, "h", "seen")
            assert (await on_b.next()).id == seen
            admin = redis.asyncio.Redis.from_url(own_redis_url)
            try:
                backplane = b.hub._backplane
                assert backplane is not None
                await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                await publish(http, a.url, "h", "lost")
                await admin.flushdb()  # the event log is gone with it
                await wait_until(lambda: backplane.connected, timeout=10, what="reconnected")
                await publish(http, a.url, "h", "after the flush")
            finally:
                await admin.aclose()
            events = await on_b.read_to_end(timeout=10)
            assert events[-1].event == "disconnect"
            assert json.loads(events[-1].data)["reason"] == "resync"
        async with open_stream(b.url, ["h"], last_event_id=seen) as again:
            reset = await again.next()
            assert reset.event == "reset"
            assert json.loads(reset.data)["reason"] in ("unknown", "trimmed")
