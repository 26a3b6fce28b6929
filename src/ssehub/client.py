"""A Python client for ssehub (and any SSE server): reconnects and resumes on its own.

::

    from ssehub.client import EventStream, publish

    async with EventStream("http://localhost:8000", ["demo"]) as stream:
        async for event in stream:
            print(event.id, event.event, event.data)

It follows the hub's reconnect contract: a 200 stream is live; 204 ends the stream;
401, 403 and other 4xx raise :class:`~ssehub.StreamRefusedError` (fix the request);
429, 503, other 5xx and network errors are retried after ``Retry-After`` or the server's
``retry:`` hint (with a growing back-off while failures repeat), resuming with
``Last-Event-ID`` so nothing retained is missed and nothing is delivered twice.

The hub's ``event: disconnect`` (and ``event: overloaded``) are control messages: the
server is closing this stream and says when to come back. The client acts on them
(reconnects after the ``retry:`` hint) and does not yield them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
import weakref
from collections.abc import AsyncGenerator, Sequence
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import httpx

from ._exceptions import StreamProtocolError, StreamRefusedError
from ._wire import ServerEvent, SSEDecoder

__all__ = ["EventStream", "ServerEvent", "publish"]

DEFAULT_RETRY_MS: Final = 3000
MAX_BACKOFF: Final = 30.0
"""Longest wait (seconds) between reconnection attempts of our own choosing."""
MAX_RETRY_AFTER: Final = 300.0
"""Longest ``Retry-After`` (seconds) honoured as given."""
CONTROL_EVENTS: Final = frozenset({"disconnect", "overloaded"})
"""Event types the hub uses to close a stream; handled here, not yielded."""
MIN_DELAY: Final = 0.05
"""Shortest wait (seconds) before reconnecting, even when the server says ``retry: 0``."""
_TIMEOUT: Final = httpx.Timeout(10.0, read=None)


class EventStream:
    """An auto-reconnecting subscription to ``topics`` on the hub at ``base_url``.

    ``base_url`` is the hub's root (``http://host:8000`` or ``http://host/sse`` when the
    router is mounted under a prefix). Iterate to receive :class:`ServerEvent` objects;
    :attr:`last_event_id` is where a later stream would resume (the id of the last event
    handed out, or the stream position the server announced). :attr:`connects` counts
    the successful (200) connections. Set ``reconnect=False`` to end iteration when the
    first connection ends.
    """

    def __init__(
        self,
        base_url: str,
        topics: Sequence[str],
        *,
        last_event_id: str | None = None,
        reconnect: bool = True,
        headers: dict[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if isinstance(topics, str):
            raise TypeError("topics must be a sequence of topic names, not a string")
        if not topics:
            raise ValueError("give at least one topic")
        self.url = base_url.rstrip("/") + "/events"
        self.topics = list(topics)
        self.last_event_id = last_event_id or ""
        self.reconnect = reconnect
        self.retry_ms = DEFAULT_RETRY_MS
        self.connects = 0
        self._headers = httpx.Headers(headers or {})
        self._client = client
        self._own_client = client is None
        self._closed = False
        self._iterators: weakref.WeakSet[AsyncGenerator[ServerEvent, None]] = weakref.WeakSet()

    async def __aenter__(self) -> EventStream:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=_TIMEOUT, follow_redirects=True)
            self._own_client = True
        self._closed = False
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop iterating and close the HTTP client if this stream owns it.

        An iteration suspended between events ends at once; one running in another task
        ends at its next step (the closed client interrupts a pending read).
        """
        self._closed = True
        for iterator in list(self._iterators):
            if not getattr(iterator, "ag_running", False):
                await iterator.aclose()
        if self._own_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def __aiter__(self) -> AsyncGenerator[ServerEvent, None]:
        iterator = self._iterate()
        self._iterators.add(iterator)
        return iterator

    async def _iterate(self) -> AsyncGenerator[ServerEvent, None]:
        opened_here = self._client is None
        if opened_here:
            await self.__aenter__()
        # One decoder for the whole subscription: the last event id and the retry hint
        # carry over from one connection to the next, as in a browser's EventSource.
        decoder = SSEDecoder(self.last_event_id)
        failures = 0
        try:
            while not self._closed:
                connects = self.connects
                delay: float | None = None
                try:
                    async with contextlib.aclosing(self._connect_once(decoder)) as events:
                        async for event in events:
                            yield event
                            if self._closed:
                                return
                except _EndOfStream:
                    return
                except _RetryLater as later:
                    if not self.reconnect:
                        raise StreamRefusedError(later.status_code, later.detail) from None
                    failures += 1
                    delay = later.delay
                except (httpx.TransportError, StreamProtocolError):
                    if self._closed:
                        return
                    if not self.reconnect:
                        raise
                    if self.connects != connects:
                        failures = 0  # the connection worked for a while, then dropped
                    failures += 1
                else:
                    if not self.reconnect:
                        return
                    failures = 0  # the server closed the stream: come back after `retry:`
                finally:
                    decoder.flush()
                if delay is None:
                    delay = self._backoff(failures)
                await asyncio.sleep(max(MIN_DELAY, delay))
        finally:
            if opened_here and self._client is not None:
                client, self._client = self._client, None
                await client.aclose()

    def _backoff(self, failures: int) -> float:
        """The server's ``retry:`` hint, doubled for each further failure, jittered."""
        delay = self.retry_ms / 1000 * float(2 ** max(0, failures - 1))
        return min(MAX_BACKOFF, delay) * random.uniform(0.8, 1.0)

    async def _connect_once(self, decoder: SSEDecoder) -> AsyncGenerator[ServerEvent, None]:
        client = self._client
        if client is None or self._closed:
            return
        headers = httpx.Headers({"accept": "text/event-stream", "cache-control": "no-cache"})
        headers.update(self._headers)
        if self.last_event_id:
            headers["last-event-id"] = self.last_event_id
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("topic", topic) for topic in self.topics
        ]
        request = client.build_request("GET", self.url, params=params, headers=headers)
        response = await client.send(request, stream=True, follow_redirects=True)
        try:
            status = response.status_code
            if status == 204:
                raise _EndOfStream
            if status in (429, 503) or status >= 500:
                await response.aread()
                delay = _retry_after(response.headers.get("retry-after"))
                raise _RetryLater(status, _detail(response), delay)
            if status != 200:
                await response.aread()
                raise StreamRefusedError(status, f"server answered {status}: {_detail(response)}")
            content_type = response.headers.get("content-type", "")
            if not content_type.lower().startswith("text/event-stream"):
                raise StreamProtocolError(f"expected text/event-stream, got {content_type!r}")
            self.connects += 1
            async for chunk in response.aiter_bytes():
                events = decoder.feed(chunk)
                if decoder.retry is not None:
                    self.retry_ms = decoder.retry
                for event in events:
                    if event.event in CONTROL_EVENTS:
                        continue
                    # Set before handing the event out: a consumer that stops here
                    # resumes right after this event, not after the rest of the chunk.
                    self.last_event_id = event.id
                    yield event
                # Blocks that dispatch nothing (an id-only block) still move the position.
                self.last_event_id = decoder.last_event_id
        finally:
            await response.aclose()


