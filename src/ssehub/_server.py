"""Running the standalone server: uvicorn, plus what an SSE hub needs from it.

* :class:`HubServer` drains the hub's streams on SIGTERM/Ctrl+C (uvicorn waits for open
  responses before the app's shutdown runs, and streams never end by themselves) and
  exits with status 0 after a graceful shutdown.
* :func:`run_hub` runs one hub process; :func:`run_workers` runs several on one port
  (they must share a Redis log).
* :class:`HubHttpToolsProtocol` serves a new stream itself, without ASGI and without a
  task (the first bytes go out with the response head in one write; the fan-out writes
  from then on; the connection-lost callback ends it), and hands every other request's
  transport to the hub through a scope extension, so a stream whose client stopped
  reading is aborted at once and deliveries skip the middleware wrappers around ``send``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Final

import uvicorn
from starlette.types import ASGIApp, Message, Scope
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from ._app import HubApp
from ._config import DEFAULT_SHUTDOWN_GRACE
from ._exceptions import ConfigError
from ._hub import Hub
from ._logging import LogFormat
from ._responses import HubStreamResponse
from ._stream import CONNECTION_EXTENSION

logger = logging.getLogger("ssehub.server")

KEEP_ALIVE_TIMEOUT = 65
"""Seconds an idle keep-alive connection is kept; above common proxy/LB idle timeouts."""


def _chunk(body: bytes) -> bytes:
    """``body`` as one chunk of a chunked HTTP/1.1 body, framed as uvicorn frames it."""
    return b"%x\r\n%b\r\n" % (len(body), body)


_last_body: bytes | None = None
_last_frame = b""


class UvicornConnection:
    """What uvicorn's httptools protocol offers a stream beyond ASGI (see
    :class:`ssehub._stream.Connection`): one small object per request."""

    __slots__ = ("cycle",)

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self.cycle = cycle

    def start(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Start a 200 chunked response with ``body`` as its first chunk, in one write,
        as uvicorn's ``send`` would for ``http.response.start`` then a body (its default
        headers included, its access line not: see :meth:`log_as_stream`); ``headers``
        are lower case and valid."""
        cycle = self.cycle
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        cycle.chunked_encoding = True
        content = [STATUS_LINE[200]]
        for name, value in cycle.default_headers:
            content += (name, b": ", value, b"\r\n")
        for name, value in headers:
            content += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"transfer-encoding: chunked\r\n\r\n", _chunk(body))
        cycle.transport.write(b"".join(content))

    def write(self, body: bytes) -> bool:
        """Write one more body chunk of a started, chunked response exactly as uvicorn's
        ``send`` would, but without a coroutine; False when ``send`` would have to wait
        (the socket is full), so the caller falls back to it."""
        cycle = self.cycle
        if cycle.disconnected or cycle.response_complete:
            return True  # uvicorn's send drops the message too
        if cycle.flow.write_paused or not cycle.chunked_encoding:
            return False
        # The fan-out writes one event's bytes to every subscriber in a row: frame them
        # once (the cache keeps the last body alive, so the identity check is sound).
        global _last_body, _last_frame
        if body is not _last_body:
            _last_frame = _chunk(body)
            _last_body = body
        cycle.transport.write(_last_frame)
        return True

    def finish(self, body: bytes) -> None:
        """Write ``body`` as the last chunk and complete the response, as uvicorn's
        ``send`` would for a final body message (keep-alive and pipelining included)."""
        cycle = self.cycle
        if cycle.disconnected or cycle.response_complete:
            return
        cycle.transport.write((_chunk(body) if body else b"") + b"0\r\n\r\n")
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()

    def log_as_stream(self) -> None:
        """Leave uvicorn's access line out for this request (call before the response
        starts): the stream writes its own, ``stream.open`` and ``stream.close``."""
        self.cycle.access_log = False

    def send(self, message: Message) -> Awaitable[None]:
        """uvicorn's own send, skipping the middleware wrappers (body messages only)."""
        return self.cycle.send(message)  # type: ignore[arg-type]

    def abort(self) -> None:
        self.cycle.transport.abort()


class HubHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, serving streams of a :func:`~ssehub.create_app` app
    without ASGI when it can.

    ``GET /events`` on the standalone app, with no middleware of the user's (and no CORS
    headers to add), is answered right in the parser callback: the hub opens the
    subscription, the head and the first bytes go out in one write, and the stream is
    live; no task, coroutine or event waits for it (a stream that must first replay
    from the log still gets a task). Measured: about three times the connections opened
    and closed per second of the ASGI path. Every other request takes uvicorn's path,
    with ``scope["extensions"]["ssehub.connection"]``: a :class:`UvicornConnection`, so
    a stream can write without a coroutine, skip the middleware wrappers around
    ``send``, and abort a stalled connection instead of waiting for a buffer that never
    drains.
    """

    stream: HubStreamResponse | None = None
    """The stream this connection serves without a task, if any."""

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self.stream = None
        scope = cycle.scope
        if app is self.app and scope["path"] == "/events" and scope["method"] == "GET":
            direct = self._direct_app(scope)  # type: ignore[arg-type]
            if isinstance(direct, HubStreamResponse) and direct.starts_directly:
                self.stream = direct
                direct.start_direct(UvicornConnection(cycle))
                return
            if direct is not None:
                app = direct  # a replay, a refusal, a catch-up first: ordinary ASGI
        # The request's task is created, not started: it sees this scope entry.
        extensions = cycle.scope.setdefault("extensions", {})
        extensions[CONNECTION_EXTENSION] = UvicornConnection(cycle)  # type: ignore[assignment]
        super()._start_asgi_task(cycle, app)

    def _direct_app(self, scope: Scope) -> ASGIApp | None:
        """What answers this ``GET /events`` once the server applied what the app's
        wrappers would (proxy headers), or None: take uvicorn's path."""
        app, proxy = self._hub_app()
        if app is None:
            return None
        has_origin = forwarded = False
        for name, _ in scope["headers"]:
            if name == b"origin":
                has_origin = True
            elif name.startswith(b"x-forwarded-"):
                forwarded = True
        endpoint = app.direct_events(has_origin)
        if endpoint is None:
            return None
        if proxy is not None and forwarded:
            _apply_proxy_headers(proxy, scope)
        return endpoint.app_for(scope)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.end_direct()
            # Break the cycle protocol -> cycle -> on_response -> protocol, as uvicorn's
            # task does when it ends: reference counting then frees the connection.
            self.cycle.on_response = _nothing

    def shutdown(self) -> None:
        # uvicorn ends idle connections and waits for open responses, which streams never
        # end by themselves: drain the hub (once; idempotent) so every stream, with or
        # without a task, gets its goodbye and closes.
        app, _ = self._hub_app()
        if app is not None and self.cycle is not None and not self.cycle.response_complete:
            app.hub.begin_drain()
        super().shutdown()

    def _hub_app(self) -> tuple[HubApp | None, ProxyHeadersMiddleware | None]:
        """The standalone hub app this server runs, and uvicorn's proxy-headers
        middleware around it if any; (None, None) for any other app."""
        app: Any = self.app
        proxy = None
        if isinstance(app, ProxyHeadersMiddleware):
            app, proxy = app.app, app
        return (app, proxy) if isinstance(app, HubApp) else (None, None)


def _nothing() -> None:
    pass


async def _scope_only(scope: Scope, receive: Any, send: Any) -> None:
    pass


def _apply_proxy_headers(proxy: ProxyHeadersMiddleware, scope: Scope) -> None:
    """Edit ``scope`` (client, scheme) as ``proxy`` would before calling the app: by
    running uvicorn's own middleware, with the same trusted hosts, around an app that
    returns at once (the coroutine finishes in one step)."""
    client = scope.get("client")
    if (client[0] if client else None) not in proxy.trusted_hosts:
        return
    with contextlib.suppress(StopIteration):
        _scope_editor(proxy)(scope, None, None).send(None)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=4)
def _scope_editor(proxy: ProxyHeadersMiddleware) -> ProxyHeadersMiddleware:
    editor = ProxyHeadersMiddleware(_scope_only)  # type: ignore[arg-type]
    editor.trusted_hosts = proxy.trusted_hosts
    return editor


class HubServer(uvicorn.Server):
    """uvicorn's server, which tells the hub to drain its streams on SIGTERM or Ctrl+C."""

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.hub.begin_drain()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Everything imported and built so far (FastAPI, pydantic, the app) lives as long
        # as the process: move it out of the cyclic collector's reach, so a full
        # collection walks only what streams and requests create, and its pauses stay
        # short next to the fan-out (a rate ramp at 1,000 streams stalled 80-100 ms with
        # the collector on and not with it off).
        gc.collect()
        gc.freeze()

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


