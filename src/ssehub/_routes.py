"""The hub's HTTP API as a FastAPI router; one table maps domain errors to statuses."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ._channel import DisconnectReason
from ._exceptions import (
    BackendUnavailableError,
    HubClosedError,
    HubError,
    InvalidEventError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from ._responses import HubStreamResponse, refusal_stream

if TYPE_CHECKING:
    from ._hub import Hub

ERROR_STATUS: Final[list[tuple[type[HubError], int]]] = [
    (UnsupportedMediaTypeError, 415),
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
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse(
        {"error": exc.code, "detail": exc.detail}, status_code=status, headers=headers
    )


def last_event_id_of(request: Request) -> str | None:
    """The resume point: the ``Last-Event-ID`` header, else a query parameter alias."""
    value = request.headers.get("last-event-id")
    if value:
        return value
    for name in LAST_EVENT_ID_ALIASES:
        value = request.query_params.get(name)
        if value:
            return value
    return None


def peer_of(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else ""


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
        event = payload.get("event")
        if event is not None and not isinstance(event, str):
            raise InvalidEventError('"event" must be a string')
        retry = payload.get("retry")
        if retry is not None and (isinstance(retry, bool) or not isinstance(retry, int)):
            raise InvalidEventError('"retry" must be a non-negative integer (milliseconds)')
        return {"data": payload["data"], "event": event, "retry": retry}
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


def build_router(hub: Hub) -> APIRouter:
    router = APIRouter()

    @router.get("/events", summary="Subscribe to one or more topics (text/event-stream)")
    async def events(request: Request) -> Response:
        topics = request.query_params.getlist("topic")
        if not topics:
            return error_response(
                InvalidRequestError("missing query parameter 'topic' (e.g. /events?topic=demo)")
            )
        try:
            sub, plan = hub.open_subscription(
                topics, last_event_id_of(request), peer=peer_of(request), stream=True
            )
        except HubClosedError as exc:
            if "text/event-stream" in request.headers.get("accept", ""):
                reason = DisconnectReason.SHUTDOWN
                return refusal_stream(hub.retry_hint(reason), reason)
            return error_response(exc)
        except HubError as exc:
            return error_response(exc)
        return HubStreamResponse(hub, sub, plan)

    @router.post(
        "/topics/{topic:path}/events",
        status_code=201,
        summary="Publish an event (JSON {data, event?, retry?} or a text/plain body)",
    )
    async def publish(topic: str, request: Request) -> Response:
        try:
            body = await read_body(request, hub.config.max_body_size)
            fields = parse_publish(
                body, request.headers.get("content-type", ""), dict(request.query_params)
            )
            stored = await hub.append(hub.prepare(topic, **fields))
        except HubError as exc:
            return error_response(exc)
        return JSONResponse({"id": stored.event_id, "topic": stored.topic}, status_code=201)

    @router.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness: running and the backend answers")
    async def readyz() -> Response:
        try:
            await hub.check_ready()
        except HubError as exc:
            return error_response(exc)
        return JSONResponse({"status": "ready", "head_id": str(hub.statistics().head_id)})

    return router
