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
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._broker import encode
from ._channel import DisconnectReason, Lagged, Subscription
from ._exceptions import HistoryGoneError
from ._hub import REPLAY_PAGE_SIZE, lagged_data, reset_data
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

    def __init__(self, hub: Hub, sub: Subscription, plan: ResumePlan) -> None:
        # Response.__init__ is not called on purpose: this response writes its own
        # headers and body; only what Starlette's middleware may read is set.
        self.status_code = 200
        self.background = None
        self.raw_headers = list(STREAM_HEADERS)
        self._hub = hub
        self._sub = sub
        self._plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub, sub, plan = self._hub, self._sub, self._plan
        config = hub.config
        watch = asyncio.ensure_future(_watch_disconnect(receive, sub.close))
        timeout = config.write_timeout or None

        async def write(chunk: bytes) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except TimeoutError:
                sub.close(DisconnectReason.STALLED)
                raise _Stalled from None
            sub.wrote = True

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
            await self._live(sub, write)
            reason = sub.close_reason
            if reason is not None and reason.notify_client:
                await write(disconnect_chunk(reason, hub.retry_hint(reason)))
            if reason is not DisconnectReason.CLIENT_GONE:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except _Stalled:
            logger.info("stream stalled; closing", extra={"peer": sub.peer})
        finally:
            watch.cancel()
            hub.release(sub)

    async def _live(self, sub: Subscription, write: Callable[[bytes], Awaitable[None]]) -> None:
        policy = self._hub.config.slow_policy
        while sub.close_reason is None:
            try:
                _, chunks = sub.take(MAX_BATCH_EVENTS)
            except Lagged:
                if policy == "latest":
                    sub.skip_to_latest()
                    await write(encode_event(lagged_data(sub.position), event="reset"))
                    continue
                sub.close(DisconnectReason.SLOW)
                return
            if chunks:
                await write(b"".join(chunks))
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


def refusal_stream(retry_ms: int, reason: DisconnectReason) -> Response:
    """A complete, EventSource-friendly refusal: 200, a ``retry:`` back-off, one
    ``event: disconnect`` and the end (a native EventSource comes back later)."""
    body = encode_comment("ssehub") + disconnect_chunk(reason, retry_ms)
    headers = {k.decode(): v.decode() for k, v in STREAM_HEADERS}
    return Response(body, status_code=200, headers=headers)
