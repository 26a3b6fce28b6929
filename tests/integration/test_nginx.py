"""The shipped nginx configuration (deploy/nginx/ssehub.conf) in a real nginx, in front of
real ``ssehub serve`` processes.

Each test renders the shipped file itself (only the upstream port and the listen address
change), inside a wrapper nginx.conf that is hostile on purpose: it compresses every
response type and ignores the hub's ``X-Accel-Buffering`` header, so the shipped
directives must do their work on their own. nginx runs as a subprocess on a free port
with every path in the test's tmp dir.

Without nginx the tests skip, unless ``SSEHUB_REQUIRE_NGINX=1`` (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ssehub._config import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_POLL_TIMEOUT,
    DEFAULT_POLL_TIMEOUT,
)
from ssehub._server import KEEP_ALIVE_TIMEOUT

from ..helpers import free_port, open_stream, publish, wait_until
from ..processes import HubProcess, hub_processes

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONF = REPO / "deploy" / "nginx" / "ssehub.conf"

PROMPT = 2.0
"""Seconds within which bytes the hub wrote must have come through nginx. Loopback takes
milliseconds; a buffering nginx holds small events until its buffers fill (never, here)."""

SUBSTITUTIONS = (
    ("server 127.0.0.1:8000;", "server 127.0.0.1:{upstream};"),
    ("listen 80;", "listen 127.0.0.1:{listen};"),
)
"""What the tests change in the shipped file, each exactly once: where the hub and nginx listen."""

OTHER_CLIENT = "127.0.0.2"
"""A client address that differs from nginx's own (127.0.0.1): the hub can only learn it
from X-Forwarded-For."""

HOP_BY_HOP = {"keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


# -- the shipped file, read as nginx reads it -----------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def all(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> list[str]:
        found = self.all(name)
        assert len(found) == 1, f"{self.name} {' '.join(self.args)}: {len(found)} x {name}"
        return found[0].args


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{};]|[^\s{};"\']+')


def parse_nginx(text: str) -> Directive:
    """A minimal nginx config parser: directives, arguments (quotes removed), blocks."""
    text = re.sub(r"#[^\n]*", "", text)  # no quoted '#' in the shipped file
    root = Directive("main", [], [])
    stack = [root]
    words: list[str] = []
    for token in _TOKEN.findall(text):
        if token == ";":
            assert words, "empty directive"
            assert stack[-1].block is not None
            stack[-1].block.append(Directive(words[0], words[1:]))
            words = []
        elif token == "{":
            assert words, "block without a name"
            node = Directive(words[0], words[1:], [])
            assert stack[-1].block is not None
            stack[-1].block.append(node)
            stack.append(node)
            words = []
        elif token == "}":
            assert not words and len(stack) > 1, "unbalanced braces"
            stack.pop()
        else:
            words.append(token[1:-1] if token[0] in "\"'" else token)
    assert len(stack) == 1 and not words, "unterminated config"
    return root


def seconds(value: str) -> float:
    """An nginx time (``60s``, ``1h``, ``500ms``, ``75``) in seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, value
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return int(match.group(1)) * scale


def size(value: str) -> int:
    """An nginx size (``1m``, ``16k``, ``512``) in bytes."""
    match = re.fullmatch(r"(\d+)([kKmMgG])?", value)
    assert match, value
    unit = (match.group(2) or "").lower()
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


