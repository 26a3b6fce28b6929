"""The long-poll fallback (GET /poll), and alternating between polling and streaming."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ssehub import Hub, Retention

from ..helpers import RunningServer, open_stream, publish, run_server, wait_until

Query = list[tuple[str, str | int | float | bool | None]]


@pytest.fixture(params=["memory", "sqlite"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/hub.db"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        yield client


async def poll(
    http: httpx.AsyncClient,
    server: RunningServer,
    topics: list[str],
    last_event_id: str | None = None,
    timeout: float | str = 5,
    **params: str,
) -> dict[str, Any]:
    query: Query = [("topic", t) for t in topics]
    query.append(("timeout", str(timeout)))
    if last_event_id is not None:
        query.append(("last_event_id", last_event_id))
    query += list(params.items())
    response = await http.get(f"{server.url}/poll", params=query)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    assert set(body) == {"events", "last_event_id"}
    for item in body["events"]:
        assert set(item) == {"id", "topic", "event", "data"}
    return body


def head(server: RunningServer) -> str:
    return str(server.hub.statistics().head_id)


async def test_pending_events_are_answered_at_once(
    backend_url: str, http: httpx.AsyncClient
) -> None:
    async with run_server(Hub(backend_url, heartbeat_interval=0)) as server:
        start = head(server)
        first = await publish(http, server.url, "a", {"x": 1})
        second = await publish(http, server.url, "b", "text", event="tick")
        response = await http.post(
            f"{server.url}/topics/a/events",
            content="line one\nline two",
            headers={"content-type": "text/plain"},
        )
        third = response.json()["id"]
        await publish(http, server.url, "other", 0)  # not subscribed
        began = time.monotonic()
        body = await poll(http, server, ["a", "b"], start, timeout=20)
        assert time.monotonic() - began < 2
        assert body == {
            "events": [
                {"id": first, "topic": "a", "event": "message", "data": '{"x":1}'},
                {"id": second, "topic": "b", "event": "tick", "data": '"text"'},
                {"id": third, "topic": "a", "event": "message", "data": "line one\nline two"},
            ],
            "last_event_id": third,
        }
        # the aliases and the Last-Event-ID header are resume points too
        for name in ("lastEventID", "lastEventId"):
            aliased = await poll(http, server, ["a", "b"], None, timeout=20, **{name: first})
            assert [e["id"] for e in aliased["events"]] == [second, third]
        response = await http.get(
            f"{server.url}/poll",
            params={"topic": "a", "timeout": "20"},
            headers={"last-event-id": first},
        )
        assert [e["id"] for e in response.json()["events"]] == [third]


async def test_poll_waits_for_the_next_event(backend_url: str, http: httpx.AsyncClient) -> None:
    async with run_server(Hub(backend_url, heartbeat_interval=0)) as server:
        hub = server.hub
        await publish(http, server.url, "a", "old")
        start = head(server)

        async def publisher() -> str:
            await wait_until(lambda: hub.statistics().subscribers == 1, what="poll waiting")
            await hub.publish("other", "not for this poll")
            return (await hub.publish("a", {"new": True}, event="update")).event_id

        began = time.monotonic()
        body, new_id = await asyncio.gather(
            poll(http, server, ["a"], start, timeout=10), publisher()
        )
        assert time.monotonic() - began < 3
        assert body == {
            "events": [{"id": new_id, "topic": "a", "event": "update", "data": '{"new":true}'}],
            "last_event_id": new_id,
        }
        assert hub.statistics().subscribers == 0  # the poll released its subscription


async def test_poll_without_resume_point_waits_for_live_events(http: httpx.AsyncClient) -> None:
    async with run_server(Hub(heartbeat_interval=0)) as server:
        hub = server.hub
        await hub.publish("a", "before")

        async def publisher() -> str:
            await wait_until(lambda: hub.statistics().subscribers == 1, what="poll waiting")
            return (await hub.publish("a", "after")).event_id

        body, new_id = await asyncio.gather(poll(http, server, ["a"], timeout=10), publisher())
        assert [e["id"] for e in body["events"]] == [new_id]


async def test_poll_times_out_empty(backend_url: str, http: httpx.AsyncClient) -> None:
    async with run_server(Hub(backend_url, heartbeat_interval=0)) as server:
        await publish(http, server.url, "a", 1)
        start = head(server)
        began = time.monotonic()
        body = await poll(http, server, ["a"], start, timeout=0.3)
        elapsed = time.monotonic() - began
        assert body == {"events": [], "last_event_id": start}
        assert 0.25 <= elapsed < 2
        # without a resume point, the answer names the current head
        body = await poll(http, server, ["a"], timeout=0)
        assert body == {"events": [], "last_event_id": start}


async def test_timeout_is_capped_by_max_poll_timeout(http: httpx.AsyncClient) -> None:
    async with run_server(Hub(max_poll_timeout=0.3, heartbeat_interval=0)) as server:
        began = time.monotonic()
        body = await poll(http, server, ["a"], head(server), timeout=100)
        elapsed = time.monotonic() - began
        assert body["events"] == []
        assert 0.25 <= elapsed < 1.5


@pytest.mark.parametrize("ring_covers", [False, True], ids=["from-log", "from-ring"])
async def test_batches_are_capped_at_poll_batch(
    backend_url: str, http: httpx.AsyncClient, ring_covers: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with run_server(Hub(backend_url, poll_batch=5, heartbeat_interval=0)) as server:
        hub = server.hub
        log_reads = 0
        read_after = hub.event_log.read_after

        async def counting_read_after(*args: Any, **kwargs: Any) -> Any:
            nonlocal log_reads
            log_reads += 1
            return await read_after(*args, **kwargs)

        monkeypatch.setattr(hub.event_log, "read_after", counting_read_after)
        start = head(server)
        async with open_stream(server.url, ["a", "b"]) as stream:
            await stream.read_until_raw(b"\n\n")
            if not ring_covers:
                await stream.response.aclose()
                await wait_until(lambda: hub.statistics().subscribers == 0)
            published = [(await hub.publish("a" if i % 3 else "b", i)).event_id for i in range(12)]
            received: list[str] = []
            position = start
            sizes = []
            for _ in range(3):
                body = await poll(http, server, ["a", "b"], position, timeout=5)
                ids = [e["id"] for e in body["events"]]
                sizes.append(len(ids))
                received += ids
                assert body["last_event_id"] == ids[-1]
                position = body["last_event_id"]
            assert sizes == [5, 5, 2]
            assert received == published
            assert (log_reads == 0) is ring_covers  # the open stream kept the rings alive
            assert [json.loads(e["data"]) for e in body["events"]] == [10, 11]
            body = await poll(http, server, ["a", "b"], position, timeout=0)
            assert body == {"events": [], "last_event_id": published[-1]}


def assert_reset(body: dict[str, Any], current: str, reason: str) -> None:
    assert body["last_event_id"] == current
    assert len(body["events"]) == 1
    item = body["events"][0]
    assert item["event"] == "reset"
    assert item["topic"] is None
    assert item["id"] == current
    data = json.loads(item["data"])
    assert data["reason"] == reason
    assert data["current_id"] == current
    assert data["detail"]


@pytest.mark.parametrize("kind", ["malformed", "future", "unknown", "trimmed"])
async def test_bad_resume_point_gets_one_reset_then_polls_continue(
    backend_url: str, http: httpx.AsyncClient, kind: str
) -> None:
    hub = Hub(backend_url, retention=Retention(max_events=2), heartbeat_interval=0)
    async with run_server(hub) as server:
        ids = [(await hub.publish("a", i)).event_id for i in range(5)]
        bad = {
            "malformed": "12abc",
            "future": str(int(ids[-1]) + 1),
            "unknown": "1",
            "trimmed": ids[0],  # retention keeps only the last two events of "a"
        }[kind]
        body = await poll(http, server, ["a"], bad, timeout=5)
        assert_reset(body, ids[-1], kind)

        # the next poll with the returned id continues normally
        body = await poll(http, server, ["a"], body["last_event_id"], timeout=0)
        assert body == {"events": [], "last_event_id": ids[-1]}
        new = (await hub.publish("a", "next")).event_id
        body = await poll(http, server, ["a"], ids[-1], timeout=5)
        assert [e["id"] for e in body["events"]] == [new]
        # a retained resume point still replays (all or nothing)
        body = await poll(http, server, ["a"], ids[3], timeout=5)
        assert [e["id"] for e in body["events"]] == [ids[4], new]


@pytest.mark.parametrize(
    ("query", "detail_part"),
    [
        ([("timeout", "1")], "topic"),
        ([("topic", "a"), ("timeout", "abc")], "timeout"),
        ([("topic", "a"), ("timeout", "-1")], "timeout"),
        ([("topic", "a"), ("timeout", "nan")], "timeout"),
        ([("topic", "a"), ("timeout", "inf")], "timeout"),
        ([("topic", "bad topic!"), ("timeout", "0")], "topic"),
        ([("topic", ""), ("timeout", "0")], "topic"),
        ([("topic", "a"), ("topic", "x" * 201), ("timeout", "0")], "topic"),
    ],
)
async def test_bad_poll_input_is_a_json_400(
    http: httpx.AsyncClient, query: Query, detail_part: str
) -> None:
    async with run_server(Hub(heartbeat_interval=0)) as server:
        response = await http.get(f"{server.url}/poll", params=query)
        assert response.status_code == 400, response.text
        body = response.json()
        assert set(body) == {"error", "detail"}
        assert body["error"] in ("invalid_request", "invalid_topic")
        assert detail_part in body["detail"]
        assert server.hub.statistics().subscribers == 0


async def test_alternating_poll_and_stream_loses_and_repeats_nothing(
    backend_url: str, http: httpx.AsyncClient
) -> None:
    hub = Hub(backend_url, poll_batch=3, ring_size=8, heartbeat_interval=0)
    topics = ["a", "b"]
    async with run_server(hub) as server:
        published: list[str] = []
        received: list[str] = []

        async def publish_some(n: int, round_no: int) -> None:
            for i in range(n):
                if i % 2:
                    event_id = await publish(http, server.url, topics[i % 2], [round_no, i])
                else:
                    event_id = (await hub.publish(topics[i % 2], [round_no, i])).event_id
                published.append(event_id)

        # a fresh stream's first bytes carry the current id: the client's starting point
        await hub.publish("a", "before the client came")
        async with open_stream(server.url, topics) as stream:
            await stream.read_until_raw(b"\n\n")
            last = stream.last_event_id
        assert last == head(server)

        for round_no in range(6):
            await publish_some(2 + round_no, round_no)
            if round_no % 2:
                while len(received) < len(published):
                    body = await poll(http, server, topics, last, timeout=5)
                    assert 0 < len(body["events"]) <= 3
                    assert all(e["event"] == "message" for e in body["events"])
                    received += [e["id"] for e in body["events"]]
                    last = body["last_event_id"]
                    assert last == received[-1]
            else:
                async with open_stream(server.url, topics, last_event_id=last) as stream:
                    # missed events come first (replay), then more arrive live
                    missed = len(published) - len(received)
                    for event in await stream.take(missed):
                        assert event.event == "message"
                        received.append(event.id)
                    await publish_some(3, round_no)
                    for event in await stream.take(len(published) - len(received)):
                        received.append(event.id)
                    last = stream.last_event_id
                await wait_until(lambda: hub.statistics().subscribers == 0)
            assert received == published[: len(received)]

        assert len(published) == sum(2 + r for r in range(6)) + 3 * 3
        assert received == published
        assert len(set(received)) == len(received)
        assert [int(i) for i in received] == sorted(int(i) for i in received)
        body = await poll(http, server, topics, last, timeout=0)
        assert body == {"events": [], "last_event_id": published[-1]}
