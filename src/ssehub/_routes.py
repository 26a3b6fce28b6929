"""The hub's HTTP API as a FastAPI router; one table maps domain errors to statuses."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final, NamedTuple
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ._channel import DisconnectReason
from ._config import DEFAULT_POLL_TIMEOUT
from ._exceptions import (
    BackendUnavailableError,
    CapacityError,
    ClientLimitError,
    HubClosedError,
    HubError,
    InvalidEventError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from ._hub import ResetNotice
from ._logging import access_logger
from ._models import Event
from ._responses import HubStreamResponse, refusal_stream
from ._stream import StreamSubscription

if TYPE_CHECKING:
    from ._hub import Hub

ERROR_STATUS: Final[list[tuple[type[HubError], int]]] = [
    (UnsupportedMediaTypeError, 415),
    (ClientLimitError, 429),
    (CapacityError, 503),
    (InvalidRequestError, 400),
    (PayloadTooLargeError, 413),
    (BackendUnavailableError, 503),
    (HubClosedError, 503),
]
"""Domain error → HTTP status, most specific first; anything else is a 500."""

LAST_EVENT_ID_ALIASES: Final = ("last_event_id", "lastEventID", "lastEventId")
_PUBLISH_FIELDS: Final = {"data", "event", "retry"}


def error_response(exc: HubError) -> JSONResponse:
    status = next((code for cls, code in ERROR_STATUS if isinstance(exc, cls)), 500)
    headers = None
    if isinstance(exc, CapacityError):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    elif status == 503:
        headers = {"Retry-After": "5"}
    return JSONResponse(
        {"error": exc.code, "detail": exc.detail}, status_code=status, headers=headers
    )


class StreamRequest(NamedTuple):
    """What ``GET /events`` (or ``/poll``) asks for, read straight from the ASGI scope."""

    topics: list[str]
    resume: str | None
    peer: str
    ip: str
    accepts_sse: bool


def stream_request(scope: Scope) -> StreamRequest:
    """Parse a stream request the way Starlette's ``Request`` would (first header wins,
    the last of a repeated query parameter wins, ``topic`` may repeat), without building
    one: every stream opened pays for this."""
    pairs = query_pairs(scope["query_string"])
    topics = [value for name, value in pairs if name == "topic"]
    header: str | None = None
    accept: str | None = None
    for name, value in scope["headers"]:
        if name == b"last-event-id":
            if header is None:
                header = value.decode("latin-1")
        elif name == b"accept" and accept is None:
            accept = value.decode("latin-1")
    if not header:
        # clients that cannot set headers (a browser's EventSource opened anew) may
        # give the resume point as a query parameter
        query = dict(pairs)
        header = next((query[name] for name in LAST_EVENT_ID_ALIASES if query.get(name)), None)
    client = scope.get("client")
    return StreamRequest(
        topics,
        header,
        f"{client[0]}:{client[1]}" if client else "",
        client[0] if client else "",
        accept is not None and "text/event-stream" in accept,
    )


def query_pairs(query_string: bytes) -> list[tuple[str, str]]:
    """``parse_qsl(..., keep_blank_values=True)`` as Starlette calls it, with a shortcut
    for the common query that has nothing to unquote."""
    if b"%" in query_string or b"+" in query_string:
        return parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    pairs = []
    for part in query_string.decode("latin-1").split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((name, value))
    return pairs


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes without buffering it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"body is larger than the limit of {limit} bytes")
    return bytes(body)


def parse_publish(body: bytes, content_type: str, query: dict[str, str]) -> dict[str, Any]:
    """Turn a publish request into keyword arguments for :meth:`Hub.prepare`."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequestError(f"body is not valid JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise InvalidRequestError('JSON body must be an object like {"data": ...}')
        unknown = set(payload) - _PUBLISH_FIELDS
        if unknown:
            raise InvalidRequestError(
                f"unknown field(s) {', '.join(sorted(unknown))}; allowed: data, event, retry"
            )
        if "data" not in payload:
            raise InvalidRequestError('JSON body needs a "data" field (any JSON value)')
        # types and values of event and retry are checked by Hub.prepare, for every path
        return {
            "data": payload["data"],
            "event": payload.get("event"),
            "retry": payload.get("retry"),
        }
    if media in ("", "text/plain", "application/x-www-form-urlencoded") or media.startswith(
        "text/"
    ):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"text body is not valid UTF-8: {exc}") from exc
        retry_text = query.get("retry")
        if retry_text is not None and not retry_text.isdigit():
            raise InvalidEventError("retry must be a non-negative integer (milliseconds)")
        return {
            "raw_data": text,
            "event": query.get("event"),
            "retry": None if retry_text is None else int(retry_text),
        }
    raise UnsupportedMediaTypeError(
        f"Content-Type {media!r} is not accepted; send application/json or text/plain"
    )


def refuse_stream(hub: Hub, accepts_sse: bool, exc: HubError) -> Response:
    """Answer a stream request the hub cannot take, by the reconnect contract: a client
    that accepts ``text/event-stream`` gets 200, a ``retry:`` back-off, one event and the
    end (a native EventSource gives up for good on any non-200 answer); others get the
    JSON error (503 or 429 with Retry-After)."""
    if not accepts_sse:
        return error_response(exc)
    if isinstance(exc, HubClosedError):
        reason = DisconnectReason.SHUTDOWN
        return refusal_stream(hub.retry_hint(reason), "disconnect", {"reason": reason.value})
    retry = hub.retry_hint(DisconnectReason.OVERLOADED)
    return refusal_stream(retry, "overloaded", {"reason": exc.code, "detail": exc.detail})