def test_shipped_config_matches_the_hubs_defaults() -> None:
    """Runs without nginx: the values the live tests cannot wait for (timeouts of minutes)
    agree with the hub's defaults, and nothing undoes the headers set for every location."""
    config = parse_nginx(SHIPPED_CONF.read_text(encoding="utf-8"))
    (upstream,) = [d for d in config.all("upstream") if d.args == ["ssehub"]]
    assert upstream.one("server") == ["127.0.0.1:8000"]  # what `ssehub serve` listens on
    assert int(upstream.one("keepalive")[0]) >= 1
    # nginx drops idle upstream connections before the hub does (65 s)
    assert seconds(upstream.one("keepalive_timeout")[0]) < KEEP_ALIVE_TIMEOUT

    (server,) = config.all("server")
    assert server.one("proxy_http_version") == ["1.1"]
    headers = {
        args[0].lower(): args[1:] for args in (d.args for d in server.all("proxy_set_header"))
    }
    assert headers["connection"] == [""]
    assert headers["host"] == ["$host"]
    assert headers["x-forwarded-for"] == ["$proxy_add_x_forwarded_for"]
    assert headers["x-forwarded-proto"] == ["$scheme"]
    assert not HOP_BY_HOP & set(headers), headers
    # publish: nginx's limit is the hub's limit, and a body that fits stays in memory
    assert size(server.one("client_max_body_size")[0]) == DEFAULT_MAX_BODY_SIZE
    assert size(server.one("client_body_buffer_size")[0]) >= DEFAULT_MAX_BODY_SIZE

    locations = {tuple(d.args): d for d in server.all("location")}
    for where, location in locations.items():
        assert location.one("proxy_pass") == ["http://ssehub"], where
        # one proxy_set_header in a location would drop every server-level one there
        assert not location.all("proxy_set_header"), where
        assert not location.all("proxy_http_version"), where

    events = locations["=", "/events"]
    assert events.one("proxy_buffering") == ["off"]
    assert events.one("proxy_cache") == ["off"]
    assert events.one("gzip") == ["off"]
    assert events.one("chunked_transfer_encoding") == ["on"]
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        # far above the heartbeat: an idle stream is never cut
        assert seconds(events.one(timeout)[0]) >= 10 * DEFAULT_HEARTBEAT_INTERVAL, timeout

    poll = locations["=", "/poll"]
    # above the default poll timeout and above the longest one the hub allows
    read_timeout = seconds(poll.one("proxy_read_timeout")[0])
    assert read_timeout > DEFAULT_MAX_POLL_TIMEOUT >= DEFAULT_POLL_TIMEOUT

    metrics = locations["=", "/metrics"]
    assert metrics.all("deny")[-1].args == ["all"]


# -- running nginx ---------------------------------------------------------------------


def nginx_binary() -> str:
    """The nginx executable; without one, skip (or fail when SSEHUB_REQUIRE_NGINX=1)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    if os.environ.get("SSEHUB_REQUIRE_NGINX") == "1":
        pytest.fail(
            "SSEHUB_REQUIRE_NGINX=1 but no nginx binary is installed "
            "(Debian: apt-get install -y nginx)",
            pytrace=False,
        )
    pytest.skip("nginx is not installed (apt-get install -y nginx; SSEHUB_REQUIRE_NGINX=1 to fail)")


def render_site(text: str, *, upstream: int, listen: int) -> str:
    """The shipped file with the hub's and nginx's ports put in, nothing else changed."""
    for old, new in SUBSTITUTIONS:
        assert text.count(old) == 1, f"{SHIPPED_CONF} must contain {old!r} exactly once"
        text = text.replace(old, new.format(upstream=upstream, listen=listen))
    return text


def wrapper_conf(prefix: Path, site: Path) -> str:
    """A main nginx.conf around the site config: foreground, every path in ``prefix``."""
    user = ""
    if os.geteuid() == 0:  # workers would run as nobody, who cannot enter the tmp dir
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    return f"""\
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;

    # Hostile on purpose: compress every type, and ignore the hub's X-Accel-Buffering, so
    # only the shipped directives keep the stream unbuffered and uncompressed.
    gzip on;
    gzip_types *;
    gzip_min_length 1;
    proxy_ignore_headers X-Accel-Buffering;

    include {site};
}}
"""


@dataclass
class Nginx:
    binary: str
    prefix: Path
    conf: Path
    site: Path
    port: int
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", f"{self.prefix}/", "-c", str(self.conf), "-e", self.log, *extra]

    @property
    def log(self) -> str:
        return str(self.prefix / "error.log")

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def run(self, *extra: str) -> str:
        """Run nginx with ``extra`` options (``-t``, ``-T``) to the end; its output."""
        proc = await asyncio.create_subprocess_exec(
            *self.command(*extra),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        text = out.decode(errors="replace")
        assert proc.returncode == 0, f"nginx {' '.join(extra)} failed:\n{text}"
        return text


def prepare_nginx(tmp_path: Path, upstream: int, edit: Callable[[str], str] | None = None) -> Nginx:
    binary = nginx_binary()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    site_text = render_site(
        SHIPPED_CONF.read_text(encoding="utf-8"), upstream=upstream, listen=port
    )
    if edit is not None:
        site_text = edit(site_text)
    site = prefix / "ssehub.conf"
    site.write_text(site_text, encoding="utf-8")
    conf = prefix / "nginx.conf"
    conf.write_text(wrapper_conf(prefix, site), encoding="utf-8")
    return Nginx(binary, prefix, conf, site, port)


@contextlib.asynccontextmanager
async def running(nginx: Nginx, tolerate: str = "") -> AsyncIterator[Nginx]:
    """``nginx -t`` (no warning but one containing ``tolerate``), then nginx in the
    foreground until the block ends (fast shutdown)."""
    checked = await nginx.run("-t")
    assert "syntax is ok" in checked and "test is successful" in checked, checked
    warnings = [
        line
        for line in checked.splitlines()
        if "[warn]" in line or "[emerg]" in line
        if not (tolerate and tolerate in line)
    ]
    assert not warnings, checked
    with (nginx.prefix / "stdout.log").open("wb") as out:
        nginx.proc = proc = await asyncio.create_subprocess_exec(
            *nginx.command(), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        async with httpx.AsyncClient(timeout=5) as http:

            async def answers() -> bool:
                assert proc.returncode is None, f"nginx exited\n{nginx.error_log()}"
                try:
                    return (await http.get(f"{nginx.url}/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(answers, 15, "nginx proxies /healthz")
        yield nginx
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@dataclass
class Proxied:
    hub: HubProcess
    nginx: Nginx

    @property
    def url(self) -> str:
        """nginx's address: every request of the tests goes through it."""
        return self.nginx.url

    def records(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.hub.records() if r.get("event") == event]

    def requests(self) -> list[dict[str, Any]]:
        """uvicorn's access lines of the hub (every request but streams)."""
        return [r for r in self.hub.records() if r.get("logger") == "uvicorn.access"]


