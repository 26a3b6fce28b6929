"""ssehub.js in a real Chromium against a real uvicorn: delivery, resume, reset, the
reconnect contract, the wire format and the long-poll transport."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ssehub import Hub, Retention
from ssehub._app import static_endpoint, static_file
from ssehub._wire import SSEDecoder

from ..helpers import RunningServer, publish, run_server
from .support import PageClient, install, start_client


async def _blank(request: Request) -> Response:
    return HTMLResponse("<!doctype html><title>blank</title>")


def page_routes() -> list[Route]:
    """A blank page at ``/`` and the client at ``/ssehub.js``, for a test app of its own."""
    return [
        Route("/", _blank),
        Route("/ssehub.js", static_endpoint(static_file("ssehub.js"), "text/javascript", {})),
    ]


if TYPE_CHECKING:
    from playwright.async_api import Page

FAST: dict[str, Any] = {"heartbeat_interval": 0, "retry_ms": 100}
SSE_TYPE = (b"content-type", b"text/event-stream")


async def stored_events(
    http: httpx.AsyncClient, server: RunningServer, topics: list[str], after: str
) -> list[dict[str, Any]]:
    """The hub's own account of the events after ``after`` (a non-waiting poll)."""
    query: list[tuple[str, str | int | float | bool | None]] = [("topic", t) for t in topics]
    query += [("last_event_id", after), ("timeout", "0")]
    response = await http.get(f"{server.url}/poll", params=query)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def head(server: RunningServer) -> str:
    return str(server.hub.statistics().head_id)


async def test_events_arrive_in_order_on_one_and_several_topics(
    page: Page, http: httpx.AsyncClient
) -> None:
    async with run_server(Hub("memory://", **FAST)) as server:
        await install(page, server.url)
        start = head(server)
        one = await start_client(page, "one", server.url, topics=["a"])
        both = await start_client(page, "both", server.url, topics=["a", "b"])
        await one.wait_for("rec.opens.length === 1")
        await both.wait_for("rec.opens.length === 1")

        await publish(http, server.url, "a", {"n": 1, "text": "é €"})
        await publish(http, server.url, "b", "tick", event="clock")
        await publish(http, server.url, "c", "not subscribed")
        response = await http.post(
            f"{server.url}/topics/a/events",
            content="line one\r\nline two\n\nline four",
            params={"event": "note"},
            headers={"content-type": "text/plain"},
        )
        assert response.status_code == 201, response.text
        for n in range(5):
            await publish(http, server.url, "ab"[n % 2], [n, n * n], event=f"step-{n}")

        truth = await stored_events(http, server, ["a", "b"], start)
        assert len(truth) == 8
        await both.wait_for(f"rec.events.length >= {len(truth)}")
        await one.wait_for(f"rec.events.length >= {sum(e['topic'] == 'a' for e in truth)}")
        got_both = await both.events()
        got_one = await one.events()

    def fields(event: dict[str, Any]) -> tuple[str, str, str]:
        # a stream carries a line break of the data as a new data: line, read back as LF
        return (event["id"], event["event"], re.sub(r"\r\n?", "\n", event["data"]))

    assert [fields(e) for e in got_both] == [fields(e) for e in truth]
    assert [fields(e) for e in got_one] == [fields(e) for e in truth if e["topic"] == "a"]
    ids = [int(e["id"]) for e in got_both]
    assert ids == sorted(set(ids)), "ids must be strictly increasing"
    assert {e["topic"] for e in got_one} == {"a"}, "a one-topic client names its topic"
    assert {e["topic"] for e in got_both} == {None}
    note = next(e for e in got_one if e["event"] == "note")
    assert note["data"] == "line one\nline two\n\nline four"
    assert json.loads(got_one[0]["data"]) == {"n": 1, "text": "é €"}


