"""The dashboard page (``GET /``) in a real Chromium: capacity, live events, publishing."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI

from ssehub import Hub, create_app

from ..helpers import publish, run_server

if TYPE_CHECKING:
    from playwright.async_api import Page

FAST: dict[str, Any] = {"heartbeat_interval": 0, "retry_ms": 100}


async def text_of(page: Page, selector: str) -> str:
    return (await page.locator(selector).inner_text()).strip()


async def wait_text(page: Page, selector: str, wanted: str, timeout: float = 10.0) -> None:
    await page.wait_for_function(
        "([selector, wanted]) => document.querySelector(selector)?.textContent.trim() === wanted",
        arg=[selector, wanted],
        timeout=timeout * 1000,
        polling=20,
    )


async def event_row(page: Page, event_id: str) -> list[str]:
    """The cells (id, topic / event, data, time) of the row showing event ``event_id``."""
    row = page.locator(f'#events tbody tr[data-id="{event_id}"]')
    await row.wait_for()
    cells: list[str] = await row.locator("td").all_inner_texts()
    return cells


async def test_the_page_and_the_script_are_served_with_their_headers(
    http: httpx.AsyncClient,
) -> None:
    async with run_server(Hub("memory://", **FAST)) as server:
        page = await http.get(f"{server.url}/")
        script = await http.get(f"{server.url}/ssehub.js")
        again = await http.get(
            f"{server.url}/ssehub.js", headers={"if-none-match": script.headers["etag"]}
        )
        schema = (await http.get(f"{server.url}/openapi.json")).json()
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    assert "frame-ancestors 'self'" in page.headers["content-security-policy"]
    assert '<script type="module">' in page.text and 'from "./ssehub.js"' in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), "no external URLs"
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.headers["cache-control"] == "public, max-age=600"
    assert "export class SSEHubClient" in script.text
    assert again.status_code == 304 and again.content == b""
    assert "/" not in schema["paths"] and "/ssehub.js" not in schema["paths"]


async def test_the_dashboard_shows_capacity_and_a_published_event_live(
    page: Page, http: httpx.AsyncClient
) -> None:
    hub = Hub("memory://", **FAST, max_streams=40)
    async with run_server(hub) as server:
        await page.goto(f"{server.url}/?topic=demo")
        await wait_text(page, "#watch-state", "open")
        # the page's own stream is the hub's one subscriber; the capacity panel says so
        await wait_text(page, "#cap-subscribers", "1")
        capacity = hub.capacity()
        assert await text_of(page, "#cap-max") == str(capacity["max_subscribers"]) == "40"
        assert await text_of(page, "#cap-utilization") == "2.5 %"
        assert await text_of(page, "#cap-transport") == capacity["recommended_transport"]
        assert await text_of(page, "#cap-accepting") == "yes"

        event_id = await publish(http, server.url, "demo", {"msg": "hi"}, event="greet")
        cells = await event_row(page, event_id)
        assert cells[:3] == [event_id, "demo / greet", '{"msg":"hi"}']
        assert await text_of(page, "#watch-last") == event_id
        await publish(http, server.url, "elsewhere", "not shown")
        second = await publish(http, server.url, "demo", "second")
        assert (await event_row(page, second))[:3] == [second, "demo / message", '"second"']
        assert await page.locator("#events tbody tr").count() == 2


async def test_the_publish_form_publishes_and_shows_errors(
    page: Page, http: httpx.AsyncClient
) -> None:
    async with run_server(Hub("memory://", **FAST)) as server:
        await page.goto(f"{server.url}/")
        await page.fill("#watch-topics", "orders, audit")
        await page.click("#watch-start")
        await wait_text(page, "#watch-state", "open")
        before = str(server.hub.statistics().head_id)
        await page.fill("#publish-topic", "orders")
        await page.fill("#publish-event", "order.created")
        await page.fill("#publish-data", '{"n": 7, "items": ["a"]}')
        await page.click("#publish-send")
        await page.wait_for_function(
            "() => document.querySelector('#publish-result').textContent.startsWith('published')"
        )
        result = await text_of(page, "#publish-result")
        match = re.fullmatch(r"published id (\d+) to orders", result)
        assert match, result
        event_id = match.group(1)
        cells = await event_row(page, event_id)
        assert cells[:3] == [event_id, "order.created", '{"n":7,"items":["a"]}']
        query = {"topic": "orders", "last_event_id": before, "timeout": "0"}
        stored = (await http.get(f"{server.url}/poll", params=query)).json()["events"]
        assert stored == [
            {
                "id": event_id,
                "topic": "orders",
                "event": "order.created",
                "data": '{"n":7,"items":["a"]}',
            }
        ]

        # not JSON: published as a JSON string
        await page.fill("#publish-event", "")
        await page.fill("#publish-data", "plain words")
        await page.click("#publish-send")
        await page.wait_for_function(
            """(previous) => {
                const text = document.querySelector('#publish-result').textContent;
                return text.startsWith('published id') && !text.includes(previous);
            }""",
            arg=event_id,
        )
        plain_id = re.findall(r"\d+", await text_of(page, "#publish-result"))[0]
        assert (await event_row(page, plain_id))[2] == '"plain words"'

        # a bad topic name: the hub's JSON error detail is shown
        expected = await http.post(f"{server.url}/topics/bad topic!/events", json={"data": 1})
        assert expected.status_code == 400
        detail = expected.json()["detail"]
        await page.fill("#publish-topic", "bad topic!")
        await page.click("#publish-send")
        await page.wait_for_function(
            "() => document.querySelector('#publish-result').classList.contains('bad')"
        )
        shown = await text_of(page, "#publish-result")
        assert shown == f"400 {expected.json()['error']}: {detail}"
        head = server.hub.statistics().head_id
    assert str(head) == plain_id, "the bad publish stored nothing"


async def test_the_dashboard_works_behind_a_path_prefix_and_shows_resets(
    page: Page, http: httpx.AsyncClient
) -> None:
    hub = Hub("memory://", **FAST)
    parent = FastAPI(lifespan=hub.lifespan)
    parent.state.hub = hub
    parent.mount("/hub", create_app(hub))
    async with run_server(parent) as server:
        base = f"{server.url}/hub"
        await publish(http, base, "news", "old")
        await page.goto(f"{base}/?topic=news&last_event_id=not-an-id")
        await wait_text(page, "#watch-state", "open")
        await wait_text(page, "#watch-resets", "1")
        current = str(hub.statistics().head_id)
        reset_cells = await event_row(page, current)
        assert reset_cells[1] == "reset"
        assert reset_cells[2].startswith(f"reset (malformed) current id {current}:")
        await wait_text(page, "#cap-subscribers", "1")
        event_id = await publish(http, base, "news", "fresh")
        assert (await event_row(page, event_id))[:3] == [event_id, "news / message", '"fresh"']