@contextlib.asynccontextmanager
async def proxied_hub(
    tmp_path: Path,
    *hub_options: str,
    edit: Callable[[str], str] | None = None,
    tolerate: str = "",
) -> AsyncIterator[Proxied]:
    """``ssehub serve`` (memory log, JSON logs) behind nginx running the shipped config
    (changed by ``edit`` for a test that says so)."""
    nginx_binary()  # skip before starting anything
    options = {"hub": ["--backend", "memory://", *hub_options]}
    async with hub_processes(tmp_path, options) as (hub,):
        async with running(prepare_nginx(tmp_path, hub.port, edit), tolerate) as nginx:
            yield Proxied(hub, nginx)


def client(local_address: str | None = None, *, stream: bool = False) -> httpx.AsyncClient:
    """An HTTP/1.1 client; ``stream``: no read timeout (callers bound their reads)."""
    timeout = httpx.Timeout(10.0, read=None) if stream else httpx.Timeout(10.0)
    transport = httpx.AsyncHTTPTransport(local_address=local_address)
    return httpx.AsyncClient(transport=transport, timeout=timeout)


def upstream_connections(hub_port: int) -> dict[int, str]:
    """TCP connections to the hub's port (any state, seen from either end), by the
    connecting side's port: ``{port: state}`` (``01`` established, ``06`` time-wait)."""
    found: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, remote, state = line.split()[1:4]
                local_port = int(local.rsplit(":", 1)[1], 16)
                remote_port = int(remote.rsplit(":", 1)[1], 16)
                if remote_port == hub_port:
                    found[local_port] = state
                elif local_port == hub_port and remote_port:
                    found.setdefault(remote_port, state)
    return found


# -- through nginx: the stream -----------------------------------------------------------


async def test_nginx_runs_the_shipped_file(tmp_path: Path) -> None:
    """The file nginx loads in these tests is deploy/nginx/ssehub.conf with two ports
    put in, and nginx accepts it as it is."""
    assert SHIPPED_CONF.is_file()
    shipped = SHIPPED_CONF.read_text(encoding="utf-8")
    nginx = prepare_nginx(tmp_path, upstream=18000)
    tested = nginx.site.read_text(encoding="utf-8")
    changed = [
        (old.strip(), new.strip())
        for old, new in zip(shipped.splitlines(), tested.splitlines(), strict=True)
        if old != new
    ]
    assert changed == [
        ("server 127.0.0.1:8000;", "server 127.0.0.1:18000;"),
        ("listen 80;", f"listen 127.0.0.1:{nginx.port};"),
    ]
    checked = await nginx.run("-t")
    assert "test is successful" in checked and "[warn]" not in checked, checked
    dump = await nginx.run("-T")  # the configuration as nginx loaded it, file by file
    assert f"# configuration file {nginx.site}:\n{tested}" in dump


