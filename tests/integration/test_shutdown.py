"""Graceful shutdown of ``ssehub serve`` as a real process: SIGTERM and Ctrl+C drain every
open stream (``event: disconnect`` with a jittered ``retry:``, then EOF), the process
exits 0 within the grace period, nothing acknowledged is lost, and the JSON access log
has the stream lines without leaking query-string secrets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ssehub._wire import ServerEvent, SSEDecoder

from ..helpers import open_stream, publish, read_chunk, wait_until
from ..processes import HubProcess, hub_processes

GRACE = 5.0


@contextlib.asynccontextmanager
async def hub_process(tmp_path: Path, db: Path, name: str) -> AsyncIterator[HubProcess]:
    """``ssehub serve`` on the SQLite log ``db``, yielded once ``/healthz`` answers."""
    options = ["--backend", f"sqlite:///{db}", "--shutdown-grace", str(GRACE)]
    async with hub_processes(tmp_path, {name: options}) as (server,):
        yield server


@dataclass
class RawStream:
    """A minimal SSE client on raw asyncio streams (HTTP/1.1, chunked body)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: SSEDecoder = field(default_factory=SSEDecoder)
    events: list[ServerEvent] = field(default_factory=list)
    complete: bool = False
    """The body's terminating chunk arrived."""
    eof: bool = False
    """The server closed the connection after the body."""

    @classmethod
    async def connect(cls, port: int, topic: str) -> RawStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = cls(reader, writer)
        try:
            writer.write(
                f"GET /events?topic={topic} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        except BaseException:
            writer.close()
            raise
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"\r\ntransfer-encoding: chunked\r\n" in head.lower(), head
        return stream

    async def pump(self) -> None:
        """Decode events until the body ends, then wait for the server to close."""
        while (chunk := await read_chunk(self.reader)) is not None:
            self.events.extend(self.decoder.feed(chunk))
        self.complete = True
        self.eof = await self.reader.read() == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_streams(port: int, topic: str, count: int) -> AsyncIterator[list[RawStream]]:
    """``count`` open streams, each with a task reading it; all closed on exit."""
    limit = asyncio.Semaphore(50)

    async def one() -> RawStream:
        async with limit:
            return await RawStream.connect(port, topic)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    streams = [r for r in results if isinstance(r, RawStream)]
    tasks: list[asyncio.Task[None]] = []
    try:
        errors = [r for r in results if not isinstance(r, RawStream)]
        assert not errors, f"{len(errors)} streams failed to open, e.g. {errors[0]!r}"
        tasks = [asyncio.create_task(s.pump()) for s in streams]
        yield streams
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in streams))


async def open_streams(server: HubProcess, http: httpx.AsyncClient, count: int) -> None:
    async def all_subscribed() -> bool:
        capacity = (await http.get(f"{server.url}/health/stream-capacity")).json()
        return bool(capacity["subscribers"] == count)

    await wait_until(all_subscribed, 20, f"{count} streams subscribed")


def assert_drained(streams: list[RawStream], before: list[str]) -> list[int]:
    """Each stream got ``before``, then the shutdown disconnect with a retry, then EOF.
    Returns the retry values."""
    retries: list[int] = []
    for stream in streams:
        *events, last = stream.events
        assert [e.id for e in events] == before
        assert last.event == "disconnect"
        assert json.loads(last.data) == {"reason": "shutdown"}
        assert last.retry is not None and 0 < last.retry <= 5000, last.retry
        assert stream.complete and stream.eof
        retries.append(last.retry)
    return retries


async def test_sigterm_drains_500_streams_and_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    count = 500
    async with (
        hub_process(tmp_path, db, "first") as server,
        httpx.AsyncClient(timeout=10) as http,
        raw_streams(server.port, "t", count) as streams,
    ):
        await open_streams(server, http, count)
        acked = [await publish(http, server.url, "t", {"n": n}) for n in range(20)]
        await wait_until(
            lambda: all(len(s.events) >= len(acked) for s in streams), 20, "events delivered"
        )
        took = await server.stop(signal.SIGTERM, timeout=GRACE + 10)
        assert server.proc.returncode == 0, server.output()[-3000:]
        assert took < GRACE + 3, took
        # the readers saw the end of each connection by the time the process was gone
        await wait_until(lambda: all(s.eof for s in streams), 5, "every stream closed")
        retries = assert_drained(streams, acked)
        assert len(set(retries)) > 1, "the shutdown retry hints are not jittered"

    # nothing acknowledged before the signal is lost: a restart on the same log replays it
    async with (
        hub_process(tmp_path, db, "second") as again,
        httpx.AsyncClient(timeout=10) as http,
    ):
        before_first = str(int(acked[0]) - 1)
        response = await http.get(
            f"{again.url}/poll", params={"topic": "t", "last_event_id": before_first, "timeout": 0}
        )
        assert response.status_code == 200
        polled = response.json()["events"]
        assert [e["id"] for e in polled] == acked
        assert [json.loads(e["data"]) for e in polled] == [{"n": n} for n in range(20)]
        async with open_stream(again.url, ["t"], last_event_id=before_first) as stream:
            replayed = await stream.take(len(acked))
            assert [e.id for e in replayed] == acked