class _EndOfStream(Exception):
    """The server answered 204: there is nothing for this client; stop."""


class _RetryLater(Exception):
    def __init__(self, status_code: int, detail: str, delay: float | None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.delay = delay


def _detail(response: httpx.Response) -> str:
    """A short human reason from an error response (the JSON ``detail`` when present)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return str(body["detail"])
    return response.text[:500]


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


async def publish(
    base_url: str,
    topic: str,
    data: Any = None,
    *,
    event: str | None = None,
    raw_data: str | None = None,
    client: httpx.AsyncClient | None = None,
) -> str:
    """Publish one event over HTTP and return its id.

    ``data`` is any JSON value; ``raw_data`` is sent as a text/plain body instead (give
    one or the other). Raises :class:`~ssehub.StreamRefusedError` (with the status code
    and the server's reason) when the hub does not answer 201, and ``httpx`` transport
    errors when it cannot be reached.
    """
    if raw_data is not None and data is not None:
        raise ValueError("give either data (JSON) or raw_data (text), not both")
    url = f"{base_url.rstrip('/')}/topics/{quote(topic, safe='/:@')}/events"
    async with contextlib.AsyncExitStack() as stack:
        http = client
        if http is None:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=10.0))
        if raw_data is not None:
            response = await http.post(
                url,
                content=raw_data.encode(),
                params={"event": event} if event is not None else None,
                headers={"content-type": "text/plain; charset=utf-8"},
            )
        else:
            body: dict[str, Any] = {"data": data}
            if event is not None:
                body["event"] = event
            response = await http.post(url, json=body)
    if response.status_code != 201:
        raise StreamRefusedError(
            response.status_code, f"publish failed ({response.status_code}): {_detail(response)}"
        )
    return str(response.json()["id"])
