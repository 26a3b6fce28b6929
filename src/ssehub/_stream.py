"""Streams as subscriptions that write straight from the fan-out loop.

When an event is published, the fan-out calls each stream's :meth:`StreamSubscription.wake`,
which takes everything pending (merged in id order) and writes it in one ``send`` right
there, stepping the ``send`` coroutine by hand: with uvicorn it finishes without
suspending while the socket is writable, so a delivery costs no task switch. Only when
a socket is full does the send suspend; the stream is then *busy*, its cursor stops while
events keep landing in the ring, and the send is finished by a callback on the future it
waits for, which then writes whatever accumulated. The publisher never waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

from starlette.types import Message, Send

from ._channel import DisconnectReason, Lagged, Subscription
from ._wire import encode_event

if TYPE_CHECKING:
    from ._hub import Hub

logger = logging.getLogger("ssehub.stream")

HEARTBEAT: Final = b":\n\n"
CONNECTION_EXTENSION: Final = "ssehub.connection"
"""Scope extension (``scope["extensions"][CONNECTION_EXTENSION]``) through which a server
hands a stream a :class:`Connection`; ``ssehub serve`` does, other servers need not."""
MAX_BATCH_EVENTS: Final = 1000
"""Most events written in one send when a subscriber has a backlog."""

_SendCoroutine = Coroutine[Any, Any, None]


class Connection(Protocol):
    """What a server may offer a stream beyond ASGI (``ssehub serve`` does)."""

    def start(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Start a 200 chunked response with ``headers`` and ``body`` as its first chunk,
        in one write (a stream served without ASGI)."""

    def finish(self, body: bytes) -> None:
        """Write ``body`` as the last chunk and complete the response (without ASGI)."""

    def write(self, body: bytes) -> bool:
        """Write one body chunk now if the socket takes it; False if ``send`` must wait."""

    def log_as_stream(self) -> None:
        """Leave the server's access line for this request out (before the response
        starts): the stream logs itself (``stream.open``, ``stream.close``)."""

    def send(self, message: Message) -> Awaitable[None]:
        """The server's own ``send`` for body messages (no middleware wrappers)."""

    def abort(self) -> None:
        """Drop the connection at once (a stalled client)."""


class StreamSubscription(Subscription):
    """A subscription that writes to its connection directly from the fan-out loop."""

    __slots__ = (
        "busy",
        "busy_since",
        "connection",
        "hub",
        "live",
        "on_close",
        "parked",
        "send",
        "task",
    )

    def __init__(self, hub: Hub, topics: Sequence[str], position: int, peer: str, ip: str) -> None:
        super().__init__(topics, position, peer, ip)
        self.hub = hub
        self.send: Send | None = None
        self.connection: Connection | None = None
        """The server's extras, if it offers them (ssehub serve does)."""
        self.task: asyncio.Task[Any] | None = None
        self.live = False
        """Replay is done: new events are written as they come."""
        self.parked = False
        """The connection's coroutine waits in ``receive()`` (cancel it to wake it)."""
        self.busy = False
        """A send is suspended on a full socket; nothing else may be sent until it ends."""
        self.busy_since = 0.0
        self.on_close: Callable[[], object] | None = None
        """For a stream served without a task: called (soon) once it must end."""

    # -- called by the fan-out, the ticker and the hub ----------------------------

    def wake(self) -> None:
        """From the fan-out: write what is pending (the hub observes the latency)."""
        if self.live and not self.busy and self.close_reason is None:
            try:
                one = self.take_one()
                if one is None:
                    self.flush()
                else:
                    self.events_sent += 1
                    self.write(one[1])
            except Exception:
                self._failed()

    def catch_up(self) -> None:
        """Outside the fan-out (after a blocked send, when going live): write what is
        pending and observe its publish-to-write latency."""
        if self.live and not self.busy and self.close_reason is None:
            try:
                self.flush(observe=True)
            except Exception:
                self._failed()

    def _failed(self) -> None:
        logger.exception("stream write failed", extra={"client": self.peer})
        self.close(DisconnectReason.ERROR)

    def close(self, reason: DisconnectReason) -> None:
        if self.close_reason is None:
            self.close_reason = reason
            if self.parked and self.task is not None:
                self.task.cancel()
            elif self.on_close is not None:
                # not now: this may run inside the fan-out's loop over the subscribers
                asyncio.get_running_loop().call_soon(self.on_close)

    def heartbeat(self) -> None:
        """Write a heartbeat comment if the stream is live and not blocked."""
        if self.live and not self.busy and self.close_reason is None:
            self.write(HEARTBEAT)

    def flush(self, observe: bool = False) -> None:
        """Write everything pending, now, in as few sends as possible."""
        while self.close_reason is None:
            try:
                events, chunks = self.take(MAX_BATCH_EVENTS)
            except Lagged as lagged:
                reset = self.hub.handle_lag(self, lagged)
                if reset is None or not self.write(encode_event(reset, event="reset")):
                    return
                continue
            if not chunks:
                return
            self.events_sent += len(events)
            if observe:
                self.hub.metrics.latency(time.time() - events[-1].time)
            if not self.write(chunks[0] if len(chunks) == 1 else b"".join(chunks)):
                return
            if len(chunks) < MAX_BATCH_EVENTS:
                return

    def write(self, data: bytes) -> bool:
        """Send ``data``; True when done, False when the socket is full (the send then
        finishes in the background and flushes what accumulated meanwhile)."""
        self.wrote = True
        self.bytes_sent += len(data)
        connection = self.connection
        if connection is not None and connection.write(data):
            return True
        send = connection.send if connection is not None else self.send
        assert send is not None
        coro = send({"type": "http.response.body", "body": data, "more_body": True})
        return self._step(coro)  # type: ignore[arg-type]

    # -- driving a suspended send without a task --------------------------------

    def _step(self, coro: _SendCoroutine, _: object = None) -> bool:
        try:
            waiting = coro.send(None)
        except StopIteration:
            if self.busy:  # a suspended send finished: write what accumulated meanwhile
                self.busy = False
                self.catch_up()
            return True
        except (Exception, asyncio.CancelledError) as exc:  # the send failed: connection gone
            self.busy = False
            logger.debug("send failed: %r", exc)
            self.close(DisconnectReason.CLIENT_GONE)
            return False
        if not self.busy:
            self.busy = True
            self.busy_since = asyncio.get_running_loop().time()
        if waiting is None:  # a bare yield (asyncio.sleep(0)): try again soon
            asyncio.get_running_loop().call_soon(self._step, coro)
        else:
            waiting._asyncio_future_blocking = False
            waiting.add_done_callback(partial(self._step, coro))
        return False
