"""Finite endpoints in-process: publish validation, health. Bad input gets a JSON 4xx."""

from __future__ import annotations

from urllib.parse import parse_qsl

import httpx
import hypothesis
import hypothesis.strategies
import pytest
from starlette.requests import Request

from ssehub import Hub, create_app
from ssehub._routes import query_pairs, stream_request


@pytest.fixture
async def hub():
    async with Hub("memory://", heartbeat_interval=0, max_body_size=1024) as hub:
        yield hub


@pytest.fixture
async def client(hub: Hub):
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        yield client


async def test_publish_json_answers_201_with_id_and_topic(client: httpx.AsyncClient, hub: Hub):
    response = await client.post("/topics/a.b:c/d@e_f-g/events", json={"data": [1, "x"]})
    assert response.status_code == 201
    assert response.json() == {"id": str(hub.statistics().head_id), "topic": "a.b:c/d@e_f-g"}
    stored = await hub.event_log.read_after(["a.b:c/d@e_f-g"], hub.event_log.origin(), limit=10)
    assert [(e.data, e.event) for e in stored] == [('[1,"x"]', None)]


async def test_publish_text_body_is_raw_data_with_query_event(client: httpx.AsyncClient, hub: Hub):
    response = await client.post(
        "/topics/t/events?event=note&retry=500",
        content="a\nb",
        headers={"content-type": "text/plain; charset=utf-8"},
    )
    assert response.status_code == 201
    [stored] = await hub.event_log.read_after(["t"], hub.event_log.origin(), limit=10)
    assert (stored.data, stored.event, stored.retry) == ("a\nb", "note", 500)


