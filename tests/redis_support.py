"""Redis for the backend tests.

Which Redis: ``SSEHUB_TEST_REDIS_URL`` if set, else ``redis://127.0.0.1:6379/0`` if it
answers, else a ``redis-server`` these tests start on a free port. Tests isolate
themselves with a unique key prefix (deleted afterwards), so a shared Redis is safe;
tests that wipe data use :func:`own_redis_url`, a server they started themselves.

Without a usable Redis the tests that need one are skipped, with the reason; with
``SSEHUB_REQUIRE_REDIS=1`` (CI) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from .helpers import free_port

try:
    import redis
except ImportError:  # pragma: no cover - redis-py is a dev dependency
    redis = None  # type: ignore[assignment]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
MIN_VERSION = (6, 2)


def redis_unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when ``SSEHUB_REQUIRE_REDIS=1``."""
    if os.environ.get("SSEHUB_REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason} (and SSEHUB_REQUIRE_REDIS=1)", pytrace=False)
    pytest.skip(reason)


def unique_prefix() -> str:
    return f"ssehub-test-{uuid.uuid4().hex}"


def probe(url: str) -> str | None:
    """``None`` if a usable Redis answers at ``url``, else why not."""
    if redis is None:
        return "redis-py is not installed (pip install -e '.[dev]')"
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        version = str(client.info("server")["redis_version"])
    except redis.RedisError as exc:
        return f"Redis not reachable at {url}: {exc}"
    finally:
        client.close()
    if tuple(int(part) for part in version.split(".")[:2]) < MIN_VERSION:
        return f"Redis at {url} is version {version}; ssehub needs 6.2 or later"
    return None


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (SCAN MATCH + DEL)."""
    assert redis is not None
    with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


class RedisServer:
    """A ``redis-server`` of our own, gone at the end of the test or session.

    Without ``port`` it takes a free one at each start (nothing on disk). With ``port`` it
    keeps that port and ``directory`` across restarts, so a restart finds its files again;
    ``persistent`` adds an append-only file fsynced on every write.
    """

    def __init__(
        self, binary: str, directory: Path, *, port: int | None = None, persistent: bool = False
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.fixed_port = port
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0
        directory.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        # a free port may be taken before the server binds it: try another (unless fixed)
        for _ in range(1 if self.fixed_port else 3):
            port = self.fixed_port or free_port()
            self.starts += 1
            self.url = f"redis://127.0.0.1:{port}/0"
            log = self.directory / f"redis-{port}-{self.starts}.log"
            durability = ["--appendfsync", "always"] if self.persistent else []
            self.process = subprocess.Popen(
                [self.binary, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
                + ["--appendonly", "yes" if self.persistent else "no", *durability]
                + ["--dir", str(self.directory), "--logfile", str(log)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while self.process.poll() is None and time.monotonic() < deadline:
                if probe(self.url) is None:
                    return
                time.sleep(0.02)  # polling a condition, with a deadline
            self.stop()
        raise RuntimeError(f"could not start {self.binary}; see {self.directory}")

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def _own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | str]:
    """A started RedisServer, or the reason there is none (started at first use)."""
    binary = shutil.which("redis-server")
    if redis is None:
        yield "redis-py is not installed (pip install -e '.[dev]')"
        return
    if binary is None:
        yield "no redis-server binary on PATH to start a Redis for the tests"
        return
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        yield f"could not start a redis-server for the tests: {exc}"
        return
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def own_redis_url(request: pytest.FixtureRequest) -> str:
    """A Redis these tests started themselves: destructive tests (FLUSHDB) go here."""
    own = request.getfixturevalue("_own_redis")
    if isinstance(own, str):
        redis_unavailable(own)
    assert isinstance(own, RedisServer)
    return own.url


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """The Redis for non-destructive tests (see the module docstring)."""
    configured = os.environ.get("SSEHUB_TEST_REDIS_URL")
    if configured:
        problem = probe(configured)
        if problem is not None:
            redis_unavailable(f"{problem} (from SSEHUB_TEST_REDIS_URL)")
        return configured
    if probe(DEFAULT_REDIS_URL) is None:
        return DEFAULT_REDIS_URL
    own = request.getfixturevalue("_own_redis")
    if isinstance(own, str):
        redis_unavailable(f"Redis not reachable at {DEFAULT_REDIS_URL}, and {own}")
    assert isinstance(own, RedisServer)
    return own.url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = unique_prefix()
    yield prefix
    delete_prefix(redis_url, prefix)


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start redis-servers of this test's own (to stop or freeze); all stopped afterwards."""
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        binary = shutil.which("redis-server")
        if redis is None or binary is None:
            redis_unavailable("no redis-server binary (or redis-py) to start a Redis with")
        server = RedisServer(binary, tmp_path)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()