def server_config(app: Any, hub: Hub, **options: Any) -> uvicorn.Config:
    """A uvicorn config for serving ``app`` (which mounts ``hub``): uvloop, httptools with
    the transport extension, keep-alive 65 s, and a graceful-shutdown backstop one second
    after the hub's own drain grace."""
    options.setdefault("loop", "uvloop")
    options.setdefault("http", HubHttpToolsProtocol)
    options.setdefault("lifespan", "on")
    options.setdefault("timeout_keep_alive", KEEP_ALIVE_TIMEOUT)
    options.setdefault(
        "timeout_graceful_shutdown", max(1, math.ceil(hub.config.shutdown_grace) + 1)
    )
    return uvicorn.Config(app, **options)


@dataclass(frozen=True)
class HubOptions:
    """What ``ssehub serve`` was asked to run (picklable, for worker processes)."""

    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "sqlite:///ssehub.db"
    log_level: str = "info"
    log_format: LogFormat = "auto"
    access_log: bool = True
    """Access lines: uvicorn's per request (streams excepted), and the hub's
    stream.open/close/refused."""
    cors_origins: list[str] = field(default_factory=list)
    forwarded_allow_ips: str | None = None
    """Proxies whose X-Forwarded-* headers are believed (None: uvicorn's default)."""
    settings: dict[str, Any] = field(default_factory=dict)

    def check(self, workers: int) -> None:
        """Refuse what cannot work, before anything starts (raises a HubError)."""
        Hub(self.backend, **self.settings)  # validates the URL and every setting; opens nothing
        scheme = self.backend.partition("://")[0]
        if workers > 1 and scheme not in SHARED_SCHEMES:
            raise ConfigError(
                f"--workers {workers} needs an event log that processes share: use "
                f"--backend redis://host:6379/0 ({scheme}:// belongs to one process, and "
                "each worker would hand out its own ids and miss the others' events)"
            )


SHARED_SCHEMES: Final = ("redis", "rediss")


def run_hub(options: HubOptions, sockets: list[socket.socket] | None = None) -> int:
    """Run one hub process until SIGTERM/SIGINT; return its exit status."""
    from ._app import create_app
    from ._logging import configure_logging, skip_caller_lookup

    configure_logging(options.log_level, options.log_format, access_log=options.access_log)
    skip_caller_lookup()
    hub = Hub(options.backend, **options.settings)
    app = create_app(hub, cors_origins=options.cors_origins)
    config = server_config(
        app,
        hub,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        log_config=None,
        access_log=options.access_log,
        forwarded_allow_ips=options.forwarded_allow_ips,  # None: uvicorn's default
    )
    server = HubServer(config, hub)
    server.run(sockets=sockets)
    return 0 if server.started else 1


def _worker(options: HubOptions, sock: socket.socket) -> None:
    sys.exit(run_hub(options, [sock]))


def run_workers(options: HubOptions, workers: int) -> int:
    """Run ``workers`` hub processes on one listening socket (they share a Redis log).

    The parent binds the port, starts the workers, restarts one that dies, and on
    SIGTERM/SIGINT passes the signal on (each worker drains its streams) and waits.
    """
    from ._logging import configure_logging

    configure_logging(options.log_level, options.log_format)
    config = uvicorn.Config("ssehub:create_app", host=options.host, port=options.port)
    sock = config.bind_socket()
    host, port = sock.getsockname()[:2]
    logger.info("ssehub serving", extra={"url": f"http://{host}:{port}", "workers": workers})
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def start() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_worker, args=(options, sock), daemon=False)
        process.start()
        return process

    def stop(sig: int, frame: FrameType | None) -> None:
        stopping.set()

    processes = [start() for _ in range(workers)]
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping.wait(0.5):
            for index, process in enumerate(processes):
                if not process.is_alive() and not stopping.is_set():
                    logger.warning(
                        "worker exited; starting another",
                        extra={"pid": process.pid, "exitcode": process.exitcode},
                    )
                    processes[index] = start()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        grace = float(options.settings.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE)) + 5
        deadline = time.monotonic() + grace
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        sock.close()
    return 0
