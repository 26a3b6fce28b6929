"""The ``ssehub`` command: ``serve``, ``publish`` and ``tail``."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import click
import httpx

from ._channel import DEFAULT_RING_SIZE
from ._config import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_IDEMPOTENCY_WINDOW,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_REPLAY,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_TOPICS,
    DEFAULT_POLL_THRESHOLD,
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_WRITE_TIMEOUT,
)
from ._logging import LogFormat

DEFAULT_URL = "http://127.0.0.1:8000"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ssehub", prog_name="ssehub")
def main() -> None:
    """ssehub: a Server-Sent Events hub. Publish to topics over HTTP or Python;
    subscribers get every event, and resume with Last-Event-ID after a reconnect."""


def _topic_policy(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    policies: dict[str, str] = {}
    for value in values:
        pattern, sep, policy = value.rpartition("=")
        if not sep or not pattern or policy not in ("disconnect", "latest"):
            raise click.BadParameter(f"{value!r} is not PATTERN=disconnect|latest")
        policies[pattern] = policy
    return policies


def _option(*decls: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An option that also reads SSEHUB_<NAME> from the environment and shows its default."""
    env = "SSEHUB_" + decls[0].lstrip("-").replace("-", "_").upper()
    kwargs.setdefault("show_default", True)
    return click.option(*decls, envvar=env, show_envvar=True, **kwargs)


_url_option = click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    envvar="SSEHUB_URL",
    help="Base URL of the hub.",
)


@main.command()
@_option("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 for all).")
@_option("--port", default=8000, type=int, help="TCP port to listen on (0 picks a free one).")
@_option(
    "--workers",
    default=1,
    type=int,
    help="Worker processes sharing the port; more than one needs --backend redis://.",
)
@_option(
    "--backend",
    default="sqlite:///ssehub.db",
    help="Event log URL: sqlite:///path.db (durable, the default) or memory://. "
    "Retention: ?max_events=N&max_age=SECONDS.",
)
@_option(
    "--log-level",
    default="info",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    help="Logging verbosity.",
)
@_option(
    "--log-format",
    default="auto",
    type=click.Choice(["auto", "json", "console"]),
    help="JSON lines, or readable text (auto: text on a terminal, JSON otherwise).",
)
@_option(
    "--heartbeat",
    default=DEFAULT_HEARTBEAT_INTERVAL,
    type=float,
    help="Seconds between heartbeat comments on idle streams (0 = off).",
)
@_option(
    "--write-timeout",
    default=DEFAULT_WRITE_TIMEOUT,
    type=float,
    help="Seconds one write may block before the stream is closed (0 = no limit).",
)
@_option(
    "--shutdown-grace",
    default=DEFAULT_SHUTDOWN_GRACE,
    type=float,
    help="Seconds to wait for streams to close on shutdown.",
)
@_option(
    "--max-streams",
    default=DEFAULT_MAX_STREAMS,
    type=int,
    help="Open streams per process; more are told to come back later.",
)
@_option(
    "--max-streams-per-ip",
    default=0,
    type=int,
    help="Open streams per client address (0 = no limit; behind a proxy all share one).",
)
@_option("--max-topics", default=DEFAULT_MAX_TOPICS, type=int, help="Topics per subscription.")
@_option(
    "--max-body-size",
    default=DEFAULT_MAX_BODY_SIZE,
    type=int,
    help="Largest publish body in bytes.",
)
@_option(
    "--max-lifetime",
    default=0.0,
    type=float,
    help="Seconds a stream may stay open, jittered 80-100 %, then reconnect (0 = off).",
)
@_option(
    "--slow-policy",
    default="disconnect",
    type=click.Choice(["disconnect", "latest"]),
    help="What a subscriber that falls behind gets: disconnect (resume from the log) "
    "or latest (skip to the newest event after a reset).",
)
@_option(
    "--topic-policy",
    "topic_policies",
    multiple=True,
    callback=_topic_policy,
    show_default=False,
    metavar="PATTERN=POLICY",
    help="Slow policy for topics matching a glob pattern (repeatable), e.g. 'prices.*=latest'.",
)
@_option(
    "--ring-size",
    default=DEFAULT_RING_SIZE,
    type=int,
    help="Recent events kept in memory per subscribed topic.",
)
@_option(
    "--max-replay",
    default=DEFAULT_MAX_REPLAY,
    type=int,
    help="Most events replayed for one resume (beyond: a reset).",
)
@_option(
    "--poll-threshold",
    default=DEFAULT_POLL_THRESHOLD,
    type=float,
    help="Stream utilisation (0-1) from which the capacity endpoint recommends polling.",
)
@_option(
    "--idempotency-window",
    default=DEFAULT_IDEMPOTENCY_WINDOW,
    type=float,
    help="Seconds an Idempotency-Key on publish is remembered.",
)
@click.option(
    "--access-log/--no-access-log",
    default=True,
    envvar="SSEHUB_ACCESS_LOG",
    show_envvar=True,
    show_default=True,
    help="Log a line per request, and per stream one when it opens and one when it "
    "closes (at info level). With very many short-lived connections, turn it off and "
    "watch the metrics instead: the lines cost about a quarter of the streams a "
    "process can open and close per second.",
)
@_option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    show_default=False,
    help="Origin allowed to use the hub from a browser (repeatable); credentials are "
    "allowed for listed origins only.",
)
@_option(
    "--forwarded-allow-ips",
    default=None,
    show_default=False,
    help="Addresses (comma-separated, or * for any) of the proxies whose X-Forwarded-For "
    "and X-Forwarded-Proto the hub believes; default: uvicorn's FORWARDED_ALLOW_IPS "
    "variable, else 127.0.0.1 and ::1. Never * when clients can reach the hub directly.",
)
def serve(
    host: str,
    port: int,
    workers: int,
    backend: str,
    log_level: str,
    log_format: LogFormat,
    heartbeat: float,
    access_log: bool,
    cors_origins: tuple[str, ...],
    forwarded_allow_ips: str | None,
    **settings: Any,
) -> None:
    """Run the hub: the event stream, publish, long-poll, health and metrics endpoints.

    Subscribe with `curl -N 'http://127.0.0.1:8000/events?topic=demo'`; publish with
    `curl -d 'hello' http://127.0.0.1:8000/topics/demo/events`. Every option can also be
    set through the environment variable shown with it.
    """
    from ._exceptions import HubError
    from ._server import HubOptions, run_hub, run_workers

    options = HubOptions(
        host=host,
        port=port,
        backend=backend,
        log_level=log_level,
        log_format=log_format,
        access_log=access_log,
        cors_origins=list(cors_origins),
        forwarded_allow_ips=forwarded_allow_ips,
        settings={"heartbeat_interval": heartbeat, **settings},
    )
    if workers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--workers")
    try:
        options.check(workers)
    except HubError as exc:
        raise click.UsageError(str(exc)) from exc
    code = run_hub(options) if workers == 1 else run_workers(options, workers)
    if code:
        sys.exit(code)


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
@_url_option
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
@_url_option
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


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def loadgen(args: tuple[str, ...]) -> None:
    """Load-test a hub (or any SSE server speaking its API) on this machine.

    Scenarios: idle, fanout, throughput, churn. `ssehub loadgen --help` lists the options.
    """
    from .loadgen import main as loadgen_main

    sys.exit(loadgen_main(list(args)))