async def test_first_bytes_come_through_at_once(tmp_path: Path) -> None:
    """The comment, ``retry:`` and ``id:`` the hub writes on open reach the client before
    any event exists: nginx passes them on instead of waiting for more."""
    async with proxied_hub(tmp_path) as proxy, open_stream(proxy.url, ["t"]) as stream:
        assert stream.response.status_code == 200
        await stream.read_until_raw(b"\n\n", PROMPT)
        assert re.fullmatch(rb": ssehub\nretry: \d+\nid: \d+\n\n", stream.raw), stream.raw
        assert not stream.ended
        await wait_until(lambda: bool(proxy.records("stream.open")), 5, "stream.open logged")
        (opened,) = proxy.records("stream.open")
        assert opened["topics"] == ["t"]


async def test_stream_headers_pass_and_nginx_never_gzips_the_stream(tmp_path: Path) -> None:
    gzip = {"accept-encoding": "gzip"}
    async with proxied_hub(tmp_path) as proxy, client() as http:
        # the wrapper's gzip is live: an ordinary answer is compressed...
        polled = await http.get(
            f"{proxy.url}/poll", params={"topic": "t", "timeout": 0}, headers=gzip
        )
        assert polled.status_code == 200, polled.text
        assert polled.headers.get("content-encoding") == "gzip"
        # ... the stream is not
        async with open_stream(proxy.url, ["t"], headers=gzip) as stream:
            response = stream.response
            assert response.status_code == 200
            assert response.http_version == "HTTP/1.1"
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["cache-control"] == "no-cache, no-transform"
            assert "content-length" not in response.headers
            assert "content-encoding" not in response.headers
            assert response.headers["transfer-encoding"] == "chunked"
            await stream.read_until_raw(b"\n\n", PROMPT)
            assert stream.raw.startswith(b": ssehub\n")  # plain bytes, not a gzip header
            event_id = await publish(http, proxy.url, "t", {"hello": "world"})
            event = await stream.next(PROMPT)
            assert (event.id, event.data) == (event_id, '{"hello":"world"}')


async def test_each_event_comes_through_promptly_and_on_its_own(tmp_path: Path) -> None:
    """Publish one event, wait for it through nginx, then the next: a proxy that holds
    small writes back would never pass the first. A client that leaves ends the hub's
    stream too (nginx closes its upstream connection)."""
    async with proxied_hub(tmp_path) as proxy, client() as http:
        async with open_stream(proxy.url, ["t"]) as stream:
            await stream.read_until_raw(b"\n\n", PROMPT)
            for n in range(5):
                before = len(stream.raw)
                event_id = await publish(http, proxy.url, "t", {"n": n})
                event = await stream.next(PROMPT)
                assert (event.id, json.loads(event.data)) == (event_id, {"n": n})
                # exactly this one event, whole, and nothing else
                assert stream.raw[before:] == f'id: {event_id}\ndata: {{"n":{n}}}\n\n'.encode()

        def closed() -> bool:
            return len(proxy.records("stream.close")) == 1

        await wait_until(closed, 10, "the hub saw the client leave")
        (close,) = proxy.records("stream.close")
        assert (close["reason"], close["events"]) == ("client_gone", 5)


async def test_heartbeats_come_through(tmp_path: Path) -> None:
    async with (
        proxied_hub(tmp_path, "--heartbeat", "0.2") as proxy,
        open_stream(proxy.url, ["t"]) as stream,
    ):
        await stream.read_until_raw(b"\n\n", PROMPT)
        preamble = len(stream.raw)
        # three heartbeat comments in a row, each passed on by itself
        await stream.read_until_raw(b":\n\n:\n\n:\n\n", 5 * PROMPT)
        assert set(bytes(stream.raw[preamble:]).split(b"\n\n")) <= {b":", b""}, stream.raw


