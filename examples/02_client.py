"""Subscribe with ssehub's Python client, publish one event, print what arrives.

Start a hub first, then run this from the project root::

    ssehub serve                                   # the standalone hub on port 8000
    python examples/02_client.py

    # or against the app of example 01 (its hub is mounted under /sse):
    python examples/02_client.py --url http://127.0.0.1:8000/sse --topic orders

``--count 0`` keeps listening (Ctrl+C to stop): stop and restart the hub meanwhile and
the client reconnects and resumes with Last-Event-ID, missing nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from ssehub.client import EventStream, publish


async def main(url: str, topic: str, count: int = 1) -> None:
    async with EventStream(url, [topic]) as stream:
        events = aiter(stream)
        # Start iterating (this connects), and publish once the subscription is open
        # (a fresh stream starts live: an event published before it would not be sent).
        first = asyncio.ensure_future(anext(events))
        try:
            while stream.connects == 0 and not first.done():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            event_id = await publish(url, topic, {"hello": "world"}, event="greeting")
            print(f"published {event_id}")
            event = await first
        finally:
            first.cancel()
        received = 0
        while True:
            print(f"received id={event.id} event={event.event} data={event.data}")
            received += 1
            if count and received >= count:
                break
            event = await anext(events)
        print(f"resume point: {stream.last_event_id}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the hub's base URL")
    parser.add_argument("--topic", default="demo")
    parser.add_argument("--count", type=int, default=1, help="events to print (0 = forever)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.url, args.topic, args.count))
