"""The lean stream response: writes straight from the fan-out, one parked coroutine.

A stream is a :class:`StreamSubscription`: cursors into the topics' rings plus the
connection's ASGI ``send``. When an event is published, the fan-out loop calls each
subscription's :meth:`~StreamSubscription.wake`, which takes everything pending (merged
in id order) and writes it in one ``send`` right there, stepping the ``send`` coroutine
by hand: with uvicorn it finishes without suspending while the socket is writable, so
a delivery costs no task switch. Only when a socket is full does the send suspend; the
subscription is then *busy*, its cursor stops while events keep landing in the ring,
and the send is finished by a callback on the future it waits for, which then writes
whatever accumulated. The publisher never waits for a subscriber.

Meanwhile the connection's own coroutine is parked in the ASGI ``receive()``, which
returns only when the client goes away; the hub wakes it (by cancelling that wait)
when the stream must end: shutdown, slow, stalled or lifetime. Heartbeats and write
timeouts come from the hub's single ticker. Per connection that is one coroutine, one
subscription object and its cursors: no queue, no extra task, no timer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Final

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ._broker import encode
from ._channel import DisconnectReason
from ._exceptions import HistoryGoneError
from ._hub import REPLAY_PAGE_SIZE, reset_data
from ._logging import access_logger
from ._stream import CONNECTION_EXTENSION, StreamSubscription
from ._wire import encode_comment, encode_event

if TYPE_CHECKING:
    from ._hub import Hub, ResumePlan

logger = logging.getLogger("ssehub.stream")

STREAM_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


def disconnect_chunk(reason: DisconnectReason, retry_ms: int) -> bytes:
    """The final ``event: disconnect`` with a reason and a ``retry:`` hint."""
    return encode_event(
        json.dumps({"reason": reason.value}, separators=(",", ":")),
        event="disconnect",
        retry=retry_ms,
    )


class HubStreamResponse(Response):
    """Streams one subscription of ``hub`` as ``text/event-stream``."""

    def __init__(
        self, hub: Hub, sub: StreamSubscription, plan: ResumePlan, resume: str | None
    ) -> None:
        # Response.__init__ is not called on purpose: this response writes its own
        # headers and body; only what Starlette's middleware may read is set.
        self.status_code = 200
        self.background = None
        self.raw_headers = STREAM_HEADERS  # shared: never modified
        self._hub = hub
        self._sub = sub
        self._plan = plan
        self._resume = resume[:64] if resume else resume  # as logged; ids are 19 digits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub, sub, plan = self._hub, self._sub, self._plan
        config = hub.config
        sub.connection = scope.get("extensions", {}).get(CONNECTION_EXTENSION)
        task = sub.task = asyncio.current_task()
        hub.metrics.stream_opened()
        access_logger().info(
            "stream.open", topics=list(sub.topics), client=sub.peer, resume_from=self._resume
        )
        try:
            # a fresh list: a middleware (CORS) may add headers to it in place
            headers = list(STREAM_HEADERS)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            del headers
            preamble = f": ssehub\nretry: {config.retry_ms}\n"
            if plan.fresh:
                # An id with no data dispatches nothing but sets the client's last event
                # id, so a reconnect resumes from here even if no event arrived.
                preamble += f"id: {plan.upto}\n"
            first = preamble.encode() + b"\n"
            if plan.reset is not None:
                first += _reset_chunk(plan.reset, plan.upto)
            # A new connection's socket takes a few dozen bytes at once: no timer needed.
            await send({"type": "http.response.body", "body": first, "more_body": True})
            sub.bytes_sent += len(first)
            if plan.replay_after is not None:
                try:
                    replay = await hub.read_replay(sub.topics, plan.replay_after, plan.upto)
                except HistoryGoneError as exc:
                    await self._write(send, _reset_chunk(exc, plan.upto))
                else:
                    for start in range(0, len(replay), REPLAY_PAGE_SIZE):
                        page = replay[start : start + REPLAY_PAGE_SIZE]
                        await self._write(send, b"".join(encode(e) for e in page))
                        sub.events_sent += len(page)
                    del replay
            # Live: the fan-out writes from now on; this coroutine waits in receive(),
            # which returns when the client leaves; the hub cancels that wait to end the
            # stream (shutdown, slow, stalled, lifetime).
            sub.send = send
            sub.live = True
            sub.catch_up()
            try:
                while sub.close_reason is None:
                    sub.parked = True
                    message = await receive()
                    sub.parked = False
                    if message["type"] == "http.disconnect":
                        sub.close(DisconnectReason.CLIENT_GONE)
            except asyncio.CancelledError:
                sub.parked = False
                if sub.close_reason is None or task is None:
                    raise  # not our wake-up: the server is cancelling the request
                task.uncancel()
            sub.live = False
            await self._finish(sub, send)
        except TimeoutError:
            pass  # stalled while this coroutine was writing: aborted below
        finally:
            sub.live = False
            if sub.close_reason is DisconnectReason.STALLED:
                # The client stopped reading. Abort the connection when the server lets
                # us (ssehub serve does): a plain close would wait for the buffer to drain.
                if sub.connection is not None:
                    sub.connection.abort()
            hub.release(sub)
            self._log_close(sub)

    async def _write(self, send: Send, chunk: bytes) -> None:
        """A write before the stream goes live or after it ended (first bytes, replay,
        the final event), by this coroutine, with the write timeout."""
        sub = self._sub
        message: Message = {"type": "http.response.body", "body": chunk, "more_body": True}
        try:
            async with asyncio.timeout(self._hub.config.write_timeout or None):
                await send(message)
        except TimeoutError:
            sub.close(DisconnectReason.STALLED)
            raise
        sub.wrote = True
        sub.bytes_sent += len(chunk)

    async def _finish(self, sub: StreamSubscription, send: Send) -> None:
        reason = sub.close_reason
        if reason is DisconnectReason.CLIENT_GONE or reason is DisconnectReason.STALLED:
            return
        if sub.busy:
            # A send is still blocked on a full socket: the client reads too slowly to
            # take a goodbye in time. Treat it as stalled (abort) rather than wait.
            sub.close_reason = DisconnectReason.STALLED
            return
        if reason is not None and reason.notify_client:
            await self._write(send, disconnect_chunk(reason, self._hub.retry_hint(reason)))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _log_close(self, sub: StreamSubscription) -> None:
        reason = sub.close_reason or DisconnectReason.CLIENT_GONE
        self._hub.metrics.stream_closed(reason.value)
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


def _reset_chunk(exc: HistoryGoneError, current: int) -> bytes:
    return encode_event(reset_data(exc, current), id=str(current), event="reset")


def refusal_stream(retry_ms: int, event: str, data: dict[str, str]) -> Response:
    """A complete, EventSource-friendly refusal: 200, a ``retry:`` back-off, one event
    and the end (a native EventSource reconnects after ``retry_ms``)."""
    body = encode_comment("ssehub") + encode_event(
        json.dumps(data, separators=(",", ":")), event=event, retry=retry_ms
    )
    headers = {k.decode(): v.decode() for k, v in STREAM_HEADERS}
    return Response(body, status_code=200, headers=headers)