async def test_last_event_id_resumes_through_nginx(tmp_path: Path) -> None:
    async with proxied_hub(tmp_path) as proxy, client() as http:
        ids = [await publish(http, proxy.url, "t", n) for n in range(3)]
        # the Last-Event-ID header reaches the hub: a replay of what came after it, then live
        async with open_stream(proxy.url, ["t"], last_event_id=ids[0]) as stream:
            assert [e.id for e in await stream.take(2, PROMPT)] == ids[1:]
            live = await publish(http, proxy.url, "t", 3)
            assert (await stream.next(PROMPT)).id == live
        # the query-string form (an EventSource opened anew) too
        async with open_stream(proxy.url, ["t"], params={"last_event_id": ids[1]}) as stream:
            assert [e.id for e in await stream.take(2, PROMPT)] == [ids[2], live]
        # a resume point the hub cannot honour: an explicit reset, through nginx
        future = str(int(live) + 1000)
        async with open_stream(proxy.url, ["t"], last_event_id=future) as stream:
            assert (await stream.next(PROMPT)).event == "reset"
        await wait_until(lambda: len(proxy.records("stream.open")) == 3, 5, "3 streams logged")
        resumed = [r["resume_from"] for r in proxy.records("stream.open")]
        assert resumed == [ids[0], ids[1], future]


async def test_poll_and_publish_through_nginx(tmp_path: Path) -> None:
    async with proxied_hub(tmp_path) as proxy, client() as http:
        first = await publish(http, proxy.url, "t", {"x": 1}, event="created")  # JSON body
        before = str(int(first) - 1)
        answer = await http.get(
            f"{proxy.url}/poll", params={"topic": "t", "last_event_id": before, "timeout": 0}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "events": [{"id": first, "topic": "t", "event": "created", "data": '{"x":1}'}],
            "last_event_id": first,
        }

        # a long-poll held by the hub is answered through nginx when an event arrives
        held = asyncio.create_task(
            http.get(
                f"{proxy.url}/poll", params={"topic": "t", "last_event_id": first, "timeout": 20}
            )
        )

        async def waiting() -> bool:
            metrics = (await http.get(f"{proxy.hub.url}/metrics")).text
            return re.search(r"^ssehub_subscribers 1(\.0)?$", metrics, re.M) is not None

        await wait_until(waiting, 10, "the long-poll waits in the hub")
        second = await publish(http, proxy.url, "t", "two")
        answer = await asyncio.wait_for(held, PROMPT)
        assert [e["id"] for e in answer.json()["events"]] == [second]

        # the body limits agree: the hub's largest body passes nginx, one byte more does not
        text = {"content-type": "text/plain"}
        url = f"{proxy.url}/topics/big/events"
        largest = await http.post(url, content=b"x" * DEFAULT_MAX_BODY_SIZE, headers=text)
        assert largest.status_code == 201, largest.text
        too_large = await http.post(url, content=b"x" * (DEFAULT_MAX_BODY_SIZE + 1), headers=text)
        assert too_large.status_code == 413
        # refused by nginx itself (its HTML page, not the hub's JSON), before passing it on
        assert too_large.headers["content-type"].startswith("text/html"), too_large.text
        # nginx read the largest publish into memory, not through a temporary file
        assert "buffered to a temporary file" not in proxy.nginx.error_log()


async def test_hub_sees_the_real_client_address(tmp_path: Path) -> None:
    """nginx connects from 127.0.0.1; the client from 127.0.0.2, with a forged
    X-Forwarded-For. The hub (trusting 127.0.0.1 by default) logs 127.0.0.2 for a fresh
    stream (served without ASGI), a resumed one (ASGI) and a publish."""
    forged = {"x-forwarded-for": "203.0.113.7"}
    async with (
        proxied_hub(tmp_path) as proxy,
        client(OTHER_CLIENT) as other,
        client(OTHER_CLIENT, stream=True) as other_streams,
        client() as local,
    ):
        async with open_stream(proxy.url, ["t"], client=other_streams, headers=forged) as fresh:
            await fresh.read_until_raw(b"\n\n", PROMPT)
        published = await other.post(
            f"{proxy.url}/topics/t/events", json={"data": 1}, headers=forged
        )
        assert published.status_code == 201, published.text
        event_id = published.json()["id"]
        resume = str(int(event_id) - 1)
        async with open_stream(
            proxy.url, ["t"], client=other_streams, headers=forged, last_event_id=resume
        ) as resumed:
            assert (await resumed.next(PROMPT)).id == event_id

        def logged() -> bool:
            posts = [r for r in proxy.requests() if r["method"] == "POST"]
            return len(proxy.records("stream.open")) == 2 and len(posts) == 1

        await wait_until(logged, 5, "two stream.open lines and the publish logged")
        clients = [r["client"] for r in proxy.records("stream.open")]
        assert clients == [f"{OTHER_CLIENT}:0", f"{OTHER_CLIENT}:0"]
        (request,) = [r for r in proxy.requests() if r["method"] == "POST"]
        assert request["client_addr"] == f"{OTHER_CLIENT}:0"

        # /metrics answers local monitoring only
        assert (await other.get(f"{proxy.url}/metrics")).status_code == 403
        assert (await local.get(f"{proxy.url}/metrics")).status_code == 200


