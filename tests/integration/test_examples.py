"""The examples run as documented: loaded from their files, served by a real uvicorn."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from ssehub import Hub

from ..helpers import open_stream, run_server, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(filename: str) -> ModuleType:
    """Import an example from its file (its name starts with a digit)."""
    name = "ssehub_example_" + Path(filename).stem
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example_01(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.setenv("SSEHUB_EXAMPLE_DB", str(tmp_path / "example.db"))
    monkeypatch.chdir(tmp_path)  # a default example.db would land here, not in the repo
    yield load("01_mount_in_fastapi.py")
    sys.modules.pop("ssehub_example_01_mount_in_fastapi", None)


async def test_orders_reach_the_hub_stream_and_the_custom_feed(
    example_01: ModuleType, tmp_path: Path
) -> None:
    hub: Hub = example_01.hub
    async with (
        run_server(example_01.app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
        open_stream(server.url + "/sse", ["orders"]) as hub_stream,
        open_stream(server.url, [], path="/me/feed", headers={"x-user": "alice"}) as feed,
    ):
        assert feed.response.status_code == 200
        assert feed.response.headers["content-type"].startswith("text/event-stream")
        await wait_until(lambda: hub.statistics().subscribers == 2, what="both subscribed")

        response = await http.post("/orders", json={"item": "book", "quantity": 2})
        assert response.status_code == 201, response.text
        created = response.json()
        assert created["item"] == "book" and created["quantity"] == 2

        for stream in (hub_stream, feed):
            event = await stream.next()
            assert (event.id, event.event) == (created["event_id"], "order.created")
            assert json.loads(event.data) == {
                "order_id": created["order_id"],
                "item": "book",
                "quantity": 2,
            }
        refused = await http.post("/orders", json={"item": "", "quantity": 0})
        assert refused.status_code == 422
    assert (tmp_path / "example.db").exists()


async def test_custom_feed_resumes_with_last_event_id(example_01: ModuleType) -> None:
    async with (
        run_server(example_01.app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        ids = []
        for item in ("a", "b", "c"):
            response = await http.post("/orders", json={"item": item})
            assert response.status_code == 201, response.text
            ids.append(response.json()["event_id"])
        async with open_stream(
            server.url, [], path="/me/feed", headers={"last-event-id": ids[0]}
        ) as feed:
            replayed = await feed.take(2)
            assert [e.id for e in replayed] == ids[1:]
            assert [json.loads(e.data)["item"] for e in replayed] == ["b", "c"]
            response = await http.post("/orders", json={"item": "d"})
            live = await feed.next()
            # the next event is the new one: nothing replayed twice at the seam
            assert (live.id, json.loads(live.data)["item"]) == (response.json()["event_id"], "d")
        last = response.json()["event_id"]
        # the user's own topic is part of the feed; other users' topics are not
        async with open_stream(
            server.url, [], path="/me/feed", headers={"x-user": "bob", "last-event-id": last}
        ) as feed:
            await wait_until(lambda: example_01.hub.statistics().subscribers == 1)
            await example_01.hub.publish("user:carol", "not for bob")
            note = await example_01.hub.publish("user:bob", "your order shipped", event="note")
            response = await http.post("/orders", json={"item": "e"})
            events = await feed.take(2)
            assert [(e.id, e.event) for e in events] == [
                (note.event_id, "note"),
                (response.json()["event_id"], "order.created"),
            ]
            assert json.loads(events[0].data) == "your order shipped"


async def test_client_example_publishes_and_prints(capsys: pytest.CaptureFixture[str]) -> None:
    example_02 = load("02_client.py")
    async with run_server(Hub("memory://", heartbeat_interval=0)) as server:
        await example_02.main(server.url, "demo", 1)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("published ")
    event_id = out[0].split()[1]
    assert out[1] == f'received id={event_id} event=greeting data={{"hello":"world"}}'
    assert out[2] == f"resume point: {event_id}"
