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
from ._stream import CONNECTION_EXTENSION, Connection, StreamSubscription
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
    """Streams one subscription of ``hub`` as ``text/event-stream``.

    Served two ways: as an ASGI app (:meth:`__call__`: one coroutine, parked in
    ``receive()`` while live), or, by ``ssehub serve`` for a stream with nothing to
    replay, without ASGI and without a task (:meth:`start_direct`): the server writes
    the first bytes at once, the fan-out writes from then on, and the server calls
    :meth:`end_direct` when the client goes.
    """

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
        self._ended = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub, sub, plan = self._hub, self._sub, self._plan
        connection = sub.connection = scope.get("extensions", {}).get(CONNECTION_EXTENSION)
        if connection is not None:
            connection.log_as_stream()
        task = sub.task = asyncio.current_task()
        self._opened()
        try:
            # a fresh list: a middleware (CORS) may add headers to it in place
            headers = list(STREAM_HEADERS)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            del headers
            # A new connection's socket takes a few dozen bytes at once: no timer needed.
            first = self._first_chunk()
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
            goodbye = self._goodbye(sub)
            if goodbye is not None:
                if goodbye:
                    await self._write(send, goodbye)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            pass  # stalled while this coroutine was writing: aborted below
        finally:
            self._end(sub)

    # -- without ASGI (ssehub serve) ------------------------------------------------

    @property
    def starts_directly(self) -> bool:
        """Whether :meth:`start_direct` can serve it: nothing to read from the log first."""
        return self._plan.replay_after is None

    def start_direct(self, connection: Connection) -> None:
        """Start the stream on ``connection`` now: head and first bytes in one write,
        then live. No coroutine waits for it: the hub's ``close`` and the server's
        connection-lost callback end it through :meth:`end_direct`."""
        sub = self._sub
        sub.connection = connection
        sub.on_close = self.end_direct
        self._opened()
        first = self._first_chunk()
        connection.start(STREAM_HEADERS, first)
        sub.bytes_sent += len(first)
        sub.live = True
        sub.catch_up()

    def end_direct(self) -> None:
        """End a stream started by :meth:`start_direct` (idempotent): the goodbye and the
        end of the response when the client is still there, then release and log."""
        if self._ended:
            return
        self._ended = True
        sub = self._sub
        sub.live = False
        sub.on_close = None  # a reference cycle through this response otherwise
        if sub.close_reason is None:
            sub.close_reason = DisconnectReason.CLIENT_GONE  # the server saw it go
        try:
            goodbye = self._goodbye(sub)
            if goodbye is not None and sub.connection is not None:
                sub.bytes_sent += len(goodbye)
                sub.connection.finish(goodbye)
        finally:
            self._end(sub)

    # -- shared ---------------------------------------------------------------------

    def _first_chunk(self) -> bytes:
        """The comment, ``retry:``, for a fresh stream ``id: <head>``, and any reset."""
        plan = self._plan
        preamble = f": ssehub\nretry: {self._hub.config.retry_ms}\n"
        if plan.fresh:
            # An id with no data dispatches nothing but sets the client's last event
            # id, so a reconnect resumes from here even if no event arrived.
            preamble += f"id: {plan.upto}\n"
        first = preamble.encode() + b"\n"
        if plan.reset is not None:
            first += _reset_chunk(plan.reset, plan.upto)
        return first

    def _opened(self) -> None:
        self._hub.metrics.stream_opened()
        log = access_logger()
        if log.enabled():
            sub = self._sub
            log.info(
                "stream.open", topics=list(sub.topics), client=sub.peer, resume_from=self._resume
            )

    def _goodbye(self, sub: StreamSubscription) -> bytes | None:
        """The last body chunk of a stream that ended (``b""``: just end the response),
        or None when nothing more can be sent: the client is gone, or is not reading
        (then the stream counts as stalled and is aborted)."""
        reason = sub.close_reason
        if reason is DisconnectReason.CLIENT_GONE or reason is DisconnectReason.STALLED:
            return None
        if sub.busy:
            # A send is still blocked on a full socket: the client reads too slowly to
            # take a goodbye in time. Treat it as stalled (abort) rather than wait.
            sub.close_reason = DisconnectReason.STALLED
            return None
        if reason is not None and reason.notify_client:
            return disconnect_chunk(reason, self._hub.retry_hint(reason))
        return b""

    def _end(self, sub: StreamSubscription) -> None:
        sub.live = False
        if sub.close_reason is DisconnectReason.STALLED and sub.connection is not None:
            # The client stopped reading. Abort the connection when the server lets us
            # (ssehub serve does): a plain close would wait for the buffer to drain.
            sub.connection.abort()
        self._hub.release(sub)
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

    def _log_close(self, sub: StreamSubscription) -> None:
        reason = sub.close_reason or DisconnectReason.CLIENT_GONE
        self._hub.metrics.stream_closed(reason.value)
        log = access_logger()
        if not log.enabled():
            return
        loop = asyncio.get_running_loop()
        log.info(
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