async def test_a_stream_the_server_ends_is_resumed_without_loss_or_duplicates(
    page: Page, http: httpx.AsyncClient
) -> None:
    # Streams end after 0.4-0.5 s (lifetime); the client comes back after 0.8-1 s (retry:).
    hub = Hub("memory://", heartbeat_interval=0, retry_ms=1000, max_lifetime=0.5)
    async with run_server(hub) as server:
        await install(page, server.url)
        client = await start_client(page, "c", server.url, topics=["t", "u"])
        await client.wait_for("rec.opens.length === 1")
        published: list[tuple[str, str]] = []  # (id, data on the wire)
        for round_ in range(3):
            for i in range(3):
                data = f"live {round_}.{i}"
                event_id = await publish(http, server.url, "tu"[i % 2], data)
                published.append((event_id, json.dumps(data)))
            await client.wait_for(f"rec.reconnects.length === {round_ + 1}")
            for i in range(4):
                data = f"away {round_}.{i}"
                event_id = await publish(http, server.url, "ut"[i % 2], data)
                published.append((event_id, json.dumps(data)))
            record = await client.record()
            assert len(record["opens"]) == round_ + 1, "published while the client was away"
            await client.wait_for(f"rec.opens.length === {round_ + 2}")
        final = await publish(http, server.url, "t", "final")
        published.append((final, '"final"'))
        await client.wait_for(f"rec.events.some((e) => e.id === {json.dumps(final)})")
        record = await client.record()

    assert [(e["id"], e["data"]) for e in record["events"]] == published
    assert record["resets"] == []
    assert record["dropped"] == 0
    reconnects = record["reconnects"]
    assert [r["reason"] for r in reconnects] == ["disconnect: lifetime"] * 3
    for reconnect, reopen in zip(reconnects, record["opens"][1:], strict=True):
        # each reconnection resumed from the last event delivered before it
        delivered = [e["id"] for e in record["events"] if e["t"] <= reconnect["t"]]
        assert reconnect["lastEventId"] == reopen["lastEventId"] == delivered[-1]
        assert 800 <= reconnect["delay"] <= 1000  # the hub's retry: hint, jittered


async def test_unusable_resume_points_go_to_the_reset_handler(
    page: Page, http: httpx.AsyncClient
) -> None:
    hub = Hub("memory://", **FAST, retention=Retention(max_events=3))
    async with run_server(hub) as server:
        ids = [await publish(http, server.url, "t", n) for n in range(6)]
        await hub.event_log.trim()
        assert head(server) == ids[-1]
        await install(page, server.url)
        cases = {"malformed": "not-a-number", "trimmed": ids[0], "future": str(int(ids[-1]) + 99)}
        for transport in ("sse", "poll"):
            current = head(server)
            clients: dict[str, PageClient] = {}
            for reason, resume in cases.items():
                clients[reason] = await start_client(
                    page,
                    f"{transport}-{reason}",
                    server.url,
                    topics=["t"],
                    lastEventId=resume,
                    transport=transport,
                    pollTimeout=5,
                )
            for client in clients.values():
                await client.wait_for("rec.resets.length === 1 && c.readyState === 'open'")
            live = await publish(http, server.url, "t", f"after the {transport} reset")
            for reason, client in clients.items():
                await client.wait_for("rec.events.length === 1")
                record = await client.record()
                [reset] = record["resets"]
                assert (reset["reason"], reset["currentId"], reset["id"]) == (
                    reason,
                    current,
                    current,
                ), transport
                assert reset["detail"]
                assert [e["id"] for e in record["events"]] == [live], "no replay, then live"
                assert record["lastEventId"] == live
                await client.close()


async def test_a_resume_point_still_retained_replays_exactly_the_missed_events(
    page: Page, http: httpx.AsyncClient
) -> None:
    async with run_server(Hub("memory://", **FAST)) as server:
        ids = [await publish(http, server.url, "t", n) for n in range(5)]
        await install(page, server.url)
        client = await start_client(page, "c", server.url, topics=["t"], lastEventId=ids[1])
        await client.wait_for("rec.events.length === 3")
        record = await client.record()
    assert [e["id"] for e in record["events"]] == ids[2:]
    assert [e["data"] for e in record["events"]] == ["2", "3", "4"]
    assert record["resets"] == []


