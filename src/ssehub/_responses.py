"""The lean stream response: first bytes at once, one task, one send per batch.

One task per connection drains everything pending from its cursors (merged in id
order) and writes it in one ``send``; a small disconnect watch (the ASGI ``receive()``
returning ``http.disconnect``) releases the subscription at once. Heartbeats come from
the hub's single ticker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._broker import encode
from ._channel import DisconnectReason, Lagged, Subscription
from ._exceptions import HistoryGoneError
from ._hub import REPLAY_PAGE_SIZE, reset_data
from ._logging import access_logger
from ._wire import encode_comment, encode_event

if TYPE_CHECKING:
    from ._hub import Hub, ResumePlan

logger = logging.getLogger("ssehub.stream")

STREAM_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]
HEARTBEAT: Final = b":\n\n"
TRANSPORT_EXTENSION: Final = "ssehub.transport"
"""Scope extension through which a server hands the connection's transport to the hub
(``{"transport": asyncio.Transport}``), so a stalled stream can be aborted."""
MAX_BATCH_EVENTS: Final = 1000
"""Most events written in one send when a subscriber has a backlog."""


class _Stalled(Exception):
    pass


def disconnect_chunk(reason: DisconnectReason, retry_ms: int) -> bytes:
    """The final ``event: disconnect`` with a reason and a ``retry:`` hint."""
    return encode_event(
        json.dumps({"reason": reason.value}, separators=(",", ":")),
        event="disconnect",
        retry=retry_ms,
    )


class HubStreamResponse(Response):
    """Streams one subscription of ``hub`` as ``text/event-stream``."""

    def __init__(self, hub: Hub, sub: Subscription, plan: ResumePlan, resume: str | None) -> None:
        # Response.__init__ is not called on purpose: this response writes its own
        # headers and body; only what Starlette's middleware may read is set.
        self.status_code = 200
        self.background = None
        self.raw_headers = list(STREAM_HEADERS)
        self._hub = hub
        self._sub = sub
        self._plan = plan
        self._resume = resume[:64] if resume else resume  # as logged; ids are 19 digits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub, sub, plan = self._hub, self._sub, self._plan
        config = hub.config
        metrics = hub.metrics
        watch = asyncio.ensure_future(_watch_disconnect(receive, sub.close))
        timeout = config.write_timeout or None
        metrics.stream_opened()
        access_logger().info(
            "stream.open", topics=list(sub.topics), client=sub.peer, resume_from=self._resume
        )

        async def write(chunk: bytes) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except TimeoutError:
                sub.close(DisconnectReason.STALLED)
                raise _Stalled from None
            sub.wrote = True
            sub.bytes_sent += len(chunk)

        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            preamble = f": ssehub\nretry: {config.retry_ms}\n"
            if plan.fresh:
                # An id with no data dispatches nothing but sets the client's last event
                # id, so a reconnect resumes from here even if no event arrived.
                preamble += f"id: {plan.upto}\n"
            first = preamble.encode() + b"\n"
            if plan.reset is not None:
                first += _reset_chunk(plan.reset, plan.upto)
            await write(first)
            if plan.replay_after is not None:
                try:
                    replay = await hub.read_replay(sub.topics, plan.replay_after, plan.upto)
                except HistoryGoneError as exc:
                    await write(_reset_chunk(exc, plan.upto))
                else:
                    for start in range(0, len(replay), REPLAY_PAGE_SIZE):
                        page = replay[start : start + REPLAY_PAGE_SIZE]
                        await write(b"".join(encode(e) for e in page))
                        sub.events_sent += len(page)
            await self._live(sub, write)
            reason = sub.close_reason
            if reason is not None and reason.notify_client:
                await write(disconnect_chunk(reason, hub.retry_hint(reason)))
            if reason is not DisconnectReason.CLIENT_GONE:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except _Stalled:
            # The client stopped reading. Abort the connection when the server lets us
            # (ssehub serve does): a plain close would wait for the buffer to drain.
            transport = scope.get("extensions", {}).get(TRANSPORT_EXTENSION, {}).get("transport")
            if transport is not None:
                transport.abort()
        finally:
            watch.cancel()
            hub.release(sub)
            reason = sub.close_reason or DisconnectReason.CLIENT_GONE
            metrics.stream_closed(reason.value)
            loop = asyncio.get_running_loop()
            access_logger().info(
                "stream.close",
                topics=list(sub.topics),
                client=sub.peer,
                resume_from=self._resume,
                reason=reason.value,
                duration_s=round(loop.time() - sub.opened_at, 3),
                events=sub.events_sent,
                bytes=sub.bytes_sent,
                last_id=str(sub.position),
            )

    async def _live(self, sub: Subscription, write: Callable[[bytes], Awaitable[None]]) -> None:
        hub = self._hub
        metrics = hub.metrics
        while sub.close_reason is None:
            try:
                events, chunks = sub.take(MAX_BATCH_EVENTS)
            except Lagged as lagged:
                reset = hub.handle_lag(sub, lagged)
                if reset is not None:
                    await write(encode_event(reset, event="reset"))
                continue
            if chunks:
                data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
                await write(data)
                sub.events_sent += len(events)
                metrics.delivered(len(events), len(data))
                metrics.latency(time.time() - events[-1].time)
                continue
            if sub.heartbeat_due:
                sub.heartbeat_due = False
                await write(HEARTBEAT)
                continue
            await sub.wait()


def _reset_chunk(exc: HistoryGoneError, current: int) -> bytes:
    return encode_event(reset_data(exc, current), id=str(current), event="reset")


async def _watch_disconnect(receive: Receive, close: Callable[[DisconnectReason], None]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            close(DisconnectReason.CLIENT_GONE)
            return


def refusal_stream(retry_ms: int, event: str, data: dict[str, str]) -> Response:
    """A complete, EventSource-friendly refusal: 200, a ``retry:`` back-off, one event
    and the end (a native EventSource reconnects after ``retry_ms``)."""
    body = encode_comment("ssehub") + encode_event(
        json.dumps(data, separators=(",", ":")), event=event, retry=retry_ms
    )
    headers = {k.decode(): v.decode() for k, v in STREAM_HEADERS}
    return Response(body, status_code=200, headers=headers)
