"""The ``ssehub`` command: help and argument errors in-process, one real-process smoke test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from ssehub.cli import main

from ..helpers import free_port

# -- in-process: help texts and argument errors ----------------------------------------


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_main_help_lists_the_commands() -> None:
    code, output = run_cli("--help")
    assert code == 0
    for command in ("serve", "publish", "tail"):
        assert command in output


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (
            "serve",
            ["--host", "--port", "--backend", "--log-level", "--heartbeat", "--shutdown-grace"],
        ),
        ("publish", ["TOPIC", "DATA", "--event", "--json", "--url"]),
        ("tail", ["TOPICS", "--last-event-id", "--json", "--url"]),
    ],
)
def test_command_help_documents_its_options(command: str, options: list[str]) -> None:
    code, output = run_cli(command, "--help")
    assert code == 0
    for option in options:
        assert option in output, f"{command} --help does not mention {option}"
    assert "Usage: " in output


def test_publish_with_invalid_json_is_a_usage_error() -> None:
    code, output = run_cli("publish", "demo", "{not json", "--json", "--url", "http://127.0.0.1:1")
    assert code == 2
    assert "Invalid value for DATA: not valid JSON" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["publish", "demo"], "Missing argument 'DATA'"),
        (["tail"], "Missing argument 'TOPICS...'"),
        (["serve", "--log-level", "loud"], "Invalid value for '--log-level'"),
        (["serve", "--port", "http"], "Invalid value for '--port'"),
        (["serve", "--backend", "nosuch://x"], "unknown backend URL scheme 'nosuch'"),
    ],
)
def test_argument_errors_exit_2_with_a_message(args: list[str], message: str) -> None:
    code, output = run_cli(*args)
    assert code == 2
    assert message in output


def test_publish_to_an_unreachable_hub_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = CliRunner().invoke(main, ["publish", "demo", "hello", "--url", url])
    assert result.exit_code == 1, result.exception
    assert isinstance(result.exception, SystemExit)  # not a traceback
    assert f"cannot reach the hub at {url}" in result.output


# -- one real-process smoke test --------------------------------------------------------

CLI = [sys.executable, "-m", "ssehub"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
ENV.pop("SSEHUB_URL", None)


@contextlib.asynccontextmanager
async def started(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start ``ssehub ARGS``; kill it (if still running) on exit."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env=ENV,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.communicate(), 5)


async def serve(
    port: int, db: Path, stack: contextlib.AsyncExitStack
) -> asyncio.subprocess.Process:
    """``ssehub serve`` on ``port``, returned once ``/healthz`` answers."""
    proc = await stack.enter_async_context(
        started(
            "serve", "--port", str(port), "--backend", f"sqlite:///{db}", "--log-level", "warning"
        )
    )
    deadline = time.monotonic() + 15
    async with httpx.AsyncClient(timeout=1) as http:
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"serve exited early with {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return proc
            if time.monotonic() > deadline:
                raise AssertionError("serve did not answer /healthz within 15 s")
            await asyncio.sleep(0.05)


async def run(*args: str) -> tuple[int, str, str]:
    """Run ``ssehub ARGS`` to completion (at most 15 s)."""
    async with started(*args) as proc:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def read_line(proc: asyncio.subprocess.Process, timeout: float) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        raise EOFError("the process closed its output")
    return line.decode().rstrip("\n")


async def test_serve_publish_tail_and_resume_across_a_restart(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = tmp_path / "hub.db"
    async with contextlib.AsyncExitStack() as stack:
        server = await serve(port, db, stack)
        async with httpx.AsyncClient() as http:
            head = (await http.get(f"{url}/readyz")).json()["head_id"]
        # resuming from the current head, tail gets both events however late it connects
        tail = await stack.enter_async_context(
            started("tail", "demo", "--last-event-id", head, "--url", url)
        )
        code, first_id, err = await run("publish", "demo", "hello", "--url", url)
        assert code == 0, err
        code, second_id, err = await run(
            "publish", "demo", '{"x":1}', "--json", "--event", "tick", "--url", url
        )
        assert code == 0, err
        first_id, second_id = first_id.strip(), second_id.strip()
        assert first_id.isdigit() and int(second_id) > int(first_id) > int(head)
        assert await read_line(tail, 10) == f"{first_id} message hello"
        assert await read_line(tail, 10) == f"{second_id} tick " + '{"x":1}'

        server.send_signal(signal.SIGTERM)
        started_at = time.monotonic()
        await asyncio.wait_for(server.wait(), 5)
        assert time.monotonic() - started_at < 5
        stop_code = server.returncode

        # restart on the same port and file and publish at once: tail is still waiting out
        # the shutdown's retry hint, so these reach it by replay after it reconnects
        await serve(port, db, stack)
        code, third_id, err = await run("publish", "demo", "after restart", "--url", url)
        assert code == 0, err
        code, out, err = await run("publish", "bad topic", "x", "--url", url)
        assert (code, out) == (1, "")
        assert "400" in err and "topic" in err
        code, fourth_id, err = await run("publish", "demo", "last", "--url", url)
        assert code == 0, err
        third_id, fourth_id = third_id.strip(), fourth_id.strip()
        assert int(fourth_id) > int(third_id) > int(second_id)
        # exactly these two, in order: no repeat of the first two, no disconnect line
        assert await read_line(tail, 12) == f"{third_id} message after restart"
        assert await read_line(tail, 10) == f"{fourth_id} message last"
        assert tail.returncode is None

        assert stop_code == 0, f"serve exited with {stop_code} after SIGTERM"
