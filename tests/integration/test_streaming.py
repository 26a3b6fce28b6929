"""The SSE stream against a real uvicorn on an ephemeral port."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from ssehub import Hub, Retention

from ..helpers import RunningServer, open_fds, open_stream, publish, run_server, wait_until


@pytest.fixture(params=["memory", "sqlite"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/hub.db"


@pytest.fixture
async def server(backend_url: str):
    async with run_server(Hub(backend_url, heartbeat_interval=0)) as running:
        yield running


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def test_headers_and_first_bytes_before_any_event(server: RunningServer) -> None:
    async with open_stream(server.url, ["demo"]) as stream:
        response = stream.response
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache, no-transform"
        assert response.headers["x-accel-buffering"] == "no"
        for hop_by_hop in ("connection", "keep-alive", "content-length"):
            assert hop_by_hop not in response.headers
        # nothing was published: the comment and the retry hint must still arrive at once
        await stream.read_until_raw(b"\n\n", timeout=2)
        assert stream.raw.startswith(b": ssehub\nretry: 3000\n")
        assert stream.decoder.retry == 3000
        # the first block carries the current id, so a reconnect resumes from here
        assert stream.last_event_id == str(server.hub.statistics().head_id)


async def test_publish_json_and_text_reach_every_subscriber(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    async with open_stream(server.url, ["demo"]) as one, open_stream(server.url, ["demo"]) as two:
        await wait_until(lambda: server.hub.statistics().subscribers == 2)
        response = await http.post(
            f"{server.url}/topics/demo/events", json={"data": {"x": 1}, "event": "tick"}
        )
        assert response.status_code == 201
        body = response.json()
        assert body["topic"] == "demo" and body["id"].isdigit()
        response = await http.post(
            f"{server.url}/topics/demo/events",
            content="line one\nline two",
            headers={"content-type": "text/plain"},
        )
        assert response.status_code == 201
        text_id = response.json()["id"]
        for stream in (one, two):
            first, second = await stream.take(2)
            assert (first.id, first.event, first.data) == (body["id"], "tick", '{"x":1}')
            assert (second.id, second.event, second.data) == (
                text_id,
                "message",
                "line one\nline two",
            )
        assert b"data: line one\ndata: line two\n" in one.raw
        assert f'id: {body["id"]}\nevent: tick\ndata: {{"x":1}}\n\n'.encode() in one.raw


async def test_unrelated_topics_are_not_delivered(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    async with open_stream(server.url, ["a"]) as stream:
        await publish(http, server.url, "b", "not for a")
        wanted = await publish(http, server.url, "a", "for a")
        event = await stream.next()
        assert event.id == wanted and event.data == '"for a"'


async def test_multi_topic_stream_is_in_id_order(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    async with open_stream(server.url, ["a", "b", "c"]) as stream:
        ids = []
        for i in range(30):
            ids.append(await publish(http, server.url, "abc"[i % 3], i))
        # concurrent publishes too: whatever order the hub assigns, the stream follows ids
        ids += await asyncio.gather(
            *(publish(http, server.url, "abc"[i % 3], i) for i in range(30))
        )
        events = await stream.take(60)
        got = [int(e.id) for e in events]
        assert got == sorted(int(i) for i in ids)
        assert len(set(got)) == 60


async def test_heartbeat_comments_when_idle(backend_url: str) -> None:
    async with run_server(Hub(backend_url, heartbeat_interval=0.2)) as server:
        async with open_stream(server.url, ["idle"]) as stream:
            await stream.read_until_raw(b"\n\n")
            start = len(stream.raw)
            # two heartbeats arrive within a few intervals, and they are comments, not events
            await wait_until_raw_count(stream, b":\n\n", 2, start, timeout=3)
            assert stream.decoder.last_event_id == str(server.hub.statistics().head_id)


async def wait_until_raw_count(stream, needle: bytes, count: int, start: int, timeout: float):
    async with asyncio.timeout(timeout):
        while stream.raw[start:].count(needle) < count:
            await stream._read_chunk()


async def test_no_heartbeat_when_disabled(server: RunningServer, http: httpx.AsyncClient) -> None:
    hub = server.hub
    assert hub.config.heartbeat_interval == 0
    async with open_stream(server.url, ["quiet"]) as stream:
        await stream.read_until_raw(b"\n\n")
        await publish(http, server.url, "quiet", 1)
        await stream.next()
        assert b":\n\n" not in stream.raw


async def test_resume_after_client_reconnect(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    async with open_stream(server.url, ["r"]) as stream:
        first = await publish(http, server.url, "r", 1)
        assert (await stream.next()).id == first
        resume_from = stream.last_event_id
    missed = [await publish(http, server.url, "r", i) for i in range(2, 6)]
    async with open_stream(server.url, ["r"], last_event_id=resume_from) as stream:
        replayed = await stream.take(4)
        assert [e.id for e in replayed] == missed
        live = await publish(http, server.url, "r", 6)
        assert (await stream.next()).id == live
        assert b"event: reset" not in stream.raw


async def test_resume_while_other_subscribers_keep_the_ring(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    """The ring-buffer path (topic still subscribed) and the log path give the same answer."""
    async with open_stream(server.url, ["r"]) as keeper:
        async with open_stream(server.url, ["r"]) as stream:
            first = await publish(http, server.url, "r", 1)
            assert (await stream.next()).id == first
        missed = [await publish(http, server.url, "r", i) for i in range(2, 5)]
        async with open_stream(server.url, ["r"], last_event_id=first) as stream:
            assert [e.id for e in await stream.take(3)] == missed
            live = await publish(http, server.url, "r", 5)
            assert (await stream.next()).id == live
        assert len(await keeper.take(5)) == 5


async def test_no_gap_or_duplicate_while_publishing_during_resume(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    """Events published while a resumed stream replays are delivered once, in order."""
    before = [await publish(http, server.url, "seam", i) for i in range(50)]
    start = before[9]
    publishing = asyncio.gather(*(publish(http, server.url, "seam", i) for i in range(50, 150)))
    async with open_stream(server.url, ["seam"], last_event_id=start) as stream:
        during = await publishing
        expected = sorted(int(i) for i in before[10:] + list(during))
        events = await stream.take(len(expected), timeout=10)
        assert [int(e.id) for e in events] == expected


async def test_query_parameter_aliases_resume(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    first = await publish(http, server.url, "q", 1)
    second = await publish(http, server.url, "q", 2)
    for name in ("last_event_id", "lastEventID", "lastEventId"):
        async with open_stream(server.url, ["q"], params={name: first}) as stream:
            event = await stream.next()
            assert event.id == second, name
    # the header wins over the query parameter
    async with open_stream(
        server.url, ["q"], last_event_id=second, params={"last_event_id": first}
    ) as stream:
        live = await publish(http, server.url, "q", 3)
        assert (await stream.next()).id == live


@pytest.mark.parametrize(
    ("make_id", "reason"),
    [
        (lambda head: "not-a-number", "malformed"),
        (lambda head: "-5", "malformed"),
        (lambda head: str(head + 1000), "future"),
        (lambda head: "1", "unknown"),
    ],
)
async def test_reset_when_resume_point_is_unusable(
    server: RunningServer, http: httpx.AsyncClient, make_id, reason: str
) -> None:
    await publish(http, server.url, "x", "old")
    head = server.hub.statistics().head_id
    async with open_stream(server.url, ["x"], last_event_id=make_id(head)) as stream:
        reset = await stream.next()
        assert reset.event == "reset"
        payload = json.loads(reset.data)
        assert payload["reason"] == reason
        assert payload["current_id"] == str(head)
        assert reset.id == str(head)
        live = await publish(http, server.url, "x", "new")
        event = await stream.next()
        assert (event.id, event.data) == (live, '"new"')


async def test_reset_when_history_was_trimmed(backend_url: str, http: httpx.AsyncClient) -> None:
    hub = Hub(backend_url, heartbeat_interval=0, retention=Retention(max_events=3))
    async with run_server(hub) as server:
        ids = [await publish(http, server.url, "t", i) for i in range(10)]
        await hub.event_log.trim()
        # the last three are retained: resuming from the 7th works
        async with open_stream(server.url, ["t"], last_event_id=ids[6]) as stream:
            assert [e.id for e in await stream.take(3)] == ids[7:]
        # resuming from the 2nd would need trimmed events: an explicit reset, no partial replay
        async with open_stream(server.url, ["t"], last_event_id=ids[1]) as stream:
            reset = await stream.next()
            assert reset.event == "reset"
            assert json.loads(reset.data)["reason"] == "trimmed"
            live = await publish(http, server.url, "t", "live")
            assert (await stream.next()).id == live


async def test_replay_over_the_cap_is_a_reset(tmp_path: Path, http: httpx.AsyncClient) -> None:
    hub = Hub(f"sqlite:///{tmp_path}/hub.db", heartbeat_interval=0, max_replay=5)
    async with run_server(hub) as server:
        ids = [await publish(http, server.url, "cap", i) for i in range(8)]
        async with open_stream(server.url, ["cap"], last_event_id=ids[2]) as stream:
            assert [e.id for e in await stream.take(5)] == ids[3:]
        async with open_stream(server.url, ["cap"], last_event_id=ids[1]) as stream:
            reset = await stream.next()
            assert (reset.event, json.loads(reset.data)["reason"]) == ("reset", "too_far_behind")


async def test_resume_after_server_restart_on_sqlite(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    url = f"sqlite:///{tmp_path}/hub.db"
    async with run_server(Hub(url, heartbeat_interval=0)) as server:
        async with open_stream(server.url, ["s"]) as stream:
            seen = await publish(http, server.url, "s", "seen")
            assert (await stream.next()).id == seen
        missed = [await publish(http, server.url, "s", i) for i in range(3)]
    # stopped; nothing published while down; started again on the same file
    async with run_server(Hub(url, heartbeat_interval=0)) as server:
        async with open_stream(server.url, ["s"], last_event_id=seen) as stream:
            assert [e.id for e in await stream.take(3)] == missed
            live = await publish(http, server.url, "s", "after restart")
            event = await stream.next()
            assert event.id == live and int(live) > int(missed[-1])
            assert b"event: reset" not in stream.raw


async def test_memory_backend_restart_gives_reset_not_wrong_events(http: httpx.AsyncClient) -> None:
    async with run_server(Hub("memory://", heartbeat_interval=0)) as server:
        old = await publish(http, server.url, "m", "old")
    async with run_server(Hub("memory://", heartbeat_interval=0)) as server:
        await publish(http, server.url, "m", "new")
        async with open_stream(server.url, ["m"], last_event_id=old) as stream:
            reset = await stream.next()
            assert (reset.event, json.loads(reset.data)["reason"]) == ("reset", "unknown")


async def test_disconnected_subscriber_is_released_within_a_second(server: RunningServer) -> None:
    hub = server.hub
    async with open_stream(server.url, ["gone"]) as stream:
        await stream.read_until_raw(b"\n\n")
        assert hub.statistics().subscribers == 1
    await wait_until(lambda: hub.statistics().subscribers == 0, timeout=1.0)
    assert hub.statistics().topics == 0


async def test_connect_disconnect_cycles_leave_nothing_behind(server: RunningServer) -> None:
    hub = server.hub
    async with httpx.AsyncClient(timeout=10) as client:
        # warm up (first-use allocations, pools)
        async with open_stream(server.url, ["cycle"], client=client) as stream:
            await stream.read_until_raw(b"\n\n")
        await wait_until(lambda: hub.statistics().subscribers == 0)
        base_fds = open_fds()
        base_tasks = len(asyncio.all_tasks())
        for i in range(500):
            async with open_stream(server.url, ["cycle", f"c{i % 7}"], client=client) as stream:
                await stream.read_until_raw(b"\n\n")
        await wait_until(lambda: hub.statistics().subscribers == 0, what="subscribers released")
        await wait_until(lambda: hub.statistics().topics == 0, what="channels dropped")
        await wait_until(lambda: len(asyncio.all_tasks()) <= base_tasks, what="tasks back")
        await wait_until(lambda: open_fds() <= base_fds, what="open files back")


async def test_shutdown_sends_disconnect_and_refuses_new_streams(backend_url: str) -> None:
    hub = Hub(backend_url, heartbeat_interval=0)
    async with run_server(hub) as server:
        async with open_stream(server.url, ["bye"]) as stream:
            await stream.read_until_raw(b"\n\n")
            await hub.drain(grace=2)
            events = await stream.read_to_end()
            assert [e.event for e in events] == ["disconnect"]
            assert json.loads(events[0].data) == {"reason": "shutdown"}
            assert stream.decoder.retry is not None and stream.decoder.retry <= 5000
        async with open_stream(server.url, ["bye"]) as late:
            assert late.response.status_code == 200
            events = await late.read_to_end()
            assert [e.event for e in events] == ["disconnect"]