async def test_ids_increase_across_topics(client: httpx.AsyncClient):
    ids = []
    for topic in ("a", "b", "a", "c"):
        response = await client.post(f"/topics/{topic}/events", json={"data": 1})
        ids.append(int(response.json()["id"]))
    assert ids == sorted(ids) and len(set(ids)) == 4


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code", "detail_part"),
    [
        ("/topics/bad%20name/events", {"json": {"data": 1}}, 400, "invalid_topic", "letters"),
        ("/topics/" + "x" * 201 + "/events", {"json": {"data": 1}}, 400, "invalid_topic", "201"),
        ("/topics/t/events", {"json": {"data": 1, "event": "a\nb"}}, 400, "invalid_event", "CR"),
        ("/topics/t/events", {"json": {"data": 1, "event": "a\rb"}}, 400, "invalid_event", "CR"),
        ("/topics/t/events", {"json": {"data": 1, "event": "a\x00b"}}, 400, "invalid_event", "NUL"),
        ("/topics/t/events", {"json": {"data": 1, "event": ""}}, 400, "invalid_event", "empty"),
        ("/topics/t/events", {"json": {"data": 1, "event": 5}}, 400, "invalid_event", "string"),
        ("/topics/t/events", {"json": {"data": 1, "retry": -1}}, 400, "invalid_event", "retry"),
        ("/topics/t/events", {"json": {"data": 1, "retry": "9"}}, 400, "invalid_event", "retry"),
        ("/topics/t/events", {"json": {"event": "x"}}, 400, "invalid_request", '"data"'),
        ("/topics/t/events", {"json": [1, 2]}, 400, "invalid_request", "object"),
        ("/topics/t/events", {"json": {"data": 1, "id": "7"}}, 400, "invalid_request", "id"),
        (
            "/topics/t/events",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "invalid_request",
            "JSON",
        ),
        (
            "/topics/t/events",
            {"content": b"\xff\xfe", "headers": {"content-type": "text/plain"}},
            400,
            "invalid_request",
            "UTF-8",
        ),
        (
            "/topics/t/events?event=a%0Ab",
            {"content": b"x", "headers": {"content-type": "text/plain"}},
            400,
            "invalid_event",
            "CR",
        ),
        (
            "/topics/t/events",
            {"content": b"x", "headers": {"content-type": "application/octet-stream"}},
            415,
            "unsupported_media_type",
            "octet-stream",
        ),
        (
            "/topics/t/events",
            {"content": b"x" * 1025, "headers": {"content-type": "text/plain"}},
            413,
            "payload_too_large",
            "1024",
        ),
    ],
)
async def test_bad_publish_gets_a_json_4xx_and_stores_nothing(
    client: httpx.AsyncClient, hub: Hub, path, kwargs, status, code, detail_part
):
    head = hub.statistics().head_id
    response = await client.post(path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert detail_part in body["detail"]
    assert hub.statistics().head_id == head  # nothing was published


async def test_oversized_body_without_content_length_is_refused(client: httpx.AsyncClient, hub):
    async def chunks():
        for _ in range(20):
            yield b"x" * 100

    response = await client.post(
        "/topics/t/events", content=chunks(), headers={"content-type": "text/plain"}
    )
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


@pytest.mark.parametrize(
    ("query", "detail_part"),
    [
        ("", "topic"),
        ("?topic=bad%20name", "letters"),
        ("?topic=", "empty"),
        ("?" + "&".join(f"topic=t{i}" for i in range(65)), "limit"),
    ],
)
async def test_bad_subscribe_gets_a_json_400(client: httpx.AsyncClient, hub, query, detail_part):
    response = await client.get("/events" + query)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert detail_part in response.json()["detail"]
    assert hub.statistics().subscribers == 0


async def test_health_endpoints(client: httpx.AsyncClient, hub: Hub):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["head_id"] == str(hub.statistics().head_id)
    await hub.drain(grace=0.1)
    not_ready = await client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["error"] == "unavailable"


async def test_python_publish_validates_like_http(hub: Hub):
    from ssehub import InvalidEventError, InvalidTopicError, PayloadTooLargeError

    with pytest.raises(InvalidTopicError):
        await hub.publish("bad topic", 1)
    with pytest.raises(InvalidEventError):
        await hub.publish("t", 1, event="x\ny")
    with pytest.raises(InvalidEventError):
        await hub.publish("t", 1, event=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidEventError):
        await hub.publish("t", 1, retry=True)
    with pytest.raises(InvalidEventError):
        await hub.publish("t", {1, 2})  # not JSON
    with pytest.raises(InvalidEventError):
        await hub.publish("t", 1, raw_data="x")
    with pytest.raises(PayloadTooLargeError):
        await hub.publish("t", raw_data="x" * 2000)
    stored = await hub.publish("t", raw_data="ok")
    assert stored.data == "ok" and stored.id == hub.statistics().head_id


@hypothesis.given(
    hypothesis.strategies.text(
        alphabet=hypothesis.strategies.sampled_from("ab=&%+;2F0é \x00_-"), max_size=30
    )
)
def test_stream_query_parsing_matches_starlette(query: str) -> None:
    # Every stream parses its query without Starlette's QueryParams; it must read the
    # same pairs (parse_qsl with blank values kept), shortcut or not.
    raw = query.encode("latin-1", errors="replace")
    assert query_pairs(raw) == parse_qsl(raw.decode("latin-1"), keep_blank_values=True)


@pytest.mark.parametrize(
    ("query", "headers", "resume"),
    [
        (b"topic=t", [(b"last-event-id", b"7"), (b"last-event-id", b"8")], "7"),
        (b"topic=t&last_event_id=5&last_event_id=6", [], "6"),
        (b"topic=t&lastEventId=4", [(b"last-event-id", b"")], "4"),
        (b"topic=t&last_event_id=", [], None),
    ],
)
def test_stream_request_reads_the_resume_point_and_topics(
    query: bytes, headers: list[tuple[bytes, bytes]], resume: str | None
) -> None:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/events",
        "query_string": query,
        "headers": headers,
        "client": ("10.0.0.1", 5000),
    }
    request = stream_request(scope)
    assert request.resume == resume
    assert request.topics == Request(scope).query_params.getlist("topic") == ["t"]
    assert (request.peer, request.ip) == ("10.0.0.1:5000", "10.0.0.1")
