"""The load generator: its stream parser byte by byte, and small runs of every scenario
against a real ``ssehub serve`` process (loads kept small: the machine is shared)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ssehub import Hub
from ssehub.loadgen import (
    LoadConfig,
    StreamParser,
    UsageError,
    exit_code,
    format_summary,
    main,
    parse_payload,
    percentile,
    run_churn,
    run_fanout,
    run_idle,
    run_throughput,
    sample_process,
)

from .helpers import free_port, run_server

# -- the parser ------------------------------------------------------------------------------

HEAD = (
    b"HTTP/1.1 200 OK\r\ndate: Wed, 25 Nov 2026 04:24:34 GMT\r\nserver: uvicorn\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def chunk(payload: bytes, extension: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(payload), extension, payload)


SSE_BODY = [
    b": ssehub\nretry: 3000\nid: 17\n\n",
    b'id: 18\ndata: {"seq":1,"t":5,"pad":"xx"}\n\n',
    # two events in one chunk, a heartbeat comment, a named event with two data lines
    b'id: 19\ndata: {"seq":2,"t":6}\n\n:\n\nid: 20\nevent: tick\ndata: a\ndata: b\n\n',
    # an event split over two chunks, and an extra blank line
    b"id: 21\nda",
    b"ta: tail\n\n\n",
    b"data\n\n",
]
EXPECTED = [
    (b"", b'{"seq":1,"t":5,"pad":"xx"}'),
    (b"", b'{"seq":2,"t":6}'),
    (b"tick", b"a\nb"),
    (b"", b"tail"),
    (b"", b""),
]
STREAM = (
    HEAD
    + b"".join(chunk(p, b";ext=1" if i == 3 else b"") for i, p in enumerate(SSE_BODY))
    + b"0\r\n\r\n"
)


def feed_all(parser: StreamParser, pieces: list[bytes]) -> list[tuple[bytes, bytes]]:
    events: list[tuple[bytes, bytes]] = []
    for piece in pieces:
        events += parser.feed(piece)
    return events


def test_parser_reads_a_whole_stream() -> None:
    parser = StreamParser()
    assert feed_all(parser, [STREAM]) == EXPECTED
    assert parser.status == 200 and parser.opened and parser.ended and not parser.error


def test_parser_gives_the_same_events_for_every_split() -> None:
    for at in range(len(STREAM) + 1):
        parser = StreamParser()
        assert feed_all(parser, [STREAM[:at], STREAM[at:]]) == EXPECTED, at
        assert parser.ended and not parser.error
    for first in range(0, len(STREAM), 7):  # three pieces
        for second in range(first, len(STREAM), 5):
            pieces = [STREAM[:first], STREAM[first:second], STREAM[second:]]
            assert feed_all(StreamParser(), pieces) == EXPECTED, (first, second)
    one_by_one = [STREAM[i : i + 1] for i in range(len(STREAM))]
    assert feed_all(StreamParser(), one_by_one) == EXPECTED


def test_parser_opens_only_after_a_field() -> None:
    parser = StreamParser()
    assert parser.feed(HEAD + chunk(b": ssehub\n\n")) == []
    assert not parser.opened  # a lone comment (as in a refusal) is not the stream's start
    assert parser.feed(chunk(b"retry: 3000\nid: 1\n\n")) == []
    assert parser.opened


def test_parser_reads_a_raw_body_and_reports_refusals() -> None:
    refusal = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 80\r\n\r\n"
        b': ssehub\n\nevent: overloaded\ndata: {"reason":"capacity"}\nretry: 900\n\n'
    )
    parser = StreamParser()
    assert feed_all(parser, [refusal]) == [(b"overloaded", b'{"reason":"capacity"}')]
    for head, error in [
        (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n", "HTTP 503"),
        (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{}", "content-type"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP response"),
    ]:
        parser = StreamParser()
        assert parser.feed(head) == []
        assert parser.error.startswith(error)
    parser = StreamParser()
    parser.feed(HEAD + b"zz\r\n")
    assert parser.error == "bad chunk size line"


def test_parse_payload() -> None:
    assert parse_payload(b'{"seq":12,"t":1700000000000000000,"pad":"xxx"}') == (
        12,
        1700000000000000000,
    )
    assert parse_payload(b'{"seq":3,"t":44}') == (3, 44)
    assert parse_payload(b'{"t": 44, "seq": 3}') == (3, 44)  # any key order
    for bad in (b"hello", b'{"seq":"x","t":1}', b"[1,2]", b'{"seq":1}'):
        assert parse_payload(bad) is None


def test_percentiles_of_the_histogram_are_close() -> None:
    from ssehub.loadgen import _bucket_of

    histogram: dict[int, int] = {}
    values_ms = [0.2 + i * 0.01 for i in range(10_000)]  # 0.2 .. 100.19 ms
    for value in values_ms:
        bucket = _bucket_of(int(value * 1e6))
        histogram[bucket] = histogram.get(bucket, 0) + 1
    for fraction in (0.5, 0.99):
        exact = values_ms[int(fraction * len(values_ms)) - 1]
        estimate = percentile(histogram, fraction)
        assert estimate is not None
        assert abs(estimate - exact) <= 0.006 * exact + 0.001, (fraction, estimate, exact)
    assert percentile({}, 0.5) is None


def test_sample_process_reads_proc() -> None:
    sample = sample_process(os.getpid())
    assert sample.rss_bytes > 1 << 20
    assert sample.open_files > 2
    assert sample.cpu_seconds > 0


# -- argument handling -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3:8000", "http://example.com", "http://[2001:db8::1]:80"]
)
def test_non_loopback_targets_are_refused(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fanout", "--url", url, "-q"]) == 2
    assert "only loopback targets" in capsys.readouterr().err


async def test_the_library_refuses_non_loopback_targets() -> None:
    with pytest.raises(UsageError, match="only loopback"):
        await run_fanout("http://192.168.1.10:8000")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["nosuch"],
        ["fanout", "-n", "0"],
        ["fanout", "--rate", "-1"],
        ["fanout", "--url", "https://127.0.0.1"],
        ["idle", "--processes", "none"],
        ["throughput", "--rates", "1,x"],
        ["fanout", "--source-addresses", "10.0.0.1"],
        ["fanout", "--scenario", "idle"],
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert "error" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--subscribers", "--processes", "--server-pid", "--rates", "--cycles", "--json"):
        assert flag in out


def test_localhost_and_loopback_addresses_are_accepted() -> None:
    for url in ("http://localhost:1", "http://127.0.0.5:1", "http://[::1]:1"):
        LoadConfig(url=url).validated()


# -- runs against a real server ----------------------------------------------------------------


@dataclass
class Server:
    url: str
    pid: int


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``ssehub serve --backend memory://`` in its own process."""
    port = free_port()
    log = tmp_path_factory.mktemp("loadgen") / "serve.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ssehub", "serve", "--port", str(port)]
            + ["--backend", "memory://", "--log-level", "warning"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        with httpx.Client(timeout=1) as http:
            while True:
                assert proc.poll() is None, Path(log).read_text()
                with contextlib.suppress(httpx.TransportError):
                    if http.get(f"{url}/healthz").status_code == 200:
                        break
                assert time.monotonic() < deadline, "serve did not answer /healthz in 20 s"
                time.sleep(0.05)
        yield Server(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def assert_clean(report: dict[str, Any]) -> None:
    assert "error" not in report, report.get("error")
    assert report["connect"]["failed"] == 0, report["connect"]["errors"]
    assert report["lost"] == report["duplicated"] == report["out_of_order"] == 0
    assert exit_code(report) == 0


async def test_fanout_delivers_every_event_to_every_subscriber(server: Server) -> None:
    report = await run_fanout(
        server.url, subscribers=50, events=20, server_pid=server.pid, timeout=60
    )
    assert_clean(report)
    assert report["scenario"] == "fanout"
    assert report["deliveries"] == 1000
    assert report["events"] == 20
    assert report["connect"]["seconds"] > 0 and report["connect"]["per_second"] > 0
    latency, completion = report["latency_ms"], report["fanout_completion_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"] < 5000
    assert 0 < completion["p50"] <= completion["p99"] <= completion["max"]
    assert completion["max"] >= latency["p50"]
    assert report["fanout_incomplete"] == 0
    assert report["deliveries_per_second"] > 0
    server_stats = report["server"]
    assert server_stats["pid"] == server.pid
    assert server_stats["cpu_seconds"] >= 0 and server_stats["cpu_us_per_delivery"] is not None
    assert report["loadgen_cpu_seconds"] > 0
    json.dumps(report)  # serialisable as is
    assert "lost 0, duplicated 0, out of order 0" in format_summary(report)


async def test_fanout_at_a_fixed_rate(server: Server) -> None:
    report = await run_fanout(server.url, subscribers=10, events=30, rate=200, timeout=60)
    assert_clean(report)
    assert report["deliveries"] == 300
    assert report["rate"] == 200
    assert report["server"] is None


async def test_fanout_over_two_worker_processes(server: Server) -> None:
    report = await run_fanout(server.url, subscribers=40, events=10, processes=2, timeout=60)
    assert_clean(report)
    assert report["processes"] == 2
    assert report["connect"]["opened"] == 40
    assert report["deliveries"] == 400
    assert report["latency_ms"]["max"] > 0


async def test_idle_reports_memory_and_open_files_per_stream(server: Server) -> None:
    report = await run_idle(
        server.url, subscribers=100, hold=0.3, server_pid=server.pid, timeout=60
    )
    assert "error" not in report
    assert exit_code(report) == 0
    assert report["connect"]["opened"] == 100 and report["open_at_end"] == 100
    stats = report["server"]
    assert 90 <= stats["open_files_after"] - stats["open_files_before"] <= 110
    assert stats["rss_bytes_before"] > 0 and stats["rss_bytes_after"] > 0
    assert stats["rss_bytes_per_stream"] is not None


async def test_churn_opens_and_closes_streams(server: Server) -> None:
    report = await run_churn(
        server.url, cycles=200, concurrency=10, warmup=50, server_pid=server.pid, timeout=60
    )
    assert "error" not in report and exit_code(report) == 0
    assert report["cycles"] == 200
    assert report["connect"] == {
        **report["connect"],
        "failed": 0,
        "opened": 200,
    }
    stats = report["server"]
    assert abs(stats["open_files_after"] - stats["open_files_before"]) <= 5
    assert isinstance(report["bytes_per_cycle"], float)
    halves = report["bytes_per_cycle_halves"]
    assert len(halves) == 2 and all(isinstance(h, float) for h in halves)
    # the halves add up to the whole (each over half the cycles)
    assert (halves[0] + halves[1]) / 2 == pytest.approx(report["bytes_per_cycle"], abs=0.02)


async def test_throughput_runs_each_step(server: Server) -> None:
    report = await run_throughput(
        server.url,
        subscribers=10,
        rates=[20, 40],
        step_seconds=0.5,
        p99_limit_ms=1000,  # the machine is shared: only the mechanics are tested here
        timeout=60,
    )
    assert "error" not in report
    steps = report["steps"]
    assert [s["rate"] for s in steps] == [20, 40]
    for step in steps:
        assert step["lost"] == step["duplicated"] == 0
        assert step["events"] >= 0.5 * step["rate"] * 0.5
        assert step["deliveries"] == 10 * step["events"]
        assert step["latency_ms"]["p99"] is not None
    assert report["max_rate_ok"] == 40
    assert all(s["ok"] for s in steps)
    assert report["events"] == sum(s["events"] for s in steps)
    assert exit_code(report) == 0


async def test_a_full_hub_counts_as_failed_connections() -> None:
    async with run_server(Hub("memory://", max_streams=3)) as running:
        report = await run_fanout(running.url, subscribers=5, events=2, timeout=30)
    assert report["connect"]["opened"] == 3
    assert report["connect"]["failed"] == 2
    assert report["connect"]["errors"] == {"overloaded": 2}
    assert report["deliveries"] == 6
    assert exit_code(report) == 1


async def test_the_run_stops_at_its_timeout(server: Server) -> None:
    started = time.monotonic()
    report = await run_fanout(server.url, subscribers=5, events=1000, rate=20, timeout=1)
    assert time.monotonic() - started < 10
    assert "timed out" in report["error"]
    assert exit_code(report) == 1


def test_the_command_prints_a_json_report(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fanout", "--url", server.url, "-n", "5", "--events", "3", "--json"]
    assert main([*args, "--server-pid", str(server.pid)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    for key in (
        "scenario",
        "url",
        "subscribers",
        "processes",
        "connect",
        "latency_ms",
        "fanout_completion_ms",
        "events",
        "deliveries",
        "deliveries_per_second",
        "lost",
        "duplicated",
        "out_of_order",
        "server",
        "loadgen_cpu_seconds",
        "steps",
        "max_rate_ok",
        "cycles",
        "bytes_per_cycle",
    ):
        assert key in report
    assert report["deliveries"] == 15
    assert "ssehub loadgen fanout" in captured.err  # the summary goes to stderr
