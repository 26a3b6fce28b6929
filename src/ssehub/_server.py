"""Running the standalone server: uvicorn, plus what an SSE hub needs from it.

* :class:`HubServer` drains the hub's streams on SIGTERM/Ctrl+C (uvicorn waits for open
  responses before the app's shutdown runs, and streams never end by themselves) and
  exits with status 0 after a graceful shutdown.
* :func:`run_hub` runs one hub process; :func:`run_workers` runs several on one port
  (they must share a Redis log).
* :class:`HubHttpToolsProtocol` hands each request's transport and send to the hub
  through a scope extension, so a stream whose client stopped reading is aborted at once
  instead of waiting for a write buffer that never drains, and deliveries skip the
  middleware wrappers around ``send``.
"""

from __future__ import annotations

import contextlib
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
from starlette.types import Message
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ._config import DEFAULT_SHUTDOWN_GRACE
from ._exceptions import ConfigError
from ._hub import Hub
from ._logging import LogFormat
from ._stream import CONNECTION_EXTENSION

logger = logging.getLogger("ssehub.server")

KEEP_ALIVE_TIMEOUT = 65
"""Seconds an idle keep-alive connection is kept; above common proxy/LB idle timeouts."""


class UvicornConnection:
    """What uvicorn's httptools protocol offers a stream beyond ASGI (see
    :class:`ssehub._stream.Connection`): one small object per request."""

    __slots__ = ("cycle",)

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self.cycle = cycle

    def write(self, body: bytes) -> bool:
        """Write one more body chunk of a started, chunked response exactly as uvicorn's
        ``send`` would, but without a coroutine; False when ``send`` would have to wait
        (the socket is full), so the caller falls back to it."""
        cycle = self.cycle
        if cycle.disconnected or cycle.response_complete:
            return True  # uvicorn's send drops the message too
        if cycle.flow.write_paused or not cycle.chunked_encoding:
            return False
        cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True

    def send(self, message: Message) -> Awaitable[None]:
        """uvicorn's own send, skipping the middleware wrappers (body messages only)."""
        return self.cycle.send(message)  # type: ignore[arg-type]

    def abort(self) -> None:
        self.cycle.transport.abort()


class HubHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, adding ``scope["extensions"]["ssehub.connection"]``:
    a :class:`UvicornConnection`, so a stream can write without a coroutine while the
    socket takes it, skip the middleware wrappers around ``send`` for its body, and
    abort a stalled connection instead of waiting for a buffer that never drains."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # The request's task is scheduled, not started: it sees this scope entry.
        extensions = self.scope.setdefault("extensions", {})
        extensions[CONNECTION_EXTENSION] = UvicornConnection(self.cycle)  # type: ignore[assignment]


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
    cors_origins: list[str] = field(default_factory=list)
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
    from ._logging import configure_logging

    configure_logging(options.log_level, options.log_format)
    hub = Hub(options.backend, **options.settings)
    app = create_app(hub, cors_origins=options.cors_origins)
    config = server_config(
        app,
        hub,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        log_config=None,
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
