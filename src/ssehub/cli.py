"""The ``ssehub`` command: ``serve``, ``publish`` and ``tail``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import click
import httpx
import uvicorn

from ._hub import Hub

DEFAULT_URL = "http://127.0.0.1:8000"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ssehub", prog_name="ssehub")
def main() -> None:
    """ssehub: a Server-Sent Events hub. Publish to topics over HTTP or Python;
    subscribers get every event, and resume with Last-Event-ID after a reconnect."""


class HubServer(uvicorn.Server):
    """uvicorn's server, which tells the hub to drain its streams on SIGTERM or Ctrl+C
    (uvicorn itself waits for open streams, which never end by themselves)."""

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.hub.begin_drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Handle SIGINT/SIGTERM as a graceful drain and exit with status 0 afterwards
        (uvicorn's own version re-raises the signal once it has shut down)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@main.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar="SSEHUB_HOST",
    help="Interface to listen on (0.0.0.0 for all).",
)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=int,
    envvar="SSEHUB_PORT",
    help="TCP port to listen on (0 picks a free one).",
)
@click.option(
    "--backend",
    default="sqlite:///ssehub.db",
    show_default=True,
    envvar="SSEHUB_BACKEND",
    help="Event log URL: sqlite:///path.db (durable, the default) or memory://.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    envvar="SSEHUB_LOG_LEVEL",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    help="Logging verbosity.",
)
@click.option(
    "--heartbeat",
    default=15.0,
    show_default=True,
    type=float,
    envvar="SSEHUB_HEARTBEAT",
    help="Seconds between heartbeat comments on idle streams (0 = off).",
)
@click.option(
    "--shutdown-grace",
    default=10.0,
    show_default=True,
    type=float,
    envvar="SSEHUB_SHUTDOWN_GRACE",
    help="Seconds to wait for streams to close on shutdown.",
)
def serve(
    host: str, port: int, backend: str, log_level: str, heartbeat: float, shutdown_grace: float
) -> None:
    """Run the hub: an HTTP server with the event stream, publish and health endpoints.

    Subscribe with `curl -N 'http://127.0.0.1:8000/events?topic=demo'`; publish with
    `curl -d 'hello' http://127.0.0.1:8000/topics/demo/events`.
    """
    from ._app import create_app
    from ._exceptions import HubError

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        hub = Hub(backend, heartbeat_interval=heartbeat)
    except HubError as exc:
        raise click.UsageError(str(exc)) from exc
    app = create_app(hub)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=log_level,
        timeout_keep_alive=65,
        # a backstop: the hub drains its own streams within the grace period first
        timeout_graceful_shutdown=max(1, math.ceil(shutdown_grace)),
    )
    server = HubServer(config, hub)
    server.run()
    if not server.started:
        sys.exit(1)


@main.command()
@click.argument("topic")
@click.argument("data")
@click.option("--event", default=None, help="Event name (the SSE `event:` field).")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="DATA is JSON: send it as a JSON value instead of raw text.",
)
@click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    envvar="SSEHUB_URL",
    help="Base URL of the hub.",
)
def publish(topic: str, data: str, event: str | None, as_json: bool, url: str) -> None:
    """Publish DATA to TOPIC and print the new event's id.

    DATA is sent as raw text (several lines become several `data:` lines), or as a JSON
    value with --json.
    """
    from ._exceptions import HubError
    from .client import publish as publish_event

    try:
        if as_json:
            try:
                value = json.loads(data)
            except json.JSONDecodeError as exc:
                raise click.BadParameter(f"not valid JSON: {exc}", param_hint="DATA") from exc
            event_id = asyncio.run(publish_event(url, topic, value, event=event))
        else:
            event_id = asyncio.run(publish_event(url, topic, raw_data=data, event=event))
    except HubError as exc:
        raise click.ClickException(str(exc)) from exc
    except (OSError, httpx.TransportError) as exc:
        raise click.ClickException(f"cannot reach the hub at {url}: {exc}") from exc
    click.echo(event_id)


@main.command()
@click.argument("topics", nargs=-1, required=True)
@click.option(
    "--last-event-id",
    default=None,
    help="Resume after this event id (events after it are replayed first).",
)
@click.option("--json", "as_json", is_flag=True, help="Print each event as one JSON line.")
@click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    envvar="SSEHUB_URL",
    help="Base URL of the hub.",
)
def tail(topics: tuple[str, ...], last_event_id: str | None, as_json: bool, url: str) -> None:
    """Print events of TOPICS as they arrive; reconnects and resumes on its own.

    Each event prints as `ID EVENT DATA` (EVENT is `message` when unnamed). Stop with Ctrl+C.
    """
    from ._exceptions import HubError
    from .client import EventStream

    async def run() -> None:
        async with EventStream(url, list(topics), last_event_id=last_event_id) as stream:
            async for event in stream:
                if as_json:
                    line = json.dumps(
                        {"id": event.id, "event": event.event, "data": event.data},
                        ensure_ascii=False,
                    )
                else:
                    line = f"{event.id} {event.event} {event.data}"
                click.echo(line)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except HubError as exc:
        raise click.ClickException(str(exc)) from exc
