"""``ssehub loadgen``: a load generator for an SSE hub on this machine.

It opens many SSE subscribers on raw sockets (``asyncio.Protocol`` on uvloop, minimal
HTTP/1.1 parsing, chunked bodies de-chunked in place) so that the client is not the
bottleneck, publishes events that carry their publish time, and reports how long the
streams took to open, delivery latency, fan-out completion, deliveries per second, events
lost, duplicated or out of order, and (given the server's PID) the server's memory, open
files and CPU per delivery. Subscribers can be spread over several worker processes and
source addresses (127.0.0.x) when one process's open-file limit or one address's ports
are not enough.

Scenarios:

* ``idle``: open N streams, hold them, measure memory and open files per stream.
* ``fanout``: N subscribers, M events one at a time (or at a fixed rate).
* ``throughput``: a publish-rate ramp that finds the highest rate with p99 latency under
  the limit (50 ms) and nothing lost.
* ``churn``: open/close cycles, then the server's memory and open files against the
  baseline.

Only loopback targets are accepted (127.0.0.0/8, ``localhost``, ``::1``): this is a tool
for measuring a hub on the same machine, not for loading other hosts. Every run is
bounded in time (``--timeout``) and in counts.

Use it as ``ssehub loadgen fanout -n 1000 --events 100 --json``, as
``python -m ssehub.loadgen ...``, or from Python::

    report = await run_fanout("http://127.0.0.1:8000", subscribers=1000, events=100)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import json
import math
import multiprocessing
import os
import resource
import secrets
import socket
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import IO, Any, Final, Literal, cast
from urllib.parse import quote, urlsplit

__all__ = [
    "DEFAULT_URL",
    "SCENARIOS",
    "LoadConfig",
    "ProcessSample",
    "StreamParser",
    "UsageError",
    "build_parser",
    "exit_code",
    "format_summary",
    "main",
    "parse_payload",
    "percentile",
    "run",
    "run_churn",
    "run_fanout",
    "run_idle",
    "run_throughput",
    "sample_process",
]

Scenario = Literal["idle", "fanout", "throughput", "churn"]
SCENARIOS: Final[tuple[Scenario, ...]] = ("idle", "fanout", "throughput", "churn")
DEFAULT_URL: Final = "http://127.0.0.1:8000"

STREAMS_PER_ADDRESS: Final = 9000
"""Streams per source address before ``--source-addresses auto`` adds 127.0.0.2, .3, ..."""
FD_HEADROOM: Final = 200
"""Open files a process keeps for itself (pipes, publisher, event loop) besides streams."""
_MAX_GAP_TRACKED: Final = 10_000
"""Missing sequence numbers remembered per subscriber (to tell out-of-order from lost)."""
_CONTROL_EVENTS: Final = (b"overloaded", b"disconnect")


async def _wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


class UsageError(ValueError):
    """A bad option or a refused target (exit status 2)."""


class _NoStreams(RuntimeError):
    def __init__(self, errors: dict[str, int]) -> None:
        super().__init__(f"no stream could be opened ({errors})")


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadConfig:
    """Everything a run needs; the CLI flags map one to one onto these fields."""

    scenario: Scenario = "fanout"
    url: str = DEFAULT_URL
    subscribers: int = 100
    processes: int = 0
    """Worker processes for the subscribers; 0 = automatic (1 unless the open-file limit
    of one process is too small). With 1, subscribers share the publisher's event loop."""
    topic: str = ""
    """Topic to use; empty = a fresh ``loadgen-<random>`` topic per run."""
    source_addresses: tuple[str, ...] = ()
    """Local addresses to connect from, cycled; empty = automatic (127.0.0.1, plus
    127.0.0.2, ... above 9,000 streams per address)."""
    connect_concurrency: int = 200
    connect_timeout: float = 10.0
    events: int = 100
    rate: float = 0.0
    """Events per second for ``fanout``; 0 = publish the next event once the previous one
    reached every subscriber."""
    payload_size: int = 64
    publishers: int = 2
    """Keep-alive HTTP connections used to publish."""
    event_timeout: float = 5.0
    hold: float = 5.0
    rates: tuple[float, ...] = ()
    """Explicit throughput steps; empty = automatic (doubling from ``start_rate``, then
    bisection)."""
    start_rate: float = 100.0
    max_rate: float = 100_000.0
    step_seconds: float = 5.0
    bisect_steps: int = 3
    p99_limit_ms: float = 50.0
    drain_timeout: float = 5.0
    cycles: int = 1000
    concurrency: int = 50
    warmup: int = 300
    server_pid: int | None = None
    timeout: float = 300.0
    progress: bool = False

    def validated(self) -> LoadConfig:
        """Check every field; return a copy with the automatic values filled in."""
        if self.scenario not in SCENARIOS:
            raise UsageError(f"unknown scenario {self.scenario!r}")
        positive_ints = {
            "subscribers": (self.subscribers, 1, 200_000),
            "connect_concurrency": (self.connect_concurrency, 1, 10_000),
            "events": (self.events, 1, 10_000_000),
            "publishers": (self.publishers, 1, 64),
            "cycles": (self.cycles, 1, 10_000_000),
            "concurrency": (self.concurrency, 1, 10_000),
        }
        for name, (value, low, high) in positive_ints.items():
            if not low <= value <= high:
                raise UsageError(f"{name} must be between {low} and {high}, not {value}")
        for name, (value, low, high) in {
            "processes": (self.processes, 0, 64),
            "payload_size": (self.payload_size, 0, 1_000_000),
            "bisect_steps": (self.bisect_steps, 0, 20),
            "warmup": (self.warmup, 0, 1_000_000),
        }.items():
            if not low <= value <= high:
                raise UsageError(f"{name} must be between {low} and {high}, not {value}")
        for name, seconds in {
            "connect_timeout": self.connect_timeout,
            "event_timeout": self.event_timeout,
            "step_seconds": self.step_seconds,
            "drain_timeout": self.drain_timeout,
            "timeout": self.timeout,
            "start_rate": self.start_rate,
            "max_rate": self.max_rate,
            "p99_limit_ms": self.p99_limit_ms,
        }.items():
            if not (seconds > 0 and math.isfinite(seconds)):
                raise UsageError(f"{name} must be a positive number, not {seconds}")
        if not (self.hold >= 0 and math.isfinite(self.hold)):
            raise UsageError("hold must be >= 0 seconds")
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise UsageError("rate must be >= 0 events/s (0 = one event at a time)")
        if any(not (r > 0 and math.isfinite(r)) for r in self.rates):
            raise UsageError("rates must be positive numbers")
        if self.timeout > 24 * 3600:
            raise UsageError("timeout must be at most one day")
        if self.server_pid is not None and not os.path.exists(f"/proc/{self.server_pid}/status"):
            raise UsageError(f"no process with PID {self.server_pid} (--server-pid)")
        target = parse_target(self.url)
        topic = self.topic or f"loadgen-{secrets.token_hex(4)}"
        if not _TOPIC_CHARS.issuperset(topic) or len(topic) > 200:
            raise UsageError(f"invalid topic {topic!r}")
        streams = self.concurrency if self.scenario == "churn" else self.subscribers
        fd_limit = raise_open_file_limit()
        per_process = max(1, fd_limit - FD_HEADROOM)
        processes = self.processes or max(1, math.ceil(streams / per_process))
        if self.scenario == "churn":
            processes = min(processes, self.cycles)
        elif processes > self.subscribers:
            raise UsageError("more processes than subscribers")
        if math.ceil(streams / processes) > per_process:
            raise UsageError(
                f"{math.ceil(streams / processes)} streams per process exceed the open-file "
                f"limit ({fd_limit}); use more --processes"
            )
        addresses = self.source_addresses
        for address in addresses:
            if not _is_loopback_ip(address):
                raise UsageError(f"source address {address!r} is not a loopback address")
            if ":" in address and target.family != socket.AF_INET6:
                raise UsageError(f"source address {address!r} does not match the target")
        if not addresses and target.family == socket.AF_INET:
            count = min(254, max(1, math.ceil(streams / STREAMS_PER_ADDRESS)))
            addresses = tuple(f"127.0.0.{i}" for i in range(1, count + 1)) if count > 1 else ()
        return replace(self, topic=topic, processes=processes, source_addresses=addresses)


_TOPIC_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:@"
)