def refusing_app() -> tuple[FastAPI, dict[str, list[dict[str, Any]]]]:
    """A tiny app whose endpoints answer by the reconnect contract's other rows, and
    record each request they get (time and headers)."""
    app = FastAPI()
    seen: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def note(name: str, request: Request) -> int:
        seen[name].append({"t": time.monotonic(), **dict(request.headers)})
        return len(seen[name])

    async def unauthorized(request: Request) -> Response:
        note("unauthorized", request)
        return JSONResponse({"error": "unauthorized", "detail": "bad token"}, status_code=401)

    async def forbidden(request: Request) -> Response:
        note("forbidden", request)
        return JSONResponse({"error": "forbidden", "detail": "not yours"}, status_code=403)

    async def busy(request: Request) -> Response:
        # 503 with Retry-After, then a short stream that ends, then 204: stop.
        count = note("busy", request)
        if count == 1:
            return JSONResponse(
                {"error": "over_capacity", "detail": "full"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        if count == 2:
            body = b"retry: 100\nid: 42\ndata: welcome\n\n"
            return Response(body, media_type="text/event-stream")
        return Response(status_code=204)

    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        # a stream that goes quiet after its first bytes and never ends; then 204
        seen["silent"].append({"t": time.monotonic(), **Request(scope).headers})
        if len(seen["silent"]) > 1:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        start = {"type": "http.response.start", "status": 200, "headers": [SSE_TYPE]}
        await send(start)
        await send({"type": "http.response.body", "body": b"id: 9\n\n", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass

    app.router.routes.extend(
        [
            *page_routes(),
            Route("/unauthorized/events", unauthorized),
            Route("/forbidden/poll", forbidden),
            Route("/busy/events", busy),
            Route("/silent/events", RawEndpoint(silent)),
        ]
    )
    return app, seen


async def test_401_and_403_stop_for_good_while_503_is_retried_after_retry_after(
    page: Page,
) -> None:
    app, seen = refusing_app()
    async with run_server(app) as server:
        await install(page, server.url, "/")
        auth = {"Authorization": "Bearer t0k3n"}
        denied = await start_client(
            page, "denied", f"{server.url}/unauthorized", topics=["t"], headers=auth, retry=100
        )
        forbidden = await start_client(
            page, "forbidden", f"{server.url}/forbidden", topics=["t"], transport="poll", retry=100
        )
        busy = await start_client(page, "busy", f"{server.url}/busy", topics=["t"], retry=100)
        await denied.wait_for("rec.closes.length === 1")
        await forbidden.wait_for("rec.closes.length === 1")
        # The busy endpoint takes over a second (Retry-After: 1); a client that retried
        # a 401 or 403 after its 100 ms retry delay would have done so meanwhile.
        await busy.wait_for("rec.closes.length === 1")
        denied_record = await denied.record()
        forbidden_record = await forbidden.record()
        busy_record = await busy.record()

    assert len(seen["unauthorized"]) == 1
    assert len(seen["forbidden"]) == 1
    assert seen["unauthorized"][0]["authorization"] == "Bearer t0k3n"
    for record, status, detail in (
        (denied_record, 401, "bad token"),
        (forbidden_record, 403, "not yours"),
    ):
        assert [(e["fatal"], e["status"], e["detail"]) for e in record["errors"]] == [
            (True, status, detail)
        ]
        assert record["readyState"] == "closed"
        assert record["opens"] == [] and record["reconnects"] == []
    requests = seen["busy"]
    assert len(requests) == 3, "503, then the stream, then 204 (stop)"
    assert requests[1]["t"] - requests[0]["t"] >= 0.95, "waited for Retry-After: 1"
    assert "last-event-id" not in requests[1]
    assert requests[2]["last-event-id"] == "42"
    assert [(e["id"], e["data"]) for e in busy_record["events"]] == [("42", "welcome")]
    assert [e["status"] for e in busy_record["errors"]] == [503]
    assert busy_record["closes"][0]["status"] == 204
    assert busy_record["readyState"] == "closed"


class RawEndpoint:
    """A plain ASGI callable for a ``Route`` (which would treat a function as a
    request-response endpoint)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def test_a_stream_that_goes_silent_is_dropped_after_idle_timeout(page: Page) -> None:
    app, seen = refusing_app()
    async with run_server(app) as server:
        await install(page, server.url, "/")
        client = await start_client(
            page, "c", f"{server.url}/silent", topics=["t"], idleTimeout=300, retry=100
        )
        await client.wait_for("rec.closes.length === 1")
        record = await client.record()
    requests = seen["silent"]
    assert len(requests) == 2
    assert requests[1]["t"] - requests[0]["t"] >= 0.3, "waited idleTimeout first"
    assert requests[1]["last-event-id"] == "9"
    assert [(e["fatal"], e["detail"]) for e in record["errors"]] == [(False, "no data for 300 ms")]
    assert [r["reason"] for r in record["reconnects"]] == ["network"]
    assert record["closes"][0]["status"] == 204


def crafted_app() -> tuple[FastAPI, list[str | None]]:
    """An SSE endpoint sending hand-written bytes in awkward pieces; records each
    request's Last-Event-ID. Answers: a tricky stream, a duplicate and a disconnect, 204."""
    app = FastAPI()
    resumes: list[str | None] = []
    first = [
        b"\xef\xbb\xbfretry: 80\r\n",  # a BOM, then a field that only counts if it is skipped
        b": a comment\r\n\r\n",
        b"id: 5\r",
        b"\nevent: greet\ndata: hel",
        b"lo\ndata: w\xc3",  # a UTF-8 sequence split across writes
        b"\xa9rld\r\n\r",
        b"\nid: 6\n\n",  # an id without data: moves the resume point, dispatches nothing
        b"data: no id of its own\n\n",
        b"id: 4\ndata: stale\n\n",  # not newer than 6: ignored
        b"id: 7\ndata: seven\r\rdata: never finished",
    ]
    second = [
        b"id: 7\ndata: a duplicate\n\n",
        b'event: disconnect\ndata: {"reason":"slow"}\nretry: 60\n\n',
    ]

    async def events(scope: Scope, receive: Receive, send: Send) -> None:
        # a raw ASGI endpoint: it decides exactly which bytes go in which write
        headers = dict(scope["headers"])
        resumes.append(headers[b"last-event-id"].decode() if b"last-event-id" in headers else None)
        if len(resumes) > 2:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [SSE_TYPE]})
        for piece in first if len(resumes) == 1 else second:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            await asyncio.sleep(0.02)  # pacing only: the pieces tend to arrive apart
        await send({"type": "http.response.body", "body": b""})

    app.router.routes.extend(
        [
            *page_routes(),
            Route("/events", RawEndpoint(events)),
        ]
    )
    return app, resumes


async def test_the_wire_format_is_parsed_per_whatwg_and_old_ids_are_dropped(
    page: Page,
) -> None:
    app, resumes = crafted_app()
    async with run_server(app) as server:
        await install(page, server.url, "/")
        client = await start_client(page, "c", server.url, topics=["t"], retry=5000)
        await client.wait_for("rec.closes.length === 1")
        record = await client.record()
    assert [(e["id"], e["event"], e["data"]) for e in record["events"]] == [
        ("5", "greet", "hello\nwérld"),
        ("6", "message", "no id of its own"),
        ("7", "message", "seven"),
    ]
    assert record["dropped"] == 2  # id 4 after 6, and id 7 again after the reconnect
    assert resumes == [None, "7", "7"]
    first, second = record["reconnects"]
    assert first["reason"] == "ended" and first["delay"] <= 80, "retry: after the BOM counts"
    assert second["reason"] == "disconnect: slow" and second["delay"] <= 60
    assert record["closes"][0]["status"] == 204


PARSER_SAMPLE = (
    "\ufeffretry: 1\r\n: comment\nid: 1\r\nevent: a\rdata: x\r\ndata:y\ndata:  z\n\n"
    "data\n\nid: 2\n\nevent:\ndata: é€😀\r\n\r\nid: 3\0\ndata: nul id ignored\n\n"
    "unknown: field\nid\ndata: empty id\n\nevent: tail\ndata: never dispatched"
)


async def test_the_parser_gives_the_same_events_wherever_the_stream_is_split(
    page: Page,
) -> None:
    async with run_server(Hub("memory://", **FAST)) as server:
        await install(page, server.url)
        results: dict[str, Any] = await page.evaluate(
            """(text) => {
                const bytes = new TextEncoder().encode(text);
                const parse = (pieces) => {
                    let last = "";
                    const out = [];
                    const parser = new hub.SSEParser((b) => {
                        if (b.id !== null) last = b.id;
                        if (b.data !== null) out.push([b.data, b.event, last]);
                    });
                    for (const piece of pieces) parser.feed(piece);
                    return JSON.stringify([out, last]);
                };
                const whole = parse([bytes]);
                const differing = [];
                for (let i = 0; i <= bytes.length; i++) {
                    for (let j = i; j <= bytes.length; j++) {
                        const pieces = [bytes.slice(0, i), bytes.slice(i, j), bytes.slice(j)];
                        if (parse(pieces) !== whole) differing.push([i, j]);
                    }
                }
                const oneByOne = parse(Array.from(bytes, (b) => new Uint8Array([b])));
                return { whole: JSON.parse(whole), differing, oneByOne: JSON.parse(oneByOne) };
            }""",
            PARSER_SAMPLE,
        )
    decoder = SSEDecoder()
    expected = [[e.data, e.event, e.id] for e in decoder.feed(PARSER_SAMPLE.encode())]
    assert results["differing"] == []
    assert results["whole"] == [expected, decoder.last_event_id]
    assert results["oneByOne"] == results["whole"]
    assert [event[0] for event in expected] == [
        "x\ny\n z",
        "",
        "é€😀",
        "nul id ignored",
        "empty id",
    ]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_network_errors_are_retried_with_a_growing_back_off(page: Page) -> None:
    async with run_server(Hub("memory://", **FAST)) as server:
        await install(page, server.url)
        nowhere = f"http://127.0.0.1:{closed_port()}"
        client = await start_client(page, "c", nowhere, topics=["t"], retry=100)
        await client.wait_for("rec.errors.length >= 4", timeout=15)
        await client.close()
        record = await client.record()
    errors = record["errors"][:4]
    assert all(not e["fatal"] and e["status"] is None for e in errors)
    delays = [r["delay"] for r in record["reconnects"][:3]]
    for attempt, delay in enumerate(delays):
        assert 0.8 * 100 * 2**attempt - 1 <= delay <= 100 * 2**attempt + 1, delays
    gaps = [later["t"] - earlier["t"] for earlier, later in zip(errors, errors[1:], strict=False)]
    for gap, delay in zip(gaps, delays, strict=True):
        assert gap >= delay - 5, (gaps, delays)
    assert record["opens"] == []


async def test_an_overloaded_hub_is_retried_until_there_is_room(
    page: Page, http: httpx.AsyncClient
) -> None:
    hub = Hub("memory://", **FAST, max_streams=1, overload_retry_ms=300)
    async with run_server(hub) as server:
        await install(page, server.url)
        first = await start_client(page, "first", server.url, topics=["t"])
        await first.wait_for("rec.opens.length === 1")
        start = head(server)
        second = await start_client(page, "second", server.url, topics=["t"], lastEventId=start)
        await second.wait_for("rec.reconnects.length >= 2")
        await first.close()
        # published while the second client is still refused: it resumes from `start`
        # once it gets in (the refusals were 200 streams too: each an "open", then a
        # reconnect)
        live = await publish(http, server.url, "t", "room at last")
        await second.wait_for("rec.events.length === 1")
        record = await second.record()
    assert record["events"][0]["id"] == live
    refused = record["reconnects"]
    assert refused and all(r["reason"].startswith("overloaded: over_capacity") for r in refused)
    assert len(record["opens"]) == len(refused) + 1
    overloaded = refused[0]
    assert 150 * 0.8 <= overloaded["delay"] <= 300, "the refusal's retry: (50-100 % of 300 ms)"


async def test_the_poll_transport_receives_and_resumes(page: Page, http: httpx.AsyncClient) -> None:
    async with run_server(Hub("memory://", **FAST)) as server:
        await install(page, server.url)
        poller = await start_client(
            page, "poller", server.url, topics=["a", "b"], transport="poll", pollTimeout=5
        )
        await poller.wait_for("rec.opens.length === 1")
        sent = [
            (await publish(http, server.url, "a", {"x": 1}), "a", "message", '{"x":1}'),
            (await publish(http, server.url, "b", "two", event="tick"), "b", "tick", '"two"'),
        ]
        await publish(http, server.url, "elsewhere", 3)
        sent.append((await publish(http, server.url, "a", [3]), "a", "message", "[3]"))
        await poller.wait_for(f"rec.events.length === {len(sent)}")
        await poller.close()
        record = await poller.record()
        assert [(e["id"], e["topic"], e["event"], e["data"]) for e in record["events"]] == sent
        assert record["lastEventId"] == sent[-1][0]

        # published while no one listens: a poller resuming from the last id gets them
        missed = [await publish(http, server.url, "b", n) for n in range(3)]
        resumed = await start_client(
            page,
            "resumed",
            server.url,
            topics=["a", "b"],
            transport="poll",
            pollTimeout=5,
            lastEventId=record["lastEventId"],
        )
        await resumed.wait_for("rec.events.length === 3")
        # and a stream may carry on from where the poller stopped
        await resumed.close()
        resume_at = (await resumed.record())["lastEventId"]
        later = await publish(http, server.url, "a", "streamed")
        streamer = await start_client(
            page, "streamer", server.url, topics=["a", "b"], transport="sse", lastEventId=resume_at
        )
        await streamer.wait_for("rec.events.length === 1")
        resumed_record = await resumed.record()
        streamed = await streamer.events()
    assert [e["id"] for e in resumed_record["events"]] == missed
    assert resume_at == missed[-1]
    assert [e["data"] for e in resumed_record["events"]] == ["0", "1", "2"]
    assert resumed_record["resets"] == [] and resumed_record["dropped"] == 0
    assert [(e["id"], e["data"]) for e in streamed] == [(later, '"streamed"')]
