"""``ssehub serve`` as real processes, for tests that signal, kill or restart them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .helpers import wait_until

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@dataclass
class HubProcess:
    """One ``ssehub serve --port 0 --log-format json`` process, its log in a file."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} log ---\n{self.output()[-chars:]}"

    def records(self) -> list[dict[str, Any]]:
        """The complete JSON lines written so far."""
        text = self.output()
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    async def stop(self, sig: signal.Signals, timeout: float) -> float:
        """Send ``sig``; return the seconds until the process exited."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        await asyncio.wait_for(self.proc.wait(), timeout)
        return time.monotonic() - started


@contextlib.asynccontextmanager
async def hub_processes(
    tmp_path: Path, options: dict[str, list[str]]
) -> AsyncIterator[list[HubProcess]]:
    """Start one ``ssehub serve`` per ``{name: [extra options]}`` (all at once, each on a
    port it picks itself, read from its log), yield them once each answers ``/healthz``;
    every process still running is killed on exit."""
    nodes: list[HubProcess] = []
    try:
        for name, extra in options.items():
            log = tmp_path / f"{name}.log"
            with log.open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "ssehub", "serve", "--port", "0"),
                    *("--log-format", "json", *extra),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=ENV,
                )
            nodes.append(HubProcess(name, proc, log))

        def listening() -> bool:
            for node in nodes:
                assert node.proc.returncode is None, f"serve exited early\n{node.tail()}"
                match = _LISTENING.search(node.output())
                if match:
                    node.port = int(match.group(1))
            return all(node.port for node in nodes)

        await wait_until(listening, 30, "hub processes listening")
        async with httpx.AsyncClient(timeout=5) as http:
            for node in nodes:
                assert (await http.get(f"{node.url}/healthz")).status_code == 200
        yield nodes
    finally:
        for node in nodes:
            if node.proc.returncode is None:
                node.proc.kill()
        for node in nodes:
            await asyncio.wait_for(node.proc.wait(), 10)
