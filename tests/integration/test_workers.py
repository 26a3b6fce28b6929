"""``ssehub serve --workers N``: several processes on one port, sharing a Redis log."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
from click.testing import CliRunner

from ssehub.cli import main

from ..helpers import SSEStream, open_stream, wait_until

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_workers_without_a_shared_log_are_refused() -> None:
    for backend in ("memory://", "sqlite:///hub.db"):
        result = CliRunner().invoke(main, ["serve", "--workers", "2", "--backend", backend])
        assert result.exit_code == 2
        assert "--workers 2 needs an event log that processes share" in result.output
        assert "redis://" in result.output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_two_workers_share_ids_and_events(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "ssehub", "serve", "--workers", "2", "--port", str(port)),
        *("--backend", f"{redis_url}?prefix={redis_prefix}", "--log-format", "json"),
        *("--heartbeat", "0", "--shutdown-grace", "3"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        env=ENV,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http:

            async def ready() -> bool:
                try:
                    return (await http.get(f"{url}/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            def started() -> int:
                text = (tmp_path / "serve.log").read_text(errors="replace")
                return text.count('"event": "hub started"')

            await wait_until(ready, timeout=30, what="a worker ready")
            await wait_until(lambda: started() == 2, timeout=30, what="both workers started")
            # many streams: the kernel spreads the connections over both workers, and
            # publishes land on either; every stream must get every event, same ids
            async with contextlib_stack(url, 8) as streams:
                ids = []
                for i in range(12):
                    response = await http.post(f"{url}/topics/w/events", json={"data": i})
                    assert response.status_code == 201
                    ids.append(response.json()["id"])
                assert [int(i) for i in ids] == sorted(int(i) for i in ids)
                for stream in streams:
                    assert [e.id for e in await stream.take(12, timeout=10)] == ids
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
    assert proc.returncode == 0


class contextlib_stack:
    """Open ``count`` streams on topic ``w``; close them all on exit."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.count = count
        self._contexts: list[object] = []

    async def __aenter__(self) -> list[SSEStream]:
        streams = []
        for _ in range(self.count):
            context = open_stream(self.url, ["w"])
            stream = await context.__aenter__()
            await stream.read_until_raw(b"\n\n")
            self._contexts.append(context)
            streams.append(stream)
        return streams

    async def __aexit__(self, *exc_info: object) -> None:
        for context in reversed(self._contexts):
            await context.__aexit__(None, None, None)  # type: ignore[attr-defined]
