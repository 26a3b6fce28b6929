"""Driving ssehub.js from Python: each client in the page records what it reports
(events, resets, opens, reconnects, errors, closes) in ``window.rec[name]``; tests wait on
conditions over that record and read it back."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.async_api import Page

HARNESS = """
async (scriptUrl) => {
  const hub = await import(scriptUrl);
  window.hub = hub;
  window.rec = {};
  window.clients = {};
  window.watch = (name, base, options) => {
    const now = () => performance.now();
    const rec = { events: [], resets: [], opens: [], reconnects: [], errors: [], closes: [] };
    window.rec[name] = rec;
    const client = new hub.SSEHubClient(base, options);
    window.clients[name] = client;
    client.on("*", (e) => rec.events.push({
      id: e.id, event: e.event, data: e.data, topic: e.topic ?? null, t: now(),
    }));
    client.on("reset", (r) => rec.resets.push({
      id: r.id, reason: r.reason, detail: r.detail, currentId: r.currentId, t: now(),
    }));
    client.on("open", (o) => rec.opens.push({ ...o, t: now() }));
    client.on("reconnect", (r) => rec.reconnects.push({ ...r, t: now() }));
    client.on("error", (e) => rec.errors.push({
      fatal: e.fatal, status: e.status ?? null, detail: e.detail, t: now(),
    }));
    client.on("close", (c) => rec.closes.push({ ...c, t: now() }));
  };
}
"""


async def install(page: Page, origin: str, path: str = "/healthz") -> None:
    """Open ``origin + path`` (any page of that origin) and import ``/ssehub.js`` there."""
    response = await page.goto(origin + path)
    assert response is not None and response.ok, f"could not open {origin + path}"
    await page.evaluate(HARNESS, f"{origin}/ssehub.js")


class PageClient:
    """One ``SSEHubClient`` living in the page."""

    def __init__(self, page: Page, name: str) -> None:
        self.page = page
        self.name = name
        self._js_name = json.dumps(name)

    async def wait_for(self, condition: str, timeout: float = 10.0) -> None:
        """Wait until the JavaScript expression ``condition`` is true; it may use ``rec``
        (this client's record) and ``c`` (the client)."""
        await self.page.wait_for_function(
            f"() => {{ const rec = window.rec[{self._js_name}]; "
            f"const c = window.clients[{self._js_name}]; return ({condition}); }}",
            timeout=timeout * 1000,
            polling=20,
        )

    async def record(self) -> dict[str, Any]:
        """Everything the client reported so far, plus its state."""
        result: dict[str, Any] = await self.page.evaluate(
            """(name) => ({
                ...window.rec[name],
                readyState: window.clients[name].readyState,
                lastEventId: window.clients[name].lastEventId,
                dropped: window.clients[name].dropped,
                connects: window.clients[name].connects,
            })""",
            self.name,
        )
        return result

    async def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = (await self.record())["events"]
        return events

    async def close(self) -> None:
        await self.page.evaluate("(name) => window.clients[name].close()", self.name)


async def start_client(page: Page, name: str, base: str, **options: Any) -> PageClient:
    """Create ``new SSEHubClient(base, options)`` in the page (option names as in JS)."""
    await page.evaluate(
        "([name, base, options]) => watch(name, base, options)", [name, base, options]
    )
    return PageClient(page, name)