async def test_requests_reuse_keep_alive_connections_to_the_hub(tmp_path: Path) -> None:
    """HTTP/1.1 upstream with keep-alive: ten requests in a row open no new connection
    (HTTP/1.0, or a "Connection: close", would open one each)."""
    async with proxied_hub(tmp_path) as proxy, client() as http:
        before = upstream_connections(proxy.hub.port)
        for n in range(5):
            await publish(http, proxy.url, "t", n)
            assert (await http.get(f"{proxy.url}/healthz")).status_code == 200
        after = upstream_connections(proxy.hub.port)
        opened = set(after) - set(before)
        assert len(opened) <= 1, (before, after)
        assert "01" in after.values(), after  # one is still open, idle, for the next request
        versions = {r["http_version"] for r in proxy.requests()}
        assert versions == {"1.1"}, proxy.requests()


async def nginx_version(binary: str) -> tuple[int, ...]:
    proc = await asyncio.create_subprocess_exec(
        binary, "-v", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.decode())
    assert match, out
    return tuple(int(part) for part in match.groups())


async def test_http2_clients_get_the_stream(tmp_path: Path) -> None:
    """A client speaking HTTP/2 to nginx (curl, prior knowledge on an extra listen line,
    since TLS is left to the user) gets the same stream; nginx speaks HTTP/1.1 upstream."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    features = await asyncio.create_subprocess_exec(
        curl, "-V", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await features.communicate()
    if b"HTTP2" not in out:
        pytest.skip("curl is built without HTTP/2")
    h2_port = free_port()

    def add_h2_listener(site: str) -> str:
        listen, count = re.subn(
            r"(listen 127\.0\.0\.1:\d+;)", rf"\1 listen 127.0.0.1:{h2_port} http2;", site
        )
        assert count == 1
        return listen

    # the "http2" listen parameter is deprecated (a warning) from nginx 1.25.1 on
    old_style = await nginx_version(nginx_binary()) < (1, 25, 1)
    async with (
        proxied_hub(
            tmp_path, edit=add_h2_listener, tolerate="" if old_style else "is deprecated"
        ) as proxy,
        client() as http,
    ):
        proc = await asyncio.create_subprocess_exec(
            *(curl, "--http2-prior-knowledge", "-sS", "-N", "-v"),
            *("-H", "Accept: text/event-stream", "-H", "Accept-Encoding: gzip"),
            f"http://127.0.0.1:{h2_port}/events?topic=t",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            first = await asyncio.wait_for(proc.stdout.readuntil(b"\n\n"), PROMPT)
            assert re.fullmatch(rb": ssehub\nretry: \d+\nid: \d+\n\n", first), first
            event_id = await publish(http, proxy.url, "t", "over h2")
            event = await asyncio.wait_for(proc.stdout.readuntil(b"\n\n"), PROMPT)
            assert event == f'id: {event_id}\ndata: "over h2"\n\n'.encode()
        finally:
            if proc.returncode is None:
                proc.terminate()
            _, err = await asyncio.wait_for(proc.communicate(), 10)
        head = [line.lower() for line in err.decode(errors="replace").splitlines()]
        assert "< http/2 200" in [line.strip() for line in head], head
        assert "< content-type: text/event-stream; charset=utf-8" in head, head
        assert "< cache-control: no-cache, no-transform" in head, head
        assert not [line for line in head if line.startswith("< content-encoding")], head


# -- backpressure: a client that stops reading -------------------------------------------

SLOW_EVENT = 256 * 1024
"""Bytes of one event in the backpressure tests."""
SLOW_BUDGET = 80
"""Events published (20 MiB): several times what the sockets between the hub and a client
that stopped reading hold (about 8 MiB here)."""
SLOW_OPTIONS = ("--write-timeout", "2")


@contextlib.asynccontextmanager
async def stalled_client(port: int, topic: str) -> AsyncIterator[None]:
    """A stream through nginx (127.0.0.1:``port``) whose client reads the response head
    and then nothing more, with a small receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(
        f"GET /events?topic={topic} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PROMPT)
        assert head.startswith(b"HTTP/1.1 200"), head
        yield  # reads nothing more: asyncio stops reading once 8 KiB wait in its buffer
    finally:
        writer.transport.abort()


async def publish_big_events(proxy: Proxied, http: httpx.AsyncClient) -> None:
    """Publish :data:`SLOW_BUDGET` events of :data:`SLOW_EVENT` bytes to ``slow``."""
    body = b"x" * SLOW_EVENT
    for _ in range(SLOW_BUDGET):
        response = await http.post(
            f"{proxy.url}/topics/slow/events", content=body, headers={"content-type": "text/plain"}
        )
        assert response.status_code == 201, response.text


async def deliveries(proxy: Proxied, http: httpx.AsyncClient) -> float:
    """Events the hub has written to streams (its metrics, asked directly)."""
    metrics = (await http.get(f"{proxy.hub.url}/metrics")).text
    match = re.search(r"^ssehub_deliveries_total (\S+)$", metrics, re.M)
    assert match, metrics
    return float(match.group(1))


async def test_a_client_that_stops_reading_is_seen_by_the_hub(tmp_path: Path) -> None:
    """Unbuffered, nginx reads from the hub only as fast as the client takes: the backlog
    of a client that stopped reading fills the sockets back to the hub, whose write then
    blocks, and the hub drops the stream (``stalled``, after --write-timeout) instead of
    nginx piling it up; the client resumes from the log with Last-Event-ID."""
    async with (
        proxied_hub(tmp_path, *SLOW_OPTIONS) as proxy,
        client() as http,
        stalled_client(proxy.nginx.port, "slow"),
    ):
        await wait_until(lambda: bool(proxy.records("stream.open")), 5, "stream.open logged")
        await publish_big_events(proxy, http)
        await wait_until(lambda: bool(proxy.records("stream.close")), 10, "the hub drops it")
        (close,) = proxy.records("stream.close")
        assert close["reason"] in {"slow", "stalled"}, close
        # the hub wrote only what the sockets hold, far from everything published
        assert close["events"] < SLOW_BUDGET / 2, close
        assert await deliveries(proxy, http) == close["events"]
        assert "buffered to a temporary file" not in proxy.nginx.error_log()


# -- the control: the same harness catches a buffering nginx -----------------------------


async def test_control_a_buffering_nginx_hides_a_slow_client(tmp_path: Path) -> None:
    """The shipped file with ``proxy_buffering on`` instead of ``off`` (the hub's
    X-Accel-Buffering ignored, as in every test here): nginx swallows all the client does
    not read into a temporary file, the hub never sees the client fall behind, and the
    client would get each event as late as its backlog is long. So the test above catches
    a buffering proxy. (With a chunked response and a client that keeps up, nginx 1.22
    passes each chunk on even when buffering: that cannot tell them apart.)"""

    def buffering(site: str) -> str:
        assert site.count("proxy_buffering off;") == 1
        return site.replace("proxy_buffering off;", "proxy_buffering on;")

    async with (
        proxied_hub(tmp_path, *SLOW_OPTIONS, edit=buffering) as proxy,
        client() as http,
        stalled_client(proxy.nginx.port, "slow"),
    ):
        await wait_until(lambda: bool(proxy.records("stream.open")), 5, "stream.open logged")
        await publish_big_events(proxy, http)

        async def all_written() -> bool:
            return await deliveries(proxy, http) == SLOW_BUDGET

        # every event left the hub at once, although the client read none of them
        await wait_until(all_written, 10, "the hub wrote every event")
        assert not proxy.records("stream.close")
        assert "an upstream response is buffered to a temporary file" in proxy.nginx.error_log()