async def test_stream_log_lines_are_json_and_hide_secrets(tmp_path: Path) -> None:
    async with (
        hub_process(tmp_path, tmp_path / "hub.db", "logs") as server,
        httpx.AsyncClient(timeout=10) as http,
    ):
        secrets = {"token": "supersecret", "access_token": "abc"}
        async with open_stream(server.url, ["a"], params=secrets) as stream:
            await stream.read_until_raw(b"\n\n")
            event_id = await publish(http, server.url, "a", "hello")
            assert (await stream.next(10)).id == event_id
        # A resumed stream replays from the log first (served through ASGI, not the
        # direct path): it is logged the same way.
        resume_from = str(int(event_id) - 1)
        async with open_stream(server.url, ["a"], last_event_id=resume_from) as stream:
            assert (await stream.next(10)).id == event_id

        def closed() -> bool:
            return len([r for r in server.records() if r.get("event") == "stream.close"]) == 2

        await wait_until(closed, 10, "stream.close logged")
        await server.stop(signal.SIGTERM, timeout=GRACE + 10)
        assert server.proc.returncode == 0
        output = server.output()

    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    opened = [r for r in records if r.get("event") == "stream.open"]
    closes = [r for r in records if r.get("event") == "stream.close"]
    assert len(opened) == 2 and len(closes) == 2, records
    (open_line, resumed_open), (close_line, resumed_close) = opened, closes
    assert resumed_open["resume_from"] == resume_from
    assert resumed_close["events"] == 1 and resumed_close["last_id"] == event_id
    # Each stream's own two lines are its access log: no request line of uvicorn's
    # repeats them (the publish request has one).
    requests = [
        (r["method"], r["path"], r["status_code"])
        for r in records
        if r.get("logger") == "uvicorn.access"
    ]
    assert ("POST", "/topics/a/events", 201) in requests, requests
    assert not [r for r in requests if r[1].startswith("/events")], requests
    assert open_line["logger"] == close_line["logger"] == "ssehub.access"
    assert open_line["topics"] == close_line["topics"] == ["a"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", open_line["client"])
    assert close_line["client"] == open_line["client"]
    assert close_line["reason"] == "client_gone"
    assert isinstance(close_line["duration_s"], int | float) and close_line["duration_s"] >= 0
    assert close_line["events"] == 1
    assert isinstance(close_line["bytes"], int) and close_line["bytes"] > len("hello")
    assert close_line["last_id"] == event_id
    for secret in secrets.values():
        assert secret not in output


async def test_no_access_log_silences_request_and_stream_lines(tmp_path: Path) -> None:
    options = ["--backend", f"sqlite:///{tmp_path / 'hub.db'}", "--no-access-log"]
    async with (
        hub_processes(tmp_path, {"quiet": options}) as (server,),
        httpx.AsyncClient(timeout=10) as http,
    ):
        async with open_stream(server.url, ["a"]) as stream:
            await stream.read_until_raw(b"\n\n")
            event_id = await publish(http, server.url, "a", "hello")
            assert (await stream.next(10)).id == event_id
        await server.stop(signal.SIGTERM, timeout=GRACE + 10)
        assert server.proc.returncode == 0
    records = server.records()
    loggers = {r.get("logger") for r in records}
    assert "uvicorn.error" in loggers  # still logging, at info: startup and shutdown
    assert any(r.get("event") == "hub draining" for r in records), records
    assert not loggers & {"ssehub.access", "uvicorn.access"}, records


async def test_ctrl_c_drains_like_sigterm(tmp_path: Path) -> None:
    async with (
        hub_process(tmp_path, tmp_path / "hub.db", "ctrl-c") as server,
        httpx.AsyncClient(timeout=10) as http,
        raw_streams(server.port, "t", 5) as streams,
    ):
        await open_streams(server, http, 5)
        acked = [await publish(http, server.url, "t", n) for n in range(3)]
        await wait_until(lambda: all(len(s.events) == 3 for s in streams), 10, "delivered")
        took = await server.stop(signal.SIGINT, timeout=GRACE + 10)
        assert server.proc.returncode == 0, server.output()[-3000:]
        assert took < GRACE + 3, took
        await wait_until(lambda: all(s.eof for s in streams), 5, "every stream closed")
        assert_drained(streams, acked)


async def test_forwarded_for_is_believed_only_from_trusted_proxies(tmp_path: Path) -> None:
    """By default a proxy on this machine (127.0.0.1) is trusted, so the hub logs the
    client address from X-Forwarded-For; --forwarded-allow-ips narrows that, and then the
    header from 127.0.0.1 is ignored."""
    nodes = {
        "default": ["--backend", f"sqlite:///{tmp_path / 'a.db'}"],
        "strict": [
            *("--backend", f"sqlite:///{tmp_path / 'b.db'}"),
            *("--forwarded-allow-ips", "10.9.9.9"),
        ],
    }
    forged = {"X-Forwarded-For": "203.0.113.7"}
    async with hub_processes(tmp_path, nodes) as servers:
        for server in servers:
            async with open_stream(server.url, ["a"], headers=forged) as stream:
                await stream.read_until_raw(b"\n\n")

        def opened(server: HubProcess) -> list[str]:
            return [r["client"] for r in server.records() if r.get("event") == "stream.open"]

        await wait_until(lambda: all(opened(s) for s in servers), 10, "stream.open logged")
        default, strict = servers
        assert [c.split(":")[0] for c in opened(default)] == ["203.0.113.7"]
        assert [c.split(":")[0] for c in opened(strict)] == ["127.0.0.1"]
