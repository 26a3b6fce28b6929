"""Faults around Redis deployments, with real processes: a hub node killed with SIGKILL
while hundreds of clients stream, and the Redis server going away and coming back (with
its data from the append-only file, or empty).

What must hold: clients of a dead node resume on the surviving one with every
acknowledged event exactly once, in order; while Redis is down publishing fails fast
(503, JSON) and ``/readyz`` says so, open streams stay open and resume afterwards without
losing anything acknowledged; a Redis that comes back empty leads to explicit resets,
never to silent gaps, and new ids stay above every old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ssehub._wire import ServerEvent, SSEDecoder

from ..helpers import free_port, read_chunk, wait_until
from ..processes import HubProcess, hub_processes
from ..redis_support import RedisServer, redis_unavailable

pytestmark = pytest.mark.redis

FAIL_FAST = 2.5
"""Seconds a publish may take to fail while Redis is unreachable (the issue says 2)."""


# -- hub processes ------------------------------------------------------------------------


def hub_nodes(
    tmp_path: Path, backends: dict[str, str]
) -> contextlib.AbstractAsyncContextManager[list[HubProcess]]:
    """One ``ssehub serve`` per ``{name: backend}``, as :func:`hub_processes` starts them."""
    options = {
        name: ["--backend", backend, "--shutdown-grace", "2", "--heartbeat", "5"]
        for name, backend in backends.items()
    }
    return hub_processes(tmp_path, options)


# -- Redis servers of our own (restartable on the same port and directory) ----------------


@pytest.fixture
def disk_redis(tmp_path: Path) -> Iterator[Callable[[bool], RedisServer]]:
    """Make (not start) restartable redis-servers; every one is stopped afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        redis_unavailable("no redis-server binary to start (and restart) a Redis with")
    servers: list[RedisServer] = []

    def make(persistent: bool) -> RedisServer:
        server = RedisServer(
            binary, tmp_path / f"redis-{len(servers)}", port=free_port(), persistent=persistent
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


# -- a raw SSE client that reconnects ------------------------------------------------------


class Refused(Exception):
    """The hub answered the stream request with something other than 200."""


@dataclass
class Item:
    connection: int
    """1 for the first stream the client opened, 2 for the next, ..."""
    event: ServerEvent


@dataclass
class SSEClient:
    """A minimal EventSource on raw asyncio streams (HTTP/1.1, chunked bodies): on any
    end of a stream it reconnects, to ``fallback``, with ``Last-Event-ID``."""

    port: int
    topic: str
    fallback: int = 0
    """Where to reconnect after a stream ends (0: the same port)."""
    last_id: str = ""
    initial: str | None = None
    """The resume point of the first stream (on a fresh connect, the hub's head id)."""
    items: list[Item] = field(default_factory=list)
    connections: int = 0
    live: bool = False
    """A stream is open (its 200 head arrived)."""
    problems: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.live = False

    @property
    def messages(self) -> list[int]:
        return [int(item.event.id) for item in self.items if item.event.event == "message"]

    def control(self, name: str) -> list[Item]:
        return [item for item in self.items if item.event.event == name]

    async def _run(self) -> None:
        while True:
            opened = self.connections
            try:
                await self._stream()
            except (OSError, EOFError, asyncio.IncompleteReadError, Refused, ValueError) as exc:
                self.problems.append(repr(exc))
            self.live = False
            if self.fallback:
                self.port = self.fallback
            if self.connections == opened:
                await asyncio.sleep(0.05)  # back off between failed attempts

    async def _stream(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            request = (
                f"GET /events?topic={self.topic} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                "Accept: text/event-stream\r\n"
            )
            if self.last_id:
                request += f"Last-Event-ID: {self.last_id}\r\n"
            writer.write(f"{request}\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                raise Refused(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            chunked = b"\r\ntransfer-encoding: chunked\r\n" in head.lower()
            self.connections += 1
            number = self.connections
            self.live = True
            decoder = SSEDecoder(self.last_id)
            while True:
                if chunked:
                    chunk = await read_chunk(reader)
                    if chunk is None:
                        return  # the body ended: the server closed the stream
                    data = chunk
                else:
                    data = await reader.read(65536)
                    if not data:
                        return
                self.items.extend(Item(number, event) for event in decoder.feed(data))
                self.last_id = decoder.last_event_id
                if self.initial is None and self.last_id:
                    self.initial = self.last_id
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def running(clients: list[SSEClient]) -> AsyncIterator[list[SSEClient]]:
    """Start the clients (their streams open in the background); stop them all on exit."""
    for client in clients:
        client.start()
    try:
        yield clients
    finally:
        await asyncio.gather(*(client.stop() for client in clients))


def received_exactly(client: SSEClient, acked: list[int]) -> str | None:
    """``None`` if the client received exactly the acknowledged ids after its first resume
    point, once each and in order (and nothing else); else what is wrong."""
    assert client.initial is not None
    initial = int(client.initial)
    expected = [i for i in acked if i > initial]
    got = client.messages
    if got == expected and len(got) == len(client.items):
        return None
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    duplicates = len(got) - len(set(got))
    others = [(i.event.event, i.event.data) for i in client.items if i.event.event != "message"]
    return (
        f"from {initial}: {len(got)} received, {len(expected)} expected; "
        f"missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)}), "
        f"{duplicates} duplicates, in order: {got == sorted(got)}, "
        f"connections {client.connections}, other events {others[:3]}, "
        f"problems {client.problems[:3]}"
    )


async def publish(
    http: httpx.AsyncClient, node: HubProcess, topic: str, data: Any
) -> httpx.Response:
    return await http.post(f"{node.url}/topics/{topic}/events", json={"data": data})


async def publish_until_accepted(
    http: httpx.AsyncClient, node: HubProcess, topic: str, data: Any, timeout: float
) -> int:
    """Publish, retrying while the hub answers 503 (Redis coming back); the new id."""
    deadline = time.monotonic() + timeout
    while True:
        response = await publish(http, node, topic, data)
        if response.status_code == 201:
            return int(response.json()["id"])
        assert response.status_code == 503, response.text
        assert time.monotonic() < deadline, f"publish still refused: {response.text}"
        await asyncio.sleep(0.05)  # back off between attempts


async def assert_fails_fast(http: httpx.AsyncClient, node: HubProcess) -> None:
    """A publish while Redis is unreachable: 503 with a JSON error body, fast."""
    started = time.monotonic()
    response = await publish(http, node, "k", "while redis is down")
    took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"], body
    assert took < FAIL_FAST, f"the refused publish took {took:.2f}s"


# -- the tests ------------------------------------------------------------------------------


async def test_kill_9_one_node_while_200_clients_stream(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """100 clients on A, 100 on B, a publisher on B; A is killed with SIGKILL. Its clients
    resume on B, and every client ends with every acknowledged event exactly once, in
    order."""
    backend = f"{redis_url}?prefix={redis_prefix}"
    async with (
        hub_nodes(tmp_path, {"a": backend, "b": backend}) as (a, b),
        httpx.AsyncClient(timeout=10) as http,
    ):
        on_a = [SSEClient(a.port, "k", fallback=b.port) for _ in range(100)]
        on_b = [SSEClient(b.port, "k", fallback=b.port) for _ in range(100)]
        everyone = on_a + on_b
        async with running(everyone):
            await wait_until(
                lambda: all(c.initial is not None for c in everyone), 20, "200 streams open"
            )
            acked: list[int] = []
            refused: list[str] = []
            stop = asyncio.Event()

            async def publisher() -> None:
                n = 0
                while not stop.is_set():
                    response = await publish(http, b, "k", n)
                    if response.status_code == 201:
                        acked.append(int(response.json()["id"]))
                    else:
                        refused.append(f"{response.status_code} {response.text}")
                    n += 1
                    await asyncio.sleep(0.01)  # the publishing rate

            task = asyncio.create_task(publisher())
            try:
                await wait_until(
                    lambda: len(acked) >= 20 and all(len(c.messages) >= 10 for c in everyone),
                    20,
                    "every client got events before the kill",
                )
                a.proc.kill()
                await asyncio.wait_for(a.proc.wait(), 10)
                await wait_until(
                    lambda: all(c.connections >= 2 and c.live for c in on_a),
                    20,
                    "A's clients resumed on B",
                )
                after_resume = len(acked)
                await wait_until(lambda: len(acked) >= after_resume + 30, 20, "more published")
            finally:
                stop.set()
                await asyncio.wait_for(task, 15)

            assert not refused, refused[:3]
            last = acked[-1]
            try:
                await wait_until(
                    lambda: all(c.messages and c.messages[-1] >= last for c in everyone),
                    20,
                    "every client has the last acknowledged event",
                )
            finally:
                wrong = {n: received_exactly(c, acked) for n, c in enumerate(everyone)}
                wrong = {n: why for n, why in wrong.items() if why is not None}
                assert not wrong, (
                    f"{len(wrong)} of 200 clients: {list(wrong.items())[:3]}\n{b.tail()}"
                )
            assert all(c.connections == 2 for c in on_a), [c.connections for c in on_a]
            assert all(c.connections == 1 for c in on_b), [c.connections for c in on_b]
            # the kill cut A's clients off mid-stream: events came on both connections
            assert all({i.connection for i in c.items} == {1, 2} for c in on_a)


@contextlib.asynccontextmanager
async def node_with_streams(
    tmp_path: Path, server: RedisServer, streams: int, events: int, timeout: float = 10
) -> AsyncIterator[tuple[HubProcess, httpx.AsyncClient, list[SSEClient], list[int]]]:
    """A hub on ``server`` (a fresh key prefix) with ``streams`` open streams of topic
    ``k`` that each got ``events`` acknowledged events: yields the node, an HTTP client
    (``timeout``), the stream clients and the acknowledged ids."""
    backend = f"{server.url}?prefix=faults-{uuid.uuid4().hex[:8]}"
    async with (
        hub_nodes(tmp_path, {"node": backend}) as (node,),
        httpx.AsyncClient(timeout=timeout) as http,
        running([SSEClient(node.port, "k") for _ in range(streams)]) as clients,
    ):
        await wait_until(lambda: all(c.initial is not None for c in clients), 15, "streams open")
        acked = [int((await publish(http, node, "k", n)).json()["id"]) for n in range(events)]
        await wait_until(
            lambda: all(c.messages[-1:] == acked[-1:] for c in clients), 15, "delivered"
        )
        yield node, http, clients, acked


async def test_redis_restart_with_persistence_loses_nothing(
    tmp_path: Path, disk_redis: Callable[[bool], RedisServer]
) -> None:
    """Redis (append-only file, fsync always) is stopped and started again: meanwhile
    publishing fails fast and /readyz says 503; the open streams stay open and get every
    acknowledged event, from before and after the restart, exactly once and in order."""
    server = disk_redis(True)
    await asyncio.to_thread(server.start)
    async with node_with_streams(tmp_path, server, 5, 10) as (node, http, clients, acked):
        await asyncio.to_thread(server.stop)
        readyz = await http.get(f"{node.url}/readyz")
        assert readyz.status_code == 503, readyz.text
        assert readyz.json()["error"], readyz.text
        down_since = time.monotonic()
        while time.monotonic() - down_since < 1.5:  # Redis stays down a while
            await assert_fails_fast(http, node)
            await asyncio.sleep(0.1)
        assert all(c.live and c.connections == 1 for c in clients), [c.problems for c in clients]

        await asyncio.to_thread(server.start)  # same port, same directory: the AOF reloads
        acked.append(await publish_until_accepted(http, node, "k", "back", timeout=15))
        for n in range(9):
            response = await publish(http, node, "k", n)
            assert response.status_code == 201, response.text
            acked.append(int(response.json()["id"]))
        assert acked == sorted(acked) and len(set(acked)) == 20

        async def ready() -> bool:
            return (await http.get(f"{node.url}/readyz")).status_code == 200

        await wait_until(ready, 10, "/readyz 200 again")
        try:
            await wait_until(
                lambda: all(c.messages[-1:] == acked[-1:] for c in clients),
                15,
                "the events after the restart delivered",
            )
        finally:
            wrong = [received_exactly(c, acked) for c in clients]
            assert wrong == [None] * len(clients), f"{wrong}\n{node.tail()}"
        assert all(c.connections == 1 for c in clients), "a stream was closed meanwhile"


def check_no_silent_gap(client: SSEClient, acked: list[int], new_from: int) -> str | None:
    """``None`` if the client's events never skip an acknowledged id without an
    ``event: reset`` in between, never repeat one, and the first event from the new
    Redis (ids >= ``new_from``) came after a reset; else what is wrong."""
    assert client.initial is not None
    position = int(client.initial)
    reset_seen = False
    new_era = False
    for item in client.items:
        event = item.event
        if event.event == "reset":
            reason = json.loads(event.data)["reason"]
            if reason not in ("unknown", "trimmed"):
                return f"reset with reason {reason!r}: {event.data}"
            reset_seen = True
            position = int(event.id)
            continue
        if event.event == "disconnect":
            if json.loads(event.data)["reason"] != "resync":
                return f"unexpected disconnect {event.data}"
            continue
        if event.event != "message":
            return f"unexpected event {event}"
        number = int(event.id)
        if number not in acked:
            return f"event {number} was never acknowledged"
        if number <= position:
            return f"event {number} after position {position}: a duplicate or out of order"
        skipped = [i for i in acked if position < i < number]
        if skipped and not reset_seen:
            return f"silent gap before {number}: {skipped[:5]} ({len(skipped)} skipped)"
        if number >= new_from and not new_era:
            new_era = True
            if not reset_seen:
                return f"event {number} from the emptied Redis without a reset before it"
        reset_seen = False
        position = number
    return None


async def test_redis_back_empty_resets_streams_instead_of_silent_gaps(
    tmp_path: Path, disk_redis: Callable[[bool], RedisServer]
) -> None:
    """Redis (no persistence) restarts empty. The open streams are told to resync and get
    an explicit reset (never a silent gap); a client that missed events and resumes now
    gets a reset, not a partial replay; new ids stay above every id issued before."""
    server = disk_redis(False)
    await asyncio.to_thread(server.start)
    async with node_with_streams(tmp_path, server, 5, 10) as (node, http, clients, acked):
        await asyncio.to_thread(server.stop)
        await assert_fails_fast(http, node)
        await asyncio.to_thread(server.start)  # same port, nothing on disk: empty

        new_from = await publish_until_accepted(http, node, "k", "after", timeout=15)
        assert new_from > acked[-1], "an id from the emptied Redis repeats an older one"
        acked.append(new_from)

        # a client that saw only the first 5 events resumes now: an explicit reset
        async with running([SSEClient(node.port, "k", last_id=str(acked[4]))]) as (late,):
            await wait_until(lambda: bool(late.items), 10, "the late client's first event")
            first = late.items[0].event
            assert first.event == "reset", late.items
            assert json.loads(first.data)["reason"] in ("unknown", "trimmed"), first.data
            assert int(first.id) >= new_from

        # keep publishing until every open stream went through its reset
        deadline = time.monotonic() + 15
        while not all(c.control("reset") for c in clients):
            response = await publish(http, node, "k", "more")
            assert response.status_code == 201, response.text
            acked.append(int(response.json()["id"]))
            assert time.monotonic() < deadline, [
                (c.connections, c.problems[-1:], c.items[-2:]) for c in clients
            ]
            await asyncio.sleep(0.05)  # the publishing rate
        for n in range(5):
            response = await publish(http, node, "k", n)
            assert response.status_code == 201, response.text
            acked.append(int(response.json()["id"]))
        assert acked == sorted(acked) and len(set(acked)) == len(acked)

        try:
            await wait_until(
                lambda: all(c.last_id == str(acked[-1]) for c in clients),
                15,
                "every stream caught up with the new Redis",
            )
        finally:
            wrong = [check_no_silent_gap(c, acked, new_from) for c in clients]
            assert wrong == [None] * len(clients), f"{wrong}\n{node.tail()}"
        for client in clients:
            # the old events all arrived before the restart; the new ones after a reset
            assert client.messages[:10] == acked[:10]
            assert client.messages[-5:] == acked[-5:]
        assert (await http.get(f"{node.url}/readyz")).status_code == 200


async def test_frozen_redis_fails_publishes_fast_and_streams_resume(
    tmp_path: Path, start_redis: Callable[[], RedisServer]
) -> None:
    """Redis stops answering (SIGSTOP: connections stay open, nothing replies, as in a
    network partition). Every publish, including those that arrive while another one is
    waiting for Redis, fails fast; the open streams stay open and get every acknowledged
    event once Redis answers again."""
    server = await asyncio.to_thread(start_redis)
    async with node_with_streams(tmp_path, server, 3, 5, timeout=15) as (
        node,
        http,
        clients,
        acked,
    ):

        async def attempt(delay: float) -> tuple[httpx.Response, float]:
            await asyncio.sleep(delay)  # publishers arrive one after another
            started = time.monotonic()
            response = await publish(http, node, "k", f"frozen-{delay}")
            return response, time.monotonic() - started

        server.pause()
        try:
            results = await asyncio.gather(*(attempt(0.4 * n) for n in range(5)))
            readyz = await http.get(f"{node.url}/readyz")
        finally:
            server.resume()
        assert readyz.status_code == 503, readyz.text
        for response, _ in results:
            assert response.status_code == 503, response.text
            assert set(response.json()) == {"error", "detail"}, response.text
        assert all(c.live and c.connections == 1 for c in clients), [c.problems for c in clients]

        acked.append(await publish_until_accepted(http, node, "k", "thawed", timeout=15))
        for n in range(4):
            response = await publish(http, node, "k", n)
            assert response.status_code == 201, response.text
            acked.append(int(response.json()["id"]))
        await wait_until(
            lambda: all(c.messages[-1:] == acked[-1:] for c in clients), 15, "delivered after"
        )
        for client in clients:
            # a refused publish may still have been stored (its script reached Redis before
            # the time-out): those may arrive too; every acknowledged one arrives once
            got = [int(i.event.id) for i in client.items if not i.event.data.startswith('"frozen-')]
            assert got == [i for i in acked if i > int(client.initial or 0)]
            assert client.messages == sorted(set(client.messages))
            assert client.connections == 1
        took = [round(t, 2) for _, t in results]
        assert max(took) < FAIL_FAST, f"refused publishes took {took} s while Redis was frozen"