@dataclass(frozen=True)
class Target:
    """Where the hub listens: a resolved loopback address, the Host header and a path prefix."""

    family: int
    ip: str
    port: int
    host_header: str
    prefix: str


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_target(url: str) -> Target:
    """Parse and check a hub URL; only ``http://`` to a loopback address is accepted."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise UsageError(f"only http:// URLs are supported, not {url!r}")
    host = parts.hostname
    if not host:
        raise UsageError(f"no host in {url!r}")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise UsageError(f"bad port in {url!r}") from exc
    refusal = (
        f"refusing to load {host!r}: only loopback targets (127.0.0.0/8, localhost, ::1) "
        "are allowed"
    )
    if host == "localhost":
        ip = "127.0.0.1"
    elif _is_loopback_ip(host):
        ip = host
    else:
        raise UsageError(refusal)
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    host_header = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    return Target(family, ip, port, host_header, parts.path.rstrip("/"))


def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


# -- the stream parser -----------------------------------------------------------------------


class StreamParser:
    """Sans-IO parser of one SSE response: the HTTP/1.1 head, a chunked (or raw) body and
    ``text/event-stream`` blocks.

    :meth:`feed` takes the bytes as they arrive and returns ``(event type, data)`` for each
    completed event that has data (the type is ``b""`` for unnamed events); comments and
    ``id:``/``retry:`` fields are consumed. :attr:`opened` turns true after the first block
    with any field (the hub's ``retry:``/``id:`` preamble), :attr:`error` says why the
    response is unusable (not 200, not ``text/event-stream``, bad chunking), :attr:`ended`
    that the body ended. Lines end with LF, as the hub writes them.
    """

    __slots__ = ("_chunked", "_head", "_left", "_raw", "_sse", "ended", "error", "opened", "status")

    def __init__(self) -> None:
        self.status = 0
        self.error = ""
        self.opened = False
        self.ended = False
        self._head: bytearray | None = bytearray()
        self._chunked = False
        self._left = 0  # bytes left in the current chunk, including its closing CRLF
        self._raw = b""  # an incomplete chunk-size line
        self._sse = bytearray()  # an incomplete SSE block

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Consume the next bytes of the response; return the events they complete."""
        if self.error or self.ended:
            return []
        if self._head is not None:
            head = self._head
            head += data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > 65536:
                    self.error = "response head too large"
                return []
            data = bytes(head[end + 4 :])
            self._parse_head(bytes(head[:end]))
            self._head = None
            if self.error or not data:
                return []
        body = self._dechunk(data) if self._chunked else data
        if not body:
            return []
        return self._parse_sse(body)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0].split(None, 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
            self.error = "not an HTTP response"
            return
        try:
            self.status = int(status_line[1])
        except ValueError:
            self.error = "not an HTTP response"
            return
        content_type = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-type":
                content_type = value.strip().lower()
            elif name == b"transfer-encoding":
                self._chunked = b"chunked" in value.lower()
        if self.status != 200:
            self.error = f"HTTP {self.status}"
        elif not content_type.startswith(b"text/event-stream"):
            self.error = f"content-type {content_type.decode('latin-1')!r}"

    def _dechunk(self, data: bytes) -> bytes:
        if self._raw:
            data = self._raw + data
            self._raw = b""
        left = self._left
        n = len(data)
        if left == 0:  # the common case: exactly one whole chunk
            eol = data.find(b"\r\n", 0, 18)
            if eol > 0:
                try:
                    size = int(data[:eol], 16)
                except ValueError:
                    size = -1
                if size > 0 and n == eol + size + 4 and data[n - 2 :] == b"\r\n":
                    return data[eol + 2 : n - 2]
        elif left > 2 and n <= left - 2:  # the middle of one chunk
            self._left = left - n
            return data
        out: list[bytes] = []
        pos = 0
        while pos < n:
            if left > 0:
                take = min(left, n - pos)
                payload = min(take, left - 2)
                if payload > 0:
                    out.append(data[pos : pos + payload])
                pos += take
                left -= take
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                self._raw = data[pos:]
                if len(self._raw) > 1024:
                    self.error = "bad chunk size line"
                break
            size_field = data[pos:eol].split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                self.error = "bad chunk size line"
                break
            pos = eol + 2
            if size == 0:
                self.ended = True
                break
            left = size + 2
        self._left = left
        return out[0] if len(out) == 1 else b"".join(out)

    def _parse_sse(self, body: bytes) -> list[tuple[bytes, bytes]]:
        events: list[tuple[bytes, bytes]] = []
        buffer = self._sse
        text: bytes | bytearray
        if buffer:
            buffer += body
            text = buffer
        else:
            text = body
        start = 0
        while True:
            end = text.find(b"\n\n", start)
            if end < 0:
                break
            self._block(text[start:end], events)
            start = end + 2
        if buffer:
            del buffer[:start]
        elif start < len(text):
            buffer += text[start:]
        return events

    def _block(self, block: bytes | bytearray, events: list[tuple[bytes, bytes]]) -> None:
        data: list[bytes] = []
        event_type = b""
        opened = False
        for line in (block if isinstance(block, bytes) else bytes(block)).split(b"\n"):
            if line[:5] == b"data:":
                data.append(line[6:] if line[5:6] == b" " else line[5:])
                opened = True
            elif not line:  # a blank line inside the block (e.g. after "\n\n\n"): dispatch
                if data:
                    events.append((event_type, b"\n".join(data)))
                data = []
                event_type = b""
            elif line[0] != 0x3A:  # not a ':' comment
                opened = True
                if line[:6] == b"event:":
                    event_type = line[7:] if line[6:7] == b" " else line[6:]
                elif line == b"event":
                    event_type = b""
                elif line == b"data":
                    data.append(b"")
        if opened:
            self.opened = True
        if data:
            events.append((event_type, b"\n".join(data)))


def parse_payload(data: bytes) -> tuple[int, int] | None:
    """``(seq, t)`` of a load-generator event's data (``{"seq": n, "t": ns, ...}``)."""
    if data.startswith(b'{"seq":'):
        comma = data.find(b',"t":', 7)
        if comma > 0:
            end = data.find(b",", comma + 5)
            if end < 0:
                end = data.find(b"}", comma + 5)
            try:
                return int(data[7:comma]), int(data[comma + 5 : end])
            except ValueError:
                pass
    try:
        value = json.loads(data)
        return int(value["seq"]), int(value["t"])
    except (ValueError, KeyError, TypeError):
        return None


# -- latency histogram -----------------------------------------------------------------------

_EXACT_US: Final = 1024  # 1 µs buckets below this
_PER_DOUBLING: Final = 128  # above: 128 buckets per doubling (0.54 % wide)
_BUCKETS: Final = _EXACT_US + _PER_DOUBLING * 26


def _bucket_of(latency_ns: int) -> int:
    us = latency_ns // 1000
    if us < _EXACT_US:
        return us if us > 0 else 0
    bucket = _EXACT_US + int((math.log2(us) - 10.0) * _PER_DOUBLING)
    return bucket if bucket < _BUCKETS else _BUCKETS - 1


def _bucket_ms(bucket: int) -> float:
    if bucket < _EXACT_US:
        return (bucket + 0.5) / 1000
    return float(2.0 ** ((bucket - _EXACT_US + 0.5) / _PER_DOUBLING + 10.0) / 1000)


def percentile(histogram: dict[int, int], fraction: float) -> float | None:
    """The nearest-rank ``fraction`` quantile (0-1), in ms, of a latency histogram."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return _bucket_ms(bucket)
    return None  # pragma: no cover


def _summary_ms(histogram: dict[int, int], max_ns: int) -> dict[str, float | None]:
    if not histogram:
        return {"p50": None, "p99": None, "max": None}
    top = max_ns / 1e6
    p50 = percentile(histogram, 0.5)
    p99 = percentile(histogram, 0.99)
    return {
        "p50": _round(min(p50, top) if p50 is not None else None),
        "p99": _round(min(p99, top) if p99 is not None else None),
        "max": _round(top),
    }


def _exact_summary_ms(values_ns: Sequence[int]) -> dict[str, float | None]:
    if not values_ns:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values_ns)

    def rank(fraction: float) -> float:
        return ordered[max(1, math.ceil(fraction * len(ordered))) - 1] / 1e6

    return {
        "p50": _round(rank(0.5)),
        "p99": _round(rank(0.99)),
        "max": _round(ordered[-1] / 1e6),
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# -- subscribers (the worker side) ---------------------------------------------------------


@dataclass(frozen=True)
class _SwarmParams:
    target: Target
    topic: str
    count: int
    index_offset: int
    source_addresses: tuple[str, ...]
    connect_concurrency: int
    connect_timeout: float


@dataclass
class _Status:
    connected: int = 0
    failed: int = 0
    alive: int = 0
    deliveries: int = 0
    expected_subscribers: int = 0
    cycles: int = 0


@dataclass
class _ConnectResult:
    ok: int
    failed: int
    errors: dict[str, int]
    seconds: float
    alive: int


@dataclass
class _ChurnResult:
    ok: int
    failed: int
    errors: dict[str, int]
    seconds: float


@dataclass
class _PhaseStats:
    first_seq: int
    subscribers: int
    deliveries: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    late: int = 0
    lost: int = 0
    subscribers_with_loss: int = 0
    max_lost_per_subscriber: int = 0
    histogram: dict[int, int] = field(default_factory=dict)
    max_latency_ns: int = 0
    counts: array[int] = field(default_factory=lambda: array("q"))
    last_receive: array[int] = field(default_factory=lambda: array("q"))
    last_receive_ns: int = 0
    closed_by_server: int = 0
    control_events: dict[str, int] = field(default_factory=dict)
    malformed: int = 0


class _Phase:
    """Delivery accounting between ``begin_phase`` and ``end_phase`` (one run or step)."""

    __slots__ = (
        "await_index",
        "counts",
        "deliveries",
        "duplicates",
        "first",
        "histogram",
        "last_receive",
        "last_receive_ns",
        "late",
        "max_latency_ns",
        "members",
        "out_of_order",
        "swarm",
    )

    def __init__(self, swarm: _Swarm, first_seq: int) -> None:
        self.swarm = swarm
        self.first = first_seq
        self.members = [s for s in swarm.subs if s is not None and s.state == 1]
        for sub in self.members:
            sub.last = first_seq - 1
            sub.missing = None
            sub.received = 0
        self.counts = array("q")
        self.last_receive = array("q")
        self.histogram = [0] * _BUCKETS
        self.max_latency_ns = 0
        self.last_receive_ns = 0
        self.deliveries = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.late = 0
        self.await_index = -1

    def record(self, sub: _Subscriber, seq: int, sent_ns: int, now: int) -> None:
        index = seq - self.first
        if index < 0:
            self.late += 1
            return
        last = sub.last
        if seq > last:
            if seq != last + 1:
                missing = sub.missing
                if missing is None:
                    missing = sub.missing = set()
                if len(missing) + seq - last <= _MAX_GAP_TRACKED:
                    missing.update(range(last + 1, seq))
            sub.last = seq
        elif sub.missing is not None and seq in sub.missing:
            sub.missing.discard(seq)
            self.out_of_order += 1
        else:
            self.duplicates += 1
            return
        sub.received += 1
        self.deliveries += 1
        counts = self.counts
        if index >= len(counts):
            grow = array("q", [0]) * max(1024, index + 1 - len(counts))
            counts.extend(grow)
            self.last_receive.extend(grow)
        counts[index] += 1
        if now > self.last_receive[index]:
            self.last_receive[index] = now
        if now > self.last_receive_ns:
            self.last_receive_ns = now
        latency = now - sent_ns
        us = latency // 1000
        if us < _EXACT_US:
            self.histogram[us if us > 0 else 0] += 1
        else:
            self.histogram[_bucket_of(latency)] += 1
        if latency > self.max_latency_ns:
            self.max_latency_ns = latency
        if index == self.await_index and counts[index] >= self.swarm.alive:
            self.fire_await()

    def fire_await(self) -> None:
        index = self.await_index
        self.await_index = -1
        self.swarm.notify(self.first + index)

    def check_await(self) -> None:
        index = self.await_index
        if index < 0:
            return
        done = self.counts[index] if index < len(self.counts) else 0
        if done >= self.swarm.alive:
            self.fire_await()

    def stats(self, published: int) -> _PhaseStats:
        swarm = self.swarm
        lost = with_loss = worst = 0
        for sub in self.members:
            missed = max(0, published - sub.received)
            if missed:
                lost += missed
                with_loss += 1
                worst = max(worst, missed)
        hist = {b: c for b, c in enumerate(self.histogram) if c}
        return _PhaseStats(
            first_seq=self.first,
            subscribers=len(self.members),
            deliveries=self.deliveries,
            duplicates=self.duplicates,
            out_of_order=self.out_of_order,
            late=self.late,
            lost=lost,
            subscribers_with_loss=with_loss,
            max_lost_per_subscriber=worst,
            histogram=hist,
            max_latency_ns=self.max_latency_ns,
            counts=self.counts[:published],
            last_receive=self.last_receive[:published],
            last_receive_ns=self.last_receive_ns,
            closed_by_server=swarm.closed_by_server,
            control_events={k.decode(): v for k, v in swarm.control_events.items()},
            malformed=swarm.malformed,
        )


class _Subscriber(asyncio.Protocol):
    """One SSE stream. ``state``: 0 opening, 1 open, 2 closed."""

    __slots__ = (
        "last",
        "missing",
        "parser",
        "ready",
        "received",
        "registered",
        "state",
        "swarm",
        "transport",
    )

    def __init__(self, swarm: _Swarm, ready: asyncio.Future[str]) -> None:
        self.swarm = swarm
        self.ready = ready
        self.parser = StreamParser()
        self.transport: asyncio.Transport | None = None
        self.state = 0
        self.registered = False
        self.last = 0
        self.missing: set[int] | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.swarm.open_transports += 1
        self.transport.write(self.swarm.request)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        parser = self.parser
        events = parser.feed(data)
        if self.state != 1:
            if self.state == 2:
                return
            reason = parser.error
            if not reason:
                for event_type, _ in events:
                    if event_type in _CONTROL_EVENTS:
                        reason = event_type.decode()
                        break
            if not reason and parser.ended:
                reason = "stream ended"
            if reason:
                self._fail(reason)
                return
            if not parser.opened:
                return
            self.state = 1
            if not self.ready.done():
                self.ready.set_result("")
        if not events:
            if parser.error or parser.ended:
                self.close()
            return
        swarm = self.swarm
        phase = swarm.phase
        for event_type, payload in events:
            if event_type:
                swarm.control_events[event_type] += 1
                continue
            parsed = parse_payload(payload)
            if parsed is None:
                swarm.malformed += 1
            elif phase is not None:
                phase.record(self, parsed[0], parsed[1], now)
        if parser.error or parser.ended:
            self.close()

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_result(reason)
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        swarm = self.swarm
        swarm.open_transports -= 1
        previous = self.state
        self.state = 2
        if not self.ready.done():
            self.ready.set_result(type(exc).__name__ if exc else "closed before opening")
        if previous == 1 and self.registered:
            swarm.on_closed()


class _Swarm:
    """The subscribers of one process: opening, accounting, churn."""

    def __init__(self, params: _SwarmParams, notify: Callable[[int], None]) -> None:
        self.params = params
        self.notify = notify
        target = params.target
        path = f"{target.prefix}/events?topic={quote(params.topic, safe='')}"
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            "Accept: text/event-stream\r\nUser-Agent: ssehub-loadgen\r\n\r\n"
        ).encode("latin-1")
        self.subs: list[_Subscriber | None] = [None] * params.count
        self.alive = 0
        self.open_transports = 0
        self.phase: _Phase | None = None
        self.closing = False
        self.closed_by_server = 0
        self.control_events: Counter[bytes] = Counter()
        self.malformed = 0
        self.connected = 0
        self.failed = 0
        self.cycles = 0

    # opening and closing

    async def _open(self, global_index: int) -> tuple[_Subscriber | None, str]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[str] = loop.create_future()
        sub = _Subscriber(self, ready)
        target = self.params.target
        addresses = self.params.source_addresses
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self.params.connect_timeout):
                if addresses:
                    sock = socket.socket(target.family, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    with contextlib.suppress(OSError, AttributeError):
                        # pick the source port at connect(), per destination
                        sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((addresses[global_index % len(addresses)], 0))
                    await loop.sock_connect(sock, (target.ip, target.port))
                    await loop.create_connection(lambda: sub, sock=sock)
                    sock = None
                else:
                    await loop.create_connection(lambda: sub, target.ip, target.port)
                reason = await ready
        except TimeoutError:
            reason = "timeout"
        except OSError as exc:  # ECONNREFUSED, EMFILE (open-file limit), EADDRNOTAVAIL, ...
            reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        finally:
            if sock is not None:
                sock.close()
        if reason or sub.state != 1:
            sub.close()
            return None, reason or "closed"
        return sub, ""

    async def connect(self) -> _ConnectResult:
        """Open every subscriber that is not open (all of them the first time)."""
        started = time.monotonic()
        todo = deque(i for i, s in enumerate(self.subs) if s is None or s.state == 2)
        errors: Counter[str] = Counter()
        ok = 0

        async def opener() -> None:
            nonlocal ok
            while todo:
                index = todo.popleft()
                sub, reason = await self._open(self.params.index_offset + index)
                if sub is None:
                    self.failed += 1
                    errors[reason] += 1
                    continue
                sub.registered = True
                self.subs[index] = sub
                self.alive += 1
                self.connected += 1
                ok += 1

        workers = min(self.params.connect_concurrency, len(todo))
        await asyncio.gather(*(opener() for _ in range(workers)))
        return _ConnectResult(
            ok, sum(errors.values()), dict(errors), time.monotonic() - started, self.alive
        )

    def on_closed(self) -> None:
        self.alive -= 1
        if not self.closing:
            self.closed_by_server += 1
        if self.phase is not None:
            self.phase.check_await()

    async def close_all(self, timeout: float = 5.0) -> int:
        self.closing = True
        self.phase = None
        closed = 0
        for sub in self.subs:
            if sub is not None and sub.state != 2:
                sub.close()
                closed += 1
        self.subs = [None] * self.params.count
        await _wait_for(lambda: self.open_transports <= 0, timeout)
        return closed

    # phases

    def begin_phase(self, first_seq: int) -> None:
        self.closed_by_server = 0
        self.control_events.clear()
        self.malformed = 0
        self.phase = _Phase(self, first_seq)

    def set_await(self, seq: int) -> None:
        phase = self.phase
        if phase is None:
            self.notify(seq)
            return
        phase.await_index = seq - phase.first
        phase.check_await()

    def end_phase(self, published: int) -> _PhaseStats:
        phase = self.phase
        if phase is None:
            raise RuntimeError("no phase in progress")
        self.phase = None
        return phase.stats(published)

    def status(self) -> _Status:
        phase = self.phase
        return _Status(
            connected=self.connected,
            failed=self.failed,
            alive=self.alive,
            deliveries=phase.deliveries if phase else 0,
            expected_subscribers=len(phase.members) if phase else 0,
            cycles=self.cycles,
        )

    # churn

    async def churn(self, cycles: int, concurrency: int) -> _ChurnResult:
        """``cycles`` times: open a stream, wait for its first bytes, close it."""
        started = time.monotonic()
        errors: Counter[str] = Counter()
        ok = 0
        remaining = cycles

        async def cycler() -> None:
            nonlocal ok, remaining
            while remaining > 0:
                remaining -= 1
                sub, reason = await self._open(self.params.index_offset + self.cycles)
                self.cycles += 1
                if sub is None:
                    errors[reason] += 1
                else:
                    ok += 1
                    sub.close()

        await asyncio.gather(*(cycler() for _ in range(min(concurrency, cycles))))
        await _wait_for(lambda: self.open_transports <= 0, 5)
        return _ChurnResult(ok, sum(errors.values()), dict(errors), time.monotonic() - started)


# -- worker handles: in-process, or a worker process over a pipe ----------------------------


class _Handle:
    """The parent's view of the subscribers of one process."""

    async def connect(self) -> _ConnectResult:
        raise NotImplementedError

    async def begin_phase(self, first_seq: int) -> None:
        raise NotImplementedError

    async def wait_complete(self, seq: int) -> None:
        raise NotImplementedError

    async def status(self) -> _Status:
        raise NotImplementedError

    async def end_phase(self, published: int) -> _PhaseStats:
        raise NotImplementedError

    async def churn(self, cycles: int, concurrency: int) -> _ChurnResult:
        raise NotImplementedError

    async def close_all(self) -> int:
        raise NotImplementedError

    async def cpu_seconds(self) -> float:
        """CPU time of this handle's process, if it is not the parent (else 0)."""
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError


class _LocalHandle(_Handle):
    def __init__(self, params: _SwarmParams) -> None:
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self.swarm = _Swarm(params, self._notify)

    def _notify(self, seq: int) -> None:
        waiter = self._waiters.pop(seq, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def connect(self) -> _ConnectResult:
        return await self.swarm.connect()

    async def begin_phase(self, first_seq: int) -> None:
        self.swarm.begin_phase(first_seq)

    async def wait_complete(self, seq: int) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[seq] = waiter
        try:
            self.swarm.set_await(seq)
            await waiter
        finally:
            self._waiters.pop(seq, None)

    async def status(self) -> _Status:
        return self.swarm.status()

    async def end_phase(self, published: int) -> _PhaseStats:
        return self.swarm.end_phase(published)

    async def churn(self, cycles: int, concurrency: int) -> _ChurnResult:
        return await self.swarm.churn(cycles, concurrency)

    async def close_all(self) -> int:
        return await self.swarm.close_all()

    async def cpu_seconds(self) -> float:
        return 0.0

    async def shutdown(self) -> None:
        await self.swarm.close_all()


_IMMEDIATE: Final = frozenset({"status", "await", "cpu"})


def _worker_main(conn: Connection, params: _SwarmParams, deadline: float) -> None:
    """Entry point of a worker process: serve the parent's commands until told to exit."""
    raise_open_file_limit()
    with contextlib.suppress(KeyboardInterrupt):
        _run_loop(_worker_async(conn, params, deadline))
    conn.close()


async def _worker_async(conn: Connection, params: _SwarmParams, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, str, tuple[Any, ...]]] = asyncio.Queue()
    gone = loop.create_future()

    def send(message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError, ValueError):
            conn.send(message)

    swarm = _Swarm(params, lambda seq: send((None, True, seq)))

    def readable() -> None:
        try:
            while conn.poll():
                request_id, command, args = conn.recv()
                if command == "status":
                    send((request_id, True, swarm.status()))
                elif command == "cpu":
                    send((request_id, True, time.process_time()))
                elif command == "await":
                    swarm.set_await(args[0])
                else:
                    queue.put_nowait((request_id, command, args))
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            if not gone.done():
                gone.set_result(None)

    async def serve() -> None:
        while True:
            request_id, command, args = await queue.get()
            try:
                result: Any
                if command == "exit":
                    send((request_id, True, None))
                    return
                if command == "connect":
                    result = await swarm.connect()
                elif command == "begin_phase":
                    swarm.begin_phase(*args)
                    result = None
                elif command == "end_phase":
                    result = swarm.end_phase(*args)
                elif command == "churn":
                    result = await swarm.churn(*args)
                elif command == "close_all":
                    result = await swarm.close_all()
                else:
                    raise RuntimeError(f"unknown command {command!r}")
            except Exception as exc:  # reported to the parent, which raises it
                send((request_id, False, f"{type(exc).__name__}: {exc}"))
            else:
                send((request_id, True, result))

    loop.add_reader(conn.fileno(), readable)
    server = asyncio.ensure_future(serve())
    try:
        await asyncio.wait(
            [server, gone],
            timeout=max(1.0, deadline - time.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(conn.fileno())
        await swarm.close_all()


class _RemoteHandle(_Handle):
    """A worker process running a :class:`_Swarm` in its own (uv)loop."""

    def __init__(self, params: _SwarmParams, deadline: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main,
            args=(child, params, deadline),
            name=f"ssehub-loadgen-{params.index_offset}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                request_id, ok, payload = self.conn.recv()
                if request_id is None:
                    waiter = self._waiters.pop(payload, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                    continue
                future = self._pending.pop(request_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(payload)
                else:
                    future.set_exception(RuntimeError(f"loadgen worker: {payload}"))
        except (EOFError, OSError):
            self._lost()

    def _lost(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(self.conn.fileno())
        for future in [*self._pending.values(), *self._waiters.values()]:
            if not future.done():
                future.set_exception(RuntimeError("loadgen worker exited"))
        self._pending.clear()
        self._waiters.clear()

    def _send(self, request_id: int | None, command: str, *args: Any) -> None:
        if self._closed:
            raise RuntimeError("loadgen worker exited")
        try:
            self.conn.send((request_id, command, args))
        except (OSError, ValueError) as exc:
            self._lost()
            raise RuntimeError("loadgen worker exited") from exc

    async def call(self, command: str, *args: Any) -> Any:
        self._next_id += 1
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[self._next_id] = future
        self._send(self._next_id, command, *args)
        return await future

    async def connect(self) -> _ConnectResult:
        return cast(_ConnectResult, await self.call("connect"))

    async def begin_phase(self, first_seq: int) -> None:
        await self.call("begin_phase", first_seq)

    async def wait_complete(self, seq: int) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters[seq] = waiter
        try:
            self._send(0, "await", seq)
            await waiter
        finally:
            self._waiters.pop(seq, None)

    async def status(self) -> _Status:
        return cast(_Status, await self.call("status"))

    async def end_phase(self, published: int) -> _PhaseStats:
        return cast(_PhaseStats, await self.call("end_phase", published))

    async def churn(self, cycles: int, concurrency: int) -> _ChurnResult:
        return cast(_ChurnResult, await self.call("churn", cycles, concurrency))

    async def close_all(self) -> int:
        return cast(int, await self.call("close_all"))

    async def cpu_seconds(self) -> float:
        return cast(float, await self.call("cpu"))

    async def shutdown(self) -> None:
        if not self._closed:
            with contextlib.suppress(RuntimeError, TimeoutError):
                async with asyncio.timeout(10):
                    await self.call("exit")
        await _wait_for(lambda: not self.process.is_alive(), 5)
        if self.process.is_alive():
            self.process.terminate()
            await asyncio.sleep(0.2)
        self.process.join(timeout=5)
        if not self.process.is_alive():
            self.process.close()
        self._lost()
        self.conn.close()


# -- the publisher ------------------------------------------------------------------------


class _PublishConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests may be pipelined."""

    def __init__(self, publisher: _Publisher) -> None:
        self.publisher = publisher
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[int]] = deque()
        self.buffer = bytearray()
        self.need = -1
        self.status = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            if self.need < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).lower()
                del buffer[: end + 4]
                try:
                    self.status = int(head[9:12])
                except ValueError:
                    self.status = 0
                self.need = 0
                at = head.find(b"\r\ncontent-length:")
                if at >= 0:
                    end = head.find(b"\r\n", at + 2)
                    with contextlib.suppress(ValueError):
                        self.need = int(head[at + 17 : end if end >= 0 else len(head)])
            if len(buffer) < self.need:
                return
            del buffer[: self.need]
            self.need = -1
            if self.pending:
                self.publisher.done(self.pending.popleft(), self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.pending:
            self.publisher.done(self.pending.popleft(), 0)


class _Publisher:
    """Publishes ``{"seq": n, "t": time_ns(), "pad": "..."}`` over raw keep-alive HTTP."""

    def __init__(self, target: Target, topic: str, connections: int, payload_size: int) -> None:
        self.target = target
        self.head = (
            f"POST {target.prefix}/topics/{quote(topic, safe='')}/events HTTP/1.1\r\n"
            f"Host: {target.host_header}\r\nContent-Type: application/json\r\n"
            "User-Agent: ssehub-loadgen\r\nContent-Length: "
        ).encode("latin-1")
        base = len(b'{"seq":1000000,"t":1000000000000000000,"pad":""}')
        self.pad = b"x" * max(0, payload_size - base)
        self.size = connections
        self.connections: list[_PublishConnection | None] = [None] * connections
        self.times = array("q", [0])  # publish time of each seq (index = seq)
        self.in_flight = 0
        self.max_in_flight = 256 * connections
        self.errors: Counter[str] = Counter()
        self.ok = 0
        self._turn = 0
        self._space: asyncio.Future[None] | None = None

    async def _connection(self) -> _PublishConnection:
        self._turn = (self._turn + 1) % self.size
        conn = self.connections[self._turn]
        if conn is None or conn.closed:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(
                lambda: _PublishConnection(self), self.target.ip, self.target.port
            )
            self.connections[self._turn] = conn
        return conn

    def done(self, future: asyncio.Future[int], status: int) -> None:
        self.in_flight -= 1
        if status == 201:
            self.ok += 1
        else:
            self.errors[f"HTTP {status}" if status else "connection lost"] += 1
        if not future.done():
            future.set_result(status)
        space = self._space
        if space is not None and not space.done():
            space.set_result(None)

    async def publish(self, seq: int) -> asyncio.Future[int]:
        """Send event ``seq``; the returned future gets the HTTP status (0 if lost)."""
        while self.in_flight >= self.max_in_flight:
            self._space = asyncio.get_running_loop().create_future()
            await self._space
        conn = await self._connection()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        sent = time.time_ns()
        body = b'{"data":{"seq":%d,"t":%d,"pad":"%s"}}' % (seq, sent, self.pad)
        if seq != len(self.times):
            raise RuntimeError("events must be published in sequence")
        self.times.append(sent)
        self.in_flight += 1
        conn.pending.append(future)
        assert conn.transport is not None
        conn.transport.write(b"%s%d\r\n\r\n%s" % (self.head, len(body), body))
        return future

    async def flush(self, timeout: float) -> None:
        await _wait_for(lambda: self.in_flight <= 0, timeout, 0.005)

    async def close(self) -> None:
        for conn in self.connections:
            if conn is not None and conn.transport is not None:
                conn.transport.close()
        await _wait_for(lambda: all(c is None or c.closed for c in self.connections), 2, 0.005)
        self.connections = [None] * self.size


# -- server and load-generator resources ---------------------------------------------------


@dataclass(frozen=True)
class ProcessSample:
    """A process's resident memory, open files and CPU time at one moment."""

    rss_bytes: int
    open_files: int
    cpu_seconds: float


def sample_process(pid: int) -> ProcessSample:
    """Read ``/proc/PID``: VmRSS, the number of open file descriptors, utime + stime."""
    rss = 0
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    open_files = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
        fields = stat.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15)
    return ProcessSample(rss, open_files, cpu)


class _Progress:
    """A progress line on stderr: redrawn in place on a terminal, else every few seconds."""

    def __init__(self, enabled: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.interval = 0.25 if self.tty else 5.0
        self._width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        """A line that stays (a finished step)."""
        if self.enabled:
            self.clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    @contextlib.asynccontextmanager
    async def running(self, status: Callable[[], Awaitable[str]]) -> AsyncIterator[None]:
        if not self.enabled:
            yield
            return
        started = time.monotonic()

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.interval)
                with contextlib.suppress(RuntimeError):
                    self.show(f"[{time.monotonic() - started:6.1f}s] {await status()}")

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.clear()


# -- running a scenario ----------------------------------------------------------------------


class _Run:
    """The parent side of a run: worker handles, the publisher, resource samples."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.target = parse_target(config.url)
        self.handles: list[_Handle] = []
        self.publisher: _Publisher | None = None
        self.progress = _Progress(config.progress)
        self.seq = 0  # last published seq

    async def start(self, streams: int) -> None:
        config = self.config
        processes = config.processes
        shares = [
            streams // processes + (1 if i < streams % processes else 0) for i in range(processes)
        ]
        deadline = time.time() + config.timeout + 30
        offset = 0
        for share in shares:
            params = _SwarmParams(
                target=self.target,
                topic=config.topic,
                count=share,
                index_offset=offset,
                source_addresses=config.source_addresses,
                connect_concurrency=max(1, config.connect_concurrency // processes),
                connect_timeout=config.connect_timeout,
            )
            offset += share
            if processes == 1:
                self.handles.append(_LocalHandle(params))
            else:
                self.handles.append(_RemoteHandle(params, deadline))
        if processes > 1:  # wait until every worker has started
            await asyncio.gather(*(h.status() for h in self.handles))

    async def close(self) -> None:
        if self.publisher is not None:
            await self.publisher.close()
        for handle in self.handles:
            with contextlib.suppress(Exception):
                await handle.shutdown()

    def get_publisher(self) -> _Publisher:
        if self.publisher is None:
            config = self.config
            self.publisher = _Publisher(
                self.target, config.topic, config.publishers, config.payload_size
            )
        return self.publisher

    def sample_server(self) -> ProcessSample | None:
        pid = self.config.server_pid
        if pid is None:
            return None
        try:
            return sample_process(pid)
        except OSError:
            return None

    async def status(self) -> _Status:
        total = _Status()
        for status in await asyncio.gather(*(h.status() for h in self.handles)):
            total.connected += status.connected
            total.failed += status.failed
            total.alive += status.alive
            total.deliveries += status.deliveries
            total.expected_subscribers += status.expected_subscribers
            total.cycles += status.cycles
        return total

    async def loadgen_cpu(self) -> list[float]:
        """CPU seconds so far of the parent and of each worker process."""
        own = time.process_time()
        if len(self.handles) == 1 and isinstance(self.handles[0], _LocalHandle):
            return [own]
        return [own, *await asyncio.gather(*(h.cpu_seconds() for h in self.handles))]

    async def connect(self, total: int) -> dict[str, Any]:
        started = time.monotonic()

        async def status() -> str:
            s = await self.status()
            return f"opening streams: {s.alive}/{total} open, {s.failed} failed"

        async with self.progress.running(status):
            results = await asyncio.gather(*(h.connect() for h in self.handles))
        seconds = time.monotonic() - started
        ok = sum(r.ok for r in results)
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r.errors)
        return {
            "seconds": round(seconds, 4),
            "per_second": round(ok / seconds, 1) if seconds > 0 else None,
            "failed": sum(r.failed for r in results),
            "opened": ok,
            "errors": dict(errors),
        }

    async def begin_phase(self) -> int:
        first = self.seq + 1
        await asyncio.gather(*(h.begin_phase(first) for h in self.handles))
        return first

    async def publish_one_at_a_time(self, count: int, status_text: Callable[[], str]) -> int:
        """Publish ``count`` events, each once the previous one reached every subscriber."""
        publisher = self.get_publisher()
        timeout = self.config.event_timeout
        published = 0

        async def status() -> str:
            return status_text()

        async with self.progress.running(status):
            for _ in range(count):
                self.seq += 1
                seq = self.seq
                response = await publisher.publish(seq)
                published += 1
                waits = [asyncio.ensure_future(h.wait_complete(seq)) for h in self.handles]
                try:
                    async with asyncio.timeout(timeout):
                        if await response == 201:
                            await asyncio.gather(*waits)
                except TimeoutError:
                    pass
                finally:
                    for wait in waits:
                        wait.cancel()
                    await asyncio.gather(*waits, return_exceptions=True)
        return published

    async def publish_at_rate(
        self,
        rate: float,
        *,
        count: int | None = None,
        seconds: float | None = None,
        status_text: Callable[[], str],
    ) -> tuple[int, float]:
        """Publish at ``rate`` events/s, ``count`` events or for ``seconds``; return how
        many were published and how long it took."""
        publisher = self.get_publisher()
        loop = asyncio.get_running_loop()
        published = 0

        async def status() -> str:
            return status_text()

        started = loop.time()
        async with self.progress.running(status):
            while True:
                elapsed = loop.time() - started
                if count is not None and published >= count:
                    break
                if seconds is not None and elapsed >= seconds:
                    break
                due = int(elapsed * rate) + 1
                if count is not None:
                    due = min(due, count)
                while published < due:
                    self.seq += 1
                    await publisher.publish(self.seq)
                    published += 1
                delay = published / rate - (loop.time() - started)
                await asyncio.sleep(max(0.0, delay))
        return published, loop.time() - started

    async def drain(self, published: int) -> None:
        """Wait until every subscriber of the phase has every event, nothing more arrives
        for a second, or the drain timeout passes."""
        if self.publisher is not None:
            await self.publisher.flush(self.config.drain_timeout)
        deadline = time.monotonic() + self.config.drain_timeout
        last_progress = time.monotonic()
        seen = -1
        while time.monotonic() < deadline:
            status = await self.status()
            if status.deliveries >= status.expected_subscribers * published:
                return
            if status.deliveries != seen:
                seen = status.deliveries
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > 1.0:
                return
            await asyncio.sleep(0.01)

    async def end_phase(self, first: int, published: int) -> dict[str, Any]:
        """Merge the workers' accounting of the phase into one report section."""
        stats = await asyncio.gather(*(h.end_phase(published) for h in self.handles))
        histogram: Counter[int] = Counter()
        for s in stats:
            histogram.update(s.histogram)
        subscribers = sum(s.subscribers for s in stats)
        counts = [0] * published
        last = [0] * published
        for s in stats:
            for i, c in enumerate(s.counts):
                counts[i] += c
            for i, t in enumerate(s.last_receive):
                if t > last[i]:
                    last[i] = t
        publisher = self.get_publisher()
        times = publisher.times
        completion = [
            last[i] - times[first + i] for i in range(published) if counts[i] >= subscribers > 0
        ]
        deliveries = sum(s.deliveries for s in stats)
        last_receive = max((s.last_receive_ns for s in stats), default=0)
        span = (last_receive - times[first]) / 1e9 if published and last_receive else 0.0
        control: Counter[str] = Counter()
        for s in stats:
            control.update(s.control_events)
        return {
            "events": published,
            "subscribers": subscribers,
            "deliveries": deliveries,
            "deliveries_per_second": round(deliveries / span, 1) if span > 0 else None,
            "lost": sum(s.lost for s in stats),
            "duplicated": sum(s.duplicates for s in stats),
            "out_of_order": sum(s.out_of_order for s in stats),
            "late": sum(s.late for s in stats),
            "subscribers_with_loss": sum(s.subscribers_with_loss for s in stats),
            "max_lost_per_subscriber": max((s.max_lost_per_subscriber for s in stats), default=0),
            "latency_ms": _summary_ms(
                dict(histogram), max((s.max_latency_ns for s in stats), default=0)
            ),
            "fanout_completion_ms": _exact_summary_ms(completion),
            "fanout_incomplete": published - len(completion),
            "closed_by_server": sum(s.closed_by_server for s in stats),
            "server_events": dict(control),
            "malformed": sum(s.malformed for s in stats),
            "publish_errors": dict(publisher.errors),
        }


def _server_section(
    pid: int | None,
    before: ProcessSample | None,
    after: ProcessSample | None,
    *,
    cpu_from: ProcessSample | None = None,
    connected: ProcessSample | None = None,
    deliveries: int = 0,
    streams: int = 0,
    streams_sample: ProcessSample | None = None,
    wall: float = 0.0,
) -> dict[str, Any] | None:
    """The ``server`` section of a report. RSS per stream is measured from ``before`` to
    ``streams_sample`` (the streams just opened), else to ``after``."""
    if pid is None or before is None or after is None:
        return None
    grown = (streams_sample or after).rss_bytes - before.rss_bytes
    cpu_start = cpu_from or before
    cpu = after.cpu_seconds - cpu_start.cpu_seconds
    section: dict[str, Any] = {
        "pid": pid,
        "rss_bytes_before": before.rss_bytes,
        "rss_bytes_after": after.rss_bytes,
        "open_files_before": before.open_files,
        "open_files_after": after.open_files,
        "cpu_seconds": round(cpu, 3),
        "cpu_us_per_delivery": round(cpu / deliveries * 1e6, 2) if deliveries else None,
        "cpu_share": round(cpu / wall, 3) if wall > 0 else None,
        "rss_bytes_per_stream": round(grown / streams, 1) if streams else None,
    }
    if connected is not None:
        section["rss_bytes_connected"] = connected.rss_bytes
        section["open_files_connected"] = connected.open_files
    return section


def _loadgen_cpu(before: list[float], after: list[float], wall: float) -> dict[str, Any]:
    deltas = [max(0.0, b - a) for a, b in zip(before, after, strict=False)]
    share = max(deltas, default=0.0) / wall if wall > 0 else 0.0
    return {
        "loadgen_cpu_seconds": round(sum(deltas), 3),
        "loadgen_cpu_share": round(share, 3),
        "loadgen_limited": share > 0.85,
    }


def _base_report(config: LoadConfig) -> dict[str, Any]:
    return {
        "scenario": config.scenario,
        "url": config.url,
        "topic": config.topic,
        "subscribers": config.subscribers,
        "processes": config.processes,
        "source_addresses": list(config.source_addresses) or None,
        "connect": {"seconds": None, "per_second": None, "failed": 0},
        "latency_ms": {"p50": None, "p99": None, "max": None},
        "fanout_completion_ms": {"p50": None, "p99": None, "max": None},
        "events": 0,
        "deliveries": 0,
        "deliveries_per_second": None,
        "lost": 0,
        "duplicated": 0,
        "out_of_order": 0,
        "server": None,
        "loadgen_cpu_seconds": 0.0,
        "steps": None,
        "max_rate_ok": None,
        "cycles": None,
        "bytes_per_cycle": None,
        "bytes_per_cycle_halves": None,
    }


async def _idle(run: _Run, report: dict[str, Any]) -> None:
    config = run.config
    n = config.subscribers
    before = run.sample_server()
    cpu_before = await run.loadgen_cpu()
    started = time.monotonic()
    report["connect"] = await run.connect(n)
    if not report["connect"]["opened"]:
        raise _NoStreams(report["connect"]["errors"])
    connected = run.sample_server()

    async def status() -> str:
        s = await run.status()
        return f"holding {s.alive}/{n} streams"

    async with run.progress.running(status):
        await asyncio.sleep(config.hold)
    after = run.sample_server()
    state = await run.status()
    wall = time.monotonic() - started
    report["open_at_end"] = state.alive
    report["closed_by_server"] = state.connected - state.alive
    report["hold_seconds"] = config.hold
    report["server"] = _server_section(
        config.server_pid, before, after, connected=connected, streams=state.connected, wall=wall
    )
    report.update(_loadgen_cpu(cpu_before, await run.loadgen_cpu(), wall))


async def _open_subscribers(
    run: _Run, report: dict[str, Any]
) -> tuple[ProcessSample | None, ProcessSample | None, list[float], float]:
    """Open the scenario's subscribers (fanout, throughput); return the server samples
    before and after, the load generator's CPU seconds (per process) and the time."""
    before = run.sample_server()
    report["connect"] = await run.connect(run.config.subscribers)
    if not report["connect"]["opened"]:
        raise _NoStreams(report["connect"]["errors"])
    connected = run.sample_server()
    return before, connected, await run.loadgen_cpu(), time.monotonic()


async def _fanout(run: _Run, report: dict[str, Any]) -> None:
    config = run.config
    n = config.subscribers
    before, connected, cpu_before, started = await _open_subscribers(run, report)
    first = await run.begin_phase()

    def status_text() -> str:
        return f"published {run.seq - first + 1}/{config.events} events to {n} subscribers"

    if config.rate > 0:
        published, _ = await run.publish_at_rate(
            config.rate, count=config.events, status_text=status_text
        )
    else:
        published = await run.publish_one_at_a_time(config.events, status_text)
    await run.drain(published)
    phase = await run.end_phase(first, published)
    after = run.sample_server()
    wall = time.monotonic() - started
    report.update(phase)
    report["subscribers_at_start"] = phase["subscribers"]
    report["subscribers"] = n
    report["rate"] = config.rate or None
    report["server"] = _server_section(
        config.server_pid,
        before,
        after,
        cpu_from=connected,
        connected=connected,
        deliveries=phase["deliveries"],
        streams=report["connect"]["opened"],
        streams_sample=connected,
        wall=wall,
    )
    report.update(_loadgen_cpu(cpu_before, await run.loadgen_cpu(), wall))


async def _throughput(run: _Run, report: dict[str, Any]) -> None:
    config = run.config
    before, connected, cpu_before, started = await _open_subscribers(run, report)
    deadline = started + config.timeout
    steps: list[dict[str, Any]] = []

    async def step(rate: float) -> bool:
        reconnect = await asyncio.gather(*(h.connect() for h in run.handles))
        server_start = run.sample_server()
        cpu_start = await run.loadgen_cpu()
        step_started = time.monotonic()
        first = await run.begin_phase()
        label = f"step {len(steps) + 1}: {rate:g} events/s"

        def status_text() -> str:
            return f"{label}, {run.seq - first + 1} published"

        errors_before = Counter(run.get_publisher().errors)
        published, seconds = await run.publish_at_rate(
            rate, seconds=config.step_seconds, status_text=status_text
        )
        await run.drain(published)
        phase = await run.end_phase(first, published)
        wall = time.monotonic() - step_started
        server_end = run.sample_server()
        errors = Counter(run.get_publisher().errors)
        errors.subtract(errors_before)
        phase["publish_errors"] = {k: v for k, v in errors.items() if v > 0}
        achieved = published / seconds if seconds > 0 else 0.0
        p99 = phase["latency_ms"]["p99"]
        ok = (
            p99 is not None
            and p99 < config.p99_limit_ms
            and phase["lost"] == 0
            and phase["duplicated"] == 0
            and not phase["publish_errors"]
            and achieved >= 0.9 * rate
        )
        entry: dict[str, Any] = {"rate": rate, "achieved_rate": round(achieved, 1), "ok": ok}
        entry["reconnected"] = sum(r.ok for r in reconnect)
        entry.update(phase)
        if server_start is not None and server_end is not None:
            cpu = server_end.cpu_seconds - server_start.cpu_seconds
            entry["server_cpu_seconds"] = round(cpu, 3)
            entry["server_cpu_us_per_delivery"] = (
                round(cpu / phase["deliveries"] * 1e6, 2) if phase["deliveries"] else None
            )
        entry.update(_loadgen_cpu(cpu_start, await run.loadgen_cpu(), wall))
        steps.append(entry)
        run.progress.line(
            f"{label}: achieved {achieved:.0f}/s, p99 {phase['latency_ms']['p99']} ms, "
            f"lost {phase['lost']} -> {'ok' if ok else 'FAIL'}"
        )
        return ok

    def time_left() -> bool:
        return time.monotonic() + config.step_seconds + config.drain_timeout + 2 < deadline

    best: float | None = None
    if config.rates:
        for rate in config.rates:
            if not time_left():
                report["stopped"] = "time budget"
                break
            if await step(rate):
                best = rate if best is None else max(best, rate)
    else:
        rate = config.start_rate
        failed: float | None = None
        while rate <= config.max_rate and time_left():
            if await step(rate):
                best = rate
                rate *= 2
            else:
                failed = rate
                break
        if best is not None and failed is not None:
            for _ in range(config.bisect_steps):
                middle = float(round((best + failed) / 2))
                if middle in (best, failed) or not time_left():
                    break
                if await step(middle):
                    best = middle
                else:
                    failed = middle
    after = run.sample_server()
    wall = time.monotonic() - started
    deliveries = sum(s["deliveries"] for s in steps)
    report["steps"] = steps
    report["max_rate_ok"] = best
    report["events"] = sum(s["events"] for s in steps)
    report["deliveries"] = deliveries
    for key in ("lost", "duplicated", "out_of_order"):
        report[key] = sum(s[key] for s in steps)
    good = [s for s in steps if s["rate"] == best]
    if good:  # the headline numbers are those of the best passing step
        for key in ("latency_ms", "fanout_completion_ms", "deliveries_per_second"):
            report[key] = good[-1][key]
    report["server"] = _server_section(
        config.server_pid,
        before,
        after,
        cpu_from=connected,
        connected=connected,
        deliveries=deliveries,
        streams=report["connect"]["opened"],
        streams_sample=connected,
        wall=wall,
    )
    report.update(_loadgen_cpu(cpu_before, await run.loadgen_cpu(), wall))


async def _churn(run: _Run, report: dict[str, Any]) -> None:
    config = run.config
    per_handle = len(run.handles)

    def split(total: int) -> list[int]:
        return [
            total // per_handle + (1 if i < total % per_handle else 0) for i in range(per_handle)
        ]

    concurrency = split(config.concurrency)

    async def cycles(total: int, what: str) -> list[_ChurnResult]:
        async def status() -> str:
            s = await run.status()
            return f"{what}: {s.cycles}/{total} cycles"

        async with run.progress.running(status):
            return await asyncio.gather(
                *(
                    h.churn(c, max(1, k))
                    for h, c, k in zip(run.handles, split(total), concurrency, strict=True)
                    if c > 0
                )
            )

    if config.warmup:
        await cycles(config.warmup, "warm-up")
    await _settle(run, None)
    before = run.sample_server()
    cpu_before = await run.loadgen_cpu()
    # Two halves, the server sampled in between: a leak grows in both, while a one-off
    # step (an allocator arena, a table sized for a new peak of open connections) shows
    # in one only.
    first = config.cycles // 2
    started = time.monotonic()
    results = await cycles(first, "churn (first half)")
    seconds = time.monotonic() - started
    await _settle(run, before)
    middle = run.sample_server()
    started = time.monotonic()
    results += await cycles(config.cycles - first, "churn (second half)")
    seconds += time.monotonic() - started
    await _settle(run, before)
    after = run.sample_server()
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    ok = sum(r.ok for r in results)
    failed = sum(r.failed for r in results)
    report["subscribers"] = config.concurrency
    report["cycles"] = config.cycles
    report["warmup_cycles"] = config.warmup
    report["concurrency"] = config.concurrency
    report["connect"] = {
        "seconds": round(seconds, 4),
        "per_second": round(ok / seconds, 1) if seconds > 0 else None,
        "failed": failed,
        "opened": ok,
        "errors": dict(errors),
    }
    report["cycles_per_second"] = report["connect"]["per_second"]
    server = _server_section(config.server_pid, before, after, wall=seconds)
    if server is not None and before is not None and after is not None:
        server["rss_bytes_per_stream"] = None
        report["bytes_per_cycle"] = round((after.rss_bytes - before.rss_bytes) / config.cycles, 2)
        if middle is not None and first and config.cycles - first:
            report["bytes_per_cycle_halves"] = [
                round((middle.rss_bytes - before.rss_bytes) / first, 2),
                round((after.rss_bytes - middle.rss_bytes) / (config.cycles - first), 2),
            ]
        report["open_files_delta"] = after.open_files - before.open_files
    report["server"] = server
    report.update(_loadgen_cpu(cpu_before, await run.loadgen_cpu(), seconds))


async def _settle(run: _Run, baseline: ProcessSample | None) -> None:
    """Give the server a moment to close what the clients closed (its open files back to
    the baseline, or stable), up to 5 seconds."""
    if run.config.server_pid is None:
        await asyncio.sleep(0.2)
        return
    deadline = time.monotonic() + 5
    previous = -1
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        sample = run.sample_server()
        if sample is None:
            return
        if baseline is not None and sample.open_files <= baseline.open_files:
            return
        if baseline is None and sample.open_files == previous:
            return
        previous = sample.open_files


async def run(config: LoadConfig) -> dict[str, Any]:
    """Run one scenario and return its report (the ``--json`` object).

    Raises :class:`UsageError` for bad options or a non-loopback target. A run that hits
    ``config.timeout`` returns a report with an ``"error"`` key.
    """
    config = config.validated()
    report = _base_report(config)
    runner = _Run(config)
    streams = config.concurrency if config.scenario == "churn" else config.subscribers
    started = time.monotonic()
    scenario: Callable[[_Run, dict[str, Any]], Coroutine[Any, Any, None]] = {
        "idle": _idle,
        "fanout": _fanout,
        "throughput": _throughput,
        "churn": _churn,
    }[config.scenario]
    try:
        async with asyncio.timeout(config.timeout):
            await runner.start(streams)
            await scenario(runner, report)
    except TimeoutError:
        report["error"] = f"timed out after {config.timeout:g} s"
    except _NoStreams as exc:
        report["error"] = str(exc)
    except (RuntimeError, OSError) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        runner.progress.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await runner.close()
    report["duration_seconds"] = round(time.monotonic() - started, 3)
    return report


def _config(scenario: Scenario, url: str, options: dict[str, Any]) -> LoadConfig:
    for key in ("rates", "source_addresses"):
        if key in options:
            options[key] = tuple(options[key])
    return LoadConfig(scenario=scenario, url=url, **options)


async def run_idle(url: str = DEFAULT_URL, **options: Any) -> dict[str, Any]:
    """Open ``subscribers`` streams, hold them ``hold`` seconds; memory and files per stream."""
    return await run(_config("idle", url, options))


async def run_fanout(url: str = DEFAULT_URL, **options: Any) -> dict[str, Any]:
    """``subscribers`` streams, ``events`` events one at a time (or at ``rate``/s)."""
    return await run(_config("fanout", url, options))


async def run_throughput(url: str = DEFAULT_URL, **options: Any) -> dict[str, Any]:
    """A rate ramp (``rates``, or doubling from ``start_rate`` then bisection): the highest
    rate with p99 under ``p99_limit_ms`` and nothing lost is ``max_rate_ok``."""
    return await run(_config("throughput", url, options))


async def run_churn(url: str = DEFAULT_URL, **options: Any) -> dict[str, Any]:
    """``cycles`` open/first-bytes/close cycles, ``concurrency`` at a time, after
    ``warmup`` cycles; server memory and open files before and after."""
    return await run(_config("churn", url, options))


def exit_code(report: dict[str, Any]) -> int:
    """0 if the run succeeded; 1 on an error, failed connections, or (fanout) events lost,
    duplicated or out of order, (throughput) duplicates or no passing rate, (idle)
    streams closed by the server, (churn) failed cycles."""
    if report.get("error") or report["connect"]["failed"]:
        return 1
    scenario = report["scenario"]
    if scenario == "fanout" and (report["lost"] or report["duplicated"] or report["out_of_order"]):
        return 1
    if scenario == "throughput" and (report["duplicated"] or report["max_rate_ok"] is None):
        return 1
    if scenario == "idle" and report.get("closed_by_server"):
        return 1
    return 0


# -- output ----------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"


def _ms(section: dict[str, Any]) -> str:
    if section.get("p50") is None:
        return "-"
    return f"p50 {section['p50']:.2f} ms  p99 {section['p99']:.2f} ms  max {section['max']:.2f} ms"


def format_summary(report: dict[str, Any]) -> str:
    """A human-readable summary of a report."""
    scenario = report["scenario"]
    lines = [f"ssehub loadgen {scenario} -> {report['url']} (topic {report['topic']})"]
    connect = report["connect"]
    if report.get("error"):
        lines.append(f"  ERROR        {report['error']}")
    if scenario == "churn":
        lines.append(
            f"  cycles       {report.get('cycles')} ({report.get('concurrency')} at a time) in "
            f"{connect['seconds']} s = {connect['per_second']}/s, {connect['failed']} failed"
        )
    elif connect.get("seconds") is not None:
        lines.append(
            f"  streams      {connect.get('opened', 0)}/{report['subscribers']} opened in "
            f"{connect['seconds']:.2f} s ({connect['per_second']}/s) by {report['processes']} "
            f"process(es), {connect['failed']} failed"
        )
    if connect.get("errors"):
        lines.append(f"  open errors  {connect['errors']}")
    if scenario in ("fanout", "throughput"):
        lines.append(
            f"  events       {report['events']} -> {report['deliveries']} deliveries"
            + (
                f", {report['deliveries_per_second']:.0f}/s"
                if report.get("deliveries_per_second")
                else ""
            )
        )
        lines.append(f"  latency      {_ms(report['latency_ms'])}")
        lines.append(f"  fan-out      {_ms(report['fanout_completion_ms'])}")
        lines.append(
            f"  lost {report['lost']}, duplicated {report['duplicated']}, "
            f"out of order {report['out_of_order']}"
        )
    if scenario == "throughput":
        for s in report.get("steps") or []:
            lines.append(
                f"  step {s['rate']:>9g}/s achieved {s['achieved_rate']:>9.1f}/s  "
                f"p99 {s['latency_ms']['p99']} ms  lost {s['lost']}  "
                f"{'ok' if s['ok'] else 'FAIL'}"
            )
        lines.append(f"  max rate ok  {report['max_rate_ok']} events/s")
    if scenario == "idle":
        lines.append(
            f"  held         {report.get('open_at_end')} open after {report.get('hold_seconds')} s"
            f", {report.get('closed_by_server', 0)} closed by the server"
        )
    server = report.get("server")
    if server:
        text = (
            f"  server       pid {server['pid']}: RSS {_mib(server['rss_bytes_before'])} -> "
            f"{_mib(server['rss_bytes_after'])}, open files {server['open_files_before']} -> "
            f"{server['open_files_after']}, CPU {server['cpu_seconds']} s"
        )
        if server.get("cpu_us_per_delivery") is not None:
            text += f" = {server['cpu_us_per_delivery']} us/delivery"
        lines.append(text)
        if server.get("rss_bytes_per_stream") is not None:
            lines.append(f"  per stream   {server['rss_bytes_per_stream'] / 1024:.1f} KiB RSS")
        if report.get("bytes_per_cycle") is not None:
            lines.append(f"  per cycle    {report['bytes_per_cycle']} bytes RSS")
    lines.append(
        f"  loadgen CPU  {report.get('loadgen_cpu_seconds', 0)} s "
        f"(busiest process {100 * report.get('loadgen_cpu_share', 0):.0f} % of a core)"
    )
    if report.get("loadgen_limited"):
        lines.append("  WARNING      the load generator was CPU-bound: results are a lower bound")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from exc


def _address_list(text: str) -> tuple[str, ...]:
    if text == "auto":
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _processes(text: str) -> int:
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number or 'auto': {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ssehub loadgen``."""
    d = LoadConfig()
    parser = argparse.ArgumentParser(
        prog="ssehub loadgen",
        description="Load-test an ssehub server on this machine (loopback targets only): "
        "open many SSE subscribers on raw sockets, publish events that carry their publish "
        "time, and report stream opening, latency, fan-out completion, deliveries/s, events "
        "lost/duplicated/out of order, and the server's memory, open files and CPU.",
        epilog="Exit status: 0 success; 1 failed connections, lost or duplicated events "
        "(fanout), no passing rate (throughput), streams closed early (idle), failed cycles "
        "(churn) or a timeout; "
        "2 usage error.",
    )
    parser.add_argument(
        "scenario",
        nargs="?",
        choices=SCENARIOS,
        help="idle: hold N streams; fanout: N subscribers x M events; throughput: a rate "
        "ramp; churn: open/close cycles",
    )
    parser.add_argument(
        "--scenario", dest="scenario_option", choices=SCENARIOS, help="the same, as an option"
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("SSEHUB_URL", DEFAULT_URL),
        help="base URL of the hub, loopback only (default: $SSEHUB_URL or %(default)s)",
    )
    g = parser.add_argument_group("subscribers")
    g.add_argument(
        "-n",
        "--subscribers",
        type=int,
        default=d.subscribers,
        metavar="N",
        help="streams to open (default: %(default)s)",
    )
    g.add_argument(
        "--processes",
        type=_processes,
        default=0,
        metavar="P|auto",
        help="worker processes for the subscribers; 1 = in the publisher's process; auto "
        "(default) = 1, or more when one process's open-file limit is too small",
    )
    g.add_argument("--topic", default="", help="topic (default: a fresh loadgen-<random>)")
    g.add_argument(
        "--source-addresses",
        type=_address_list,
        default=(),
        metavar="IP,IP,...|auto",
        help="local addresses to connect from, cycled; auto (default) = 127.0.0.1, plus "
        f"127.0.0.2, ... above {STREAMS_PER_ADDRESS} streams",
    )
    g.add_argument(
        "--connect-concurrency",
        type=int,
        default=d.connect_concurrency,
        metavar="K",
        help="connections being opened at a time, all processes (default: %(default)s)",
    )
    g.add_argument(
        "--connect-timeout",
        type=float,
        default=d.connect_timeout,
        metavar="SECONDS",
        help="for one stream to open (default: %(default)s)",
    )
    g = parser.add_argument_group("publishing (fanout, throughput)")
    g.add_argument(
        "--events",
        type=int,
        default=d.events,
        metavar="M",
        help="events to publish in fanout (default: %(default)s)",
    )
    g.add_argument(
        "--rate",
        type=float,
        default=d.rate,
        metavar="EVENTS/S",
        help="fanout publish rate; 0 (default) = the next event once the previous one "
        "reached every subscriber",
    )
    g.add_argument(
        "--payload-size",
        type=int,
        default=d.payload_size,
        metavar="BYTES",
        help="size of each event's data (default: %(default)s)",
    )
    g.add_argument(
        "--publishers",
        type=int,
        default=d.publishers,
        metavar="K",
        help="keep-alive HTTP connections to publish on (default: %(default)s)",
    )
    g.add_argument(
        "--event-timeout",
        type=float,
        default=d.event_timeout,
        metavar="SECONDS",
        help="longest wait for one event to reach everyone (default: %(default)s)",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout,
        metavar="SECONDS",
        help="longest wait for the last deliveries of a run or step (default: %(default)s)",
    )
    g = parser.add_argument_group("throughput")
    g.add_argument(
        "--rates",
        type=_float_list,
        default=(),
        metavar="R,R,...",
        help="rates (events/s) to try; default: double from --start-rate until a step "
        "fails, then bisect",
    )
    g.add_argument(
        "--start-rate",
        type=float,
        default=d.start_rate,
        metavar="EVENTS/S",
        help="first rate of the automatic ramp (default: %(default)s)",
    )
    g.add_argument(
        "--max-rate",
        type=float,
        default=d.max_rate,
        metavar="EVENTS/S",
        help="highest rate of the automatic ramp (default: %(default)s)",
    )
    g.add_argument(
        "--step-seconds",
        type=float,
        default=d.step_seconds,
        metavar="SECONDS",
        help="publishing time of each step (default: %(default)s)",
    )
    g.add_argument(
        "--bisect-steps",
        type=int,
        default=d.bisect_steps,
        metavar="K",
        help="bisection steps after the ramp (default: %(default)s)",
    )
    g.add_argument(
        "--p99-limit-ms",
        type=float,
        default=d.p99_limit_ms,
        metavar="MS",
        help="a step passes with p99 latency under this and nothing lost (default: %(default)s)",
    )
    g = parser.add_argument_group("idle and churn")
    g.add_argument(
        "--hold",
        type=float,
        default=d.hold,
        metavar="SECONDS",
        help="idle: how long to hold the streams (default: %(default)s)",
    )
    g.add_argument(
        "--cycles",
        type=int,
        default=d.cycles,
        help="churn: open/close cycles (default: %(default)s)",
    )
    g.add_argument(
        "--concurrency",
        type=int,
        default=d.concurrency,
        metavar="K",
        help="churn: streams at a time (default: %(default)s)",
    )
    g.add_argument(
        "--warmup",
        type=int,
        default=d.warmup,
        metavar="CYCLES",
        help="churn: cycles before the baseline is measured (default: %(default)s)",
    )
    g = parser.add_argument_group("measurement and output")
    g.add_argument(
        "--server-pid",
        type=int,
        default=None,
        metavar="PID",
        help="the server's process: report its RSS, open files and CPU",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=d.timeout,
        metavar="SECONDS",
        help="the whole run stops after this (default: %(default)s)",
    )
    g.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    g.add_argument("-q", "--quiet", action="store_true", help="no summary and no progress")
    g.add_argument("--no-progress", action="store_true", help="no progress line")
    return parser


def _run_loop(coroutine: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main(argv: list[str] | None = None) -> int:
    """``ssehub loadgen``: parse ``argv``, run, print; return the exit status (0, 1, 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    scenario = args.scenario or args.scenario_option
    if args.scenario and args.scenario_option and args.scenario != args.scenario_option:
        parser.print_usage(sys.stderr)
        print("ssehub loadgen: error: two different scenarios given", file=sys.stderr)
        return 2
    if scenario is None:
        parser.print_usage(sys.stderr)
        print("ssehub loadgen: error: a scenario is required", file=sys.stderr)
        return 2
    try:
        config = LoadConfig(
            scenario=scenario,
            url=args.url,
            subscribers=args.subscribers,
            processes=args.processes,
            topic=args.topic,
            source_addresses=args.source_addresses,
            connect_concurrency=args.connect_concurrency,
            connect_timeout=args.connect_timeout,
            events=args.events,
            rate=args.rate,
            payload_size=args.payload_size,
            publishers=args.publishers,
            event_timeout=args.event_timeout,
            hold=args.hold,
            rates=args.rates,
            start_rate=args.start_rate,
            max_rate=args.max_rate,
            step_seconds=args.step_seconds,
            bisect_steps=args.bisect_steps,
            p99_limit_ms=args.p99_limit_ms,
            drain_timeout=args.drain_timeout,
            cycles=args.cycles,
            concurrency=args.concurrency,
            warmup=args.warmup,
            server_pid=args.server_pid,
            timeout=args.timeout,
            progress=not (args.quiet or args.no_progress),
        )
        config.validated()
        report = _run_loop(run(config))
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"ssehub loadgen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssehub loadgen: interrupted", file=sys.stderr)
        return 130
    if not args.quiet:
        print(format_summary(report), file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    return exit_code(report)


if __name__ == "__main__":
    # Run the imported module's main, so that worker processes unpickle the same classes.
    from ssehub.loadgen import main as _main

    sys.exit(_main())
