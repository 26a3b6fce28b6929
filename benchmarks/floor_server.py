"""The floor: the least work per delivery that still speaks the hub's HTTP API subset.

A plain uvloop ``asyncio.Protocol`` HTTP/1.1 server, no framework. A subscriber is just
its transport in the sets of its topics. A publish encodes the event once (one
pre-framed chunk of bytes) and writes it to every subscriber's transport in one plain
loop. Nothing else runs per delivery: no queue, no task, no timer, no per-subscriber
formatting. It is a benchmark target that marks what the machine can do, not a server
to deploy: there are no heartbeats, no replay, no limits, and a subscriber that does not
read grows its transport's write buffer without bound.

    python benchmarks/floor_server.py --host 127.0.0.1 --port 8002

HTTP API (the subset that the benchmark load generator uses):

- ``GET /events?topic=a&topic=b`` -> 200 ``text/event-stream`` with chunked transfer
  encoding (the same framing uvicorn uses): ``: ok`` + ``retry: 3000``, then
  ``id: N`` / ``event: E``? / ``data: <compact JSON>`` per event;
- ``POST /topics/{topic}/events`` with ``{"data": ..., "event"?: "..."}`` -> 201
  ``{"id": "N", "topic": "..."}`` after the event was written to every subscriber's
  transport; keep-alive, requests may arrive split across reads;
- ``GET /healthz`` -> ``{"status": "ok"}``;
- ``GET /health/stream-capacity`` -> ``{"subscribers": <open streams>}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import uvloop

RETRY_MS = 3000
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
BACKLOG = 2048  # uvicorn's default, so connection bursts behave alike

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"X-Accel-Buffering: no\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
}
_UNSAFE = ("\r", "\n", "\0")


def frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk carrying ``payload``."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Floor:
    """The whole hub: topic -> subscriber transports, and the id counter."""

    def __init__(self) -> None:
        self.topics: dict[str, set[asyncio.Transport]] = {}
        self.last_id = 0
        self.streams = 0
        self.first_chunk = frame(f": ok\nretry: {RETRY_MS}\n\n".encode())

    def subscribe(self, transport: asyncio.Transport, topics: list[str]) -> None:
        for topic in topics:
            self.topics.setdefault(topic, set()).add(transport)
        self.streams += 1

    def unsubscribe(self, transport: asyncio.Transport, topics: list[str]) -> None:
        for topic in topics:
            subscribers = self.topics.get(topic)
            if subscribers is not None:
                subscribers.discard(transport)
                if not subscribers:
                    del self.topics[topic]
        self.streams -= 1

    def publish(self, topic: str, data: Any, event: str | None) -> int:
        self.last_id += 1
        event_id = self.last_id
        text = f"id: {event_id}\n"
        if event is not None:
            text += f"event: {event}\n"
        text += f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
        chunk = frame(text.encode())
        for transport in self.topics.get(topic, ()):
            try:
                transport.write(chunk)
            except RuntimeError:
                # closed in this loop iteration; connection_lost is already scheduled
                pass
        return event_id


class FloorProtocol(asyncio.Protocol):
    __slots__ = ("buffer", "floor", "topics", "transport")

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.buffer = bytearray()
        self.topics: list[str] | None = None  # set once the connection is a stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.topics is not None:
            self.floor.unsubscribe(self.transport, self.topics)
            self.topics = None

    def data_received(self, data: bytes) -> None:
        if self.topics is not None or self.transport.is_closing():
            return  # a stream: nothing more to read from the client
        self.buffer += data
        while self.buffer and self.topics is None and not self.transport.is_closing():
            if not self._next_request():
                return

    def _next_request(self) -> bool:
        """Handle one complete request from the buffer; False if more bytes are needed."""
        buffer = self.buffer
        while buffer[:2] == b"\r\n":  # tolerate stray CRLF between requests
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                self._reply(431, {"error": "head_too_large"}, keep_alive=False)
            return False
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._reply(400, {"error": "bad_request_line"}, keep_alive=False)
            return False
        method, target, version = parts
        length = 0
        connection = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
            elif name == "connection":
                connection = value.strip().lower()
            elif name == "transfer-encoding":
                self._reply(411, {"error": "length_required"}, keep_alive=False)
                return False
        if length < 0 or length > MAX_BODY_BYTES:
            self._reply(413, {"error": "bad_content_length"}, keep_alive=False)
            return False
        if len(buffer) < end + 4 + length:
            return False  # the body is still on its way
        body = bytes(buffer[end + 4 : end + 4 + length])
        del buffer[: end + 4 + length]
        tokens = {token.strip() for token in connection.split(",")}
        if version == "HTTP/1.0":
            keep_alive = "keep-alive" in tokens
        else:
            keep_alive = "close" not in tokens
        self._handle(method, target, body, keep_alive)
        return True

    def _handle(self, method: str, target: str, body: bytes, keep_alive: bool) -> None:
        path, _, query = target.partition("?")
        if method == "GET" and path == "/events":
            topics = [value for key, value in parse_qsl(query) if key == "topic" and value]
            if not topics:
                self._reply(400, {"error": "no_topic"}, keep_alive)
                return
            self.topics = topics
            self.buffer.clear()
            self.transport.write(STREAM_HEAD + self.floor.first_chunk)
            self.floor.subscribe(self.transport, topics)
        elif method == "POST" and path.startswith("/topics/") and path.endswith("/events"):
            topic = unquote(path[len("/topics/") : -len("/events")])
            if not topic:
                self._reply(404, {"error": "not_found"}, keep_alive)
                return
            try:
                data, event = self._parse_publish(body)
            except BadRequest as exc:
                self._reply(exc.status, {"error": "bad_request", "detail": exc.detail}, keep_alive)
                return
            event_id = self.floor.publish(topic, data, event)
            self._reply(201, {"id": str(event_id), "topic": topic}, keep_alive)
        elif method == "GET" and path == "/healthz":
            self._reply(200, {"status": "ok"}, keep_alive)
        elif method == "GET" and path == "/health/stream-capacity":
            self._reply(200, {"subscribers": self.floor.streams}, keep_alive)
        else:
            self._reply(404, {"error": "not_found"}, keep_alive)

    @staticmethod
    def _parse_publish(body: bytes) -> tuple[Any, str | None]:
        try:
            message = json.loads(body)
        except ValueError as exc:
            raise BadRequest(400, f"body is not JSON: {exc}") from exc
        if not isinstance(message, dict) or "data" not in message:
            raise BadRequest(400, 'body must be a JSON object with "data"')
        event = message.get("event")
        if event is not None and (not isinstance(event, str) or any(c in event for c in _UNSAFE)):
            raise BadRequest(400, '"event" must be a string without CR, LF or NUL')
        return message["data"], event

    def _reply(self, status: int, payload: dict[str, Any], keep_alive: bool) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        connection = "" if keep_alive else "Connection: close\r\n"
        head = (
            f"HTTP/1.1 {status} {REASONS[status]}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{connection}\r\n"
        )
        self.transport.write(head.encode() + body)
        if not keep_alive:
            self.buffer.clear()
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    floor = Floor()
    server = await loop.create_server(
        lambda: FloorProtocol(floor), host, port, backlog=BACKLOG, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="raw uvloop SSE fan-out (benchmark floor)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args(argv)
    try:
        uvloop.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