def poll_item(item: Event | ResetNotice) -> dict[str, Any]:
    if isinstance(item, ResetNotice):
        return {"id": str(item.current), "topic": None, "event": "reset", "data": item.data}
    return {
        "id": item.event_id,
        "topic": item.topic,
        "event": item.event or "message",
        "data": item.data,
    }


async def publish_response(hub: Hub, topic: str, request: Request) -> Response:
    """``POST /topics/{topic}/events``: validate, append, answer 201 (or a JSON error)."""
    key = request.headers.get("idempotency-key")
    try:
        if key is not None and not 1 <= len(key) <= 255:
            raise InvalidRequestError("Idempotency-Key must be 1-255 characters")
        body = await read_body(request, hub.config.max_body_size)
        fields = parse_publish(
            body, request.headers.get("content-type", ""), dict(request.query_params)
        )
        stored = await hub.append(hub.prepare(topic, **fields), idempotency_key=key)
    except HubError as exc:
        return error_response(exc)
    return JSONResponse({"id": stored.event_id, "topic": stored.topic}, status_code=201)


class PublishEndpoint:
    """``POST /topics/{topic}/events`` as a bare ASGI app, for the standalone app's fast
    dispatch (the router keeps the FastAPI route, with its OpenAPI entry)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        topic = path[len(TOPICS_PREFIX) : -len(EVENTS_SUFFIX)]
        response = await publish_response(self.hub, topic, Request(scope, receive))
        await response(scope, receive, send)


TOPICS_PREFIX: Final = "/topics/"
EVENTS_SUFFIX: Final = "/events"


class EventsEndpoint:
    """``GET /events``: the SSE stream, as a bare ASGI app (see :func:`build_router`)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function returning the response's coroutine: no frame of its own stays
        # suspended for the stream's lifetime.
        return self.app_for(scope)(scope, receive, send)

    def app_for(self, scope: Scope) -> ASGIApp:
        """What answers this request: the response (:meth:`respond`), or, when the
        resume point is beyond this node's rings (shared log), an app that first waits
        for them to catch up."""
        request = stream_request(scope)
        if self.hub.must_catch_up(request.resume):
            return functools.partial(self._after_catch_up, request)
        return self.respond(request)

    async def _after_catch_up(
        self, request: StreamRequest, scope: Scope, receive: Receive, send: Send
    ) -> None:
        await self.hub.catch_up_to(request.resume)
        await self.respond(request)(scope, receive, send)

    def respond(self, request: StreamRequest) -> Response:
        """The stream (a :class:`HubStreamResponse`), or the answer refusing it."""
        hub = self.hub
        if not request.topics:
            return error_response(
                InvalidRequestError("missing query parameter 'topic' (e.g. /events?topic=demo)")
            )
        try:
            sub, plan = hub.open_subscription(
                request.topics, request.resume, peer=request.peer, ip=request.ip, stream=True
            )
        except (HubClosedError, CapacityError) as exc:
            access_logger().info(
                "stream.refused", topics=request.topics, client=request.peer, reason=exc.code
            )
            return refuse_stream(hub, request.accepts_sse, exc)
        except HubError as exc:
            return error_response(exc)
        assert isinstance(sub, StreamSubscription)
        return HubStreamResponse(hub, sub, plan, request.resume)


def build_router(hub: Hub) -> APIRouter:
    """The HTTP API of ``hub``. Every handler answers errors itself (JSON bodies from
    :data:`ERROR_STATUS`), so the router works in any app without exception handlers."""
    router = APIRouter()

    # A plain ASGI endpoint, not a FastAPI route: a stream lives for hours, and every
    # frame and object the framework keeps alive for it is paid per connection.
    router.routes.append(Route("/events", EventsEndpoint(hub), methods=["GET"]))

    @router.get("/poll", summary="Long-poll fallback: events after last_event_id, as JSON")
    async def poll(request: Request) -> Response:
        wanted = stream_request(request.scope)
        if not wanted.topics:
            return error_response(
                InvalidRequestError("missing query parameter 'topic' (e.g. /poll?topic=demo)")
            )
        raw_timeout = request.query_params.get("timeout", str(DEFAULT_POLL_TIMEOUT))
        try:
            timeout = float(raw_timeout)
            if not 0 <= timeout < float("inf"):
                raise ValueError
        except ValueError:
            return error_response(
                InvalidRequestError(
                    f"timeout must be a number of seconds >= 0, not {raw_timeout!r}"
                )
            )
        try:
            items, position = await hub.poll(
                wanted.topics, last_event_id=wanted.resume, timeout=timeout, peer=wanted.peer
            )
        except HubError as exc:
            return error_response(exc)
        return JSONResponse(
            {"events": [poll_item(item) for item in items], "last_event_id": str(position)},
            headers={"cache-control": "no-store"},
        )

    @router.post(
        "/topics/{topic:path}/events",
        status_code=201,
        summary="Publish an event (JSON {data, event?, retry?} or a text/plain body)",
    )
    async def publish(topic: str, request: Request) -> Response:
        return await publish_response(hub, topic, request)

    @router.get("/health/stream-capacity", summary="Open streams, limits and transport advice")
    async def stream_capacity() -> dict[str, Any]:
        return hub.capacity()

    @router.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness: running, not draining, and the backend answers")
    async def readyz() -> Response:
        try:
            await hub.check_ready()
        except HubError as exc:
            return error_response(exc)
        return JSONResponse({"status": "ready", "head_id": str(hub.statistics().head_id)})

    @router.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        body, content_type = hub.metrics.render()
        return Response(body, media_type=content_type)

    return router
