"""Running the standalone server: uvicorn, plus what an SSE hub needs from it.

* :class:`HubServer` drains the hub's streams on SIGTERM/Ctrl+C (uvicorn waits for open
  responses before the app's shutdown runs, and streams never end by themselves) and
  exits with status 0 after a graceful shutdown.
* :class:`HubHttpToolsProtocol` hands each request's transport and send to the hub
  through a scope extension, so a stream whose client stopped reading is aborted at once
  instead of waiting for a write buffer that never drains, and deliveries skip the
  middleware wrappers around ``send``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterator
from functools import partial
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ._hub import Hub
from ._responses import TRANSPORT_EXTENSION

KEEP_ALIVE_TIMEOUT = 65
"""Seconds an idle keep-alive connection is kept; above common proxy/LB idle timeouts."""


def _write_now(cycle: RequestResponseCycle, body: bytes) -> bool:
    """Write one more body chunk of a started, chunked response exactly as uvicorn's
    ``send`` would, but without a coroutine; False when ``send`` would have to wait
    (the socket is full), so the caller falls back to it."""
    if cycle.disconnected or cycle.response_complete:
        return True  # uvicorn's send drops the message too
    if cycle.flow.write_paused or not cycle.chunked_encoding:
        return False
    cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
    return True


class HubHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, adding ``scope["extensions"]["ssehub.transport"]``:
    the transport (to abort a stalled stream), the cycle's own ``send`` (skipping the
    middleware wrappers for body messages of a stream whose start went the normal way)
    and ``write``, which writes a body chunk synchronously while the socket takes it."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # The request's task is scheduled, not started: it sees this scope entry.
        extensions = self.scope.setdefault("extensions", {})
        cycle = self.cycle
        extensions[TRANSPORT_EXTENSION] = {
            "transport": self.transport,
            "send": cycle.send,
            "write": partial(_write_now, cycle),
        }


class HubServer(uvicorn.Server):
    """uvicorn's server, which tells the hub to drain its streams on SIGTERM or Ctrl+C."""

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
