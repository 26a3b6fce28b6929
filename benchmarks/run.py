"""Run the ssehub benchmarks: every target, every scenario, one Markdown table.

    python benchmarks/run.py                 # the full run (about 10 minutes)
    python benchmarks/run.py --quick         # small sizes (about a minute)
    python benchmarks/run.py --targets ssehub,floor --scenarios fanout --json results.json

Each (target, scenario) pair gets a fresh server process pinned to one CPU with
``taskset`` and is driven by the load generator (``python -m ssehub.loadgen ... --json
--server-pid PID``) pinned to another CPU; the server is stopped (SIGTERM, then SIGKILL)
before the next pair, so no memory figure carries over. Results are reported as figures
and as ratios to the raw floor measured in the same run, because the machine is shared
and absolute numbers drift from run to run.

Targets:

* ``ssehub``: ``ssehub serve`` in its real configuration: SQLite event log, heartbeats
  and metrics on, ``--max-streams 20000`` (so 10,000 streams fit) and
  ``--log-level warning`` (no access log lines);
* ``ssehub-info``: the same with ``--log-level info`` (an access log line per request),
  run for a few cases only, to show what logging costs;
* ``naive``: ``benchmarks/naive_app.py``, the tutorial pattern (a queue per subscriber);
* ``floor``: ``benchmarks/floor_server.py``, a plain uvloop ``asyncio.Protocol`` server
  that writes each pre-encoded event to every socket in one loop.

The two ``_publish-*`` subcommands are the publish scenario's workers; the runner starts
them itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Final, Literal, cast

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
PYTHON: Final = sys.executable

ALL_TARGETS: Final = ("ssehub", "naive", "floor", "ssehub-info")
DEFAULT_TARGETS: Final = ("ssehub", "naive", "floor", "ssehub-info")
ALL_SCENARIOS: Final = ("idle", "fanout", "throughput", "churn", "publish")
THROUGHPUT_PUBLISHERS: Final = 16
"""Publisher connections in the throughput scenario, the same for every target."""
FLOOR: Final = "floor"
PUBLISH_TOPIC: Final = "bench"
STOP_GRACE_SECONDS: Final = 10.0
START_TIMEOUT_SECONDS: Final = 30.0

Status = Literal["ok", "failed", "timeout", "crashed", "skipped"]


# -- sizes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; ``--quick`` and the size options change these."""

    idle_streams: int
    idle_hold: float
    fanout: tuple[tuple[int, int], ...]
    """(subscribers, events) per fanout case; events are published one at a time."""
    fanout_rounds: int
    """Runs of each fanout case per target (interleaved; the tables show the median).
    The naive baseline runs once: it takes minutes and is nowhere near any bar."""
    throughput: tuple[int, ...]
    """Subscriber counts of the rate ramps."""
    start_deliveries: float
    """First step of a ramp, in deliveries/s (the rate is this divided by subscribers)."""
    throughput_rates: tuple[float, ...]
    """Explicit ramp steps (events/s); empty = doubling from the start, then bisection."""
    step_seconds: float
    bisect_steps: int
    churn_cycles: int
    churn_warmup: int
    publish_seconds: float
    publish_connections: int
    publish_events: int
    publish_chunk: int
    publish_sequential: int
    timeout: float
    """The longest one load-generator run may take (seconds)."""


FULL: Final = Sizes(
    idle_streams=10_000,
    idle_hold=5.0,
    fanout=((1_000, 300), (10_000, 100)),
    fanout_rounds=3,
    throughput=(100, 1_000),
    start_deliveries=2_000.0,
    throughput_rates=(),
    step_seconds=5.0,
    bisect_steps=3,
    churn_cycles=60_000,
    churn_warmup=20_000,
    publish_seconds=5.0,
    publish_connections=32,
    publish_events=200_000,
    publish_chunk=1_000,
    publish_sequential=20_000,
    timeout=300.0,
)
QUICK: Final = Sizes(
    idle_streams=500,
    idle_hold=1.0,
    fanout=((200, 50),),
    fanout_rounds=1,
    throughput=(100,),
    start_deliveries=5_000.0,
    throughput_rates=(),
    step_seconds=1.5,
    bisect_steps=1,
    churn_cycles=2_000,
    churn_warmup=2_000,
    publish_seconds=2.0,
    publish_connections=32,
    publish_events=20_000,
    publish_chunk=1_000,
    publish_sequential=5_000,
    timeout=60.0,
)

# ssehub-info (info logging) runs these cases only: it is a note on what logging costs,
# not a full second target
INFO_SCENARIOS: Final = ("idle", "fanout", "churn", "publish")


# -- runs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One (target, scenario, size) measurement: a fresh server, one worker run."""

    target: str
    scenario: str
    """idle, fanout, throughput, churn, publish-http or publish-hub."""
    size: int
    args: tuple[str, ...]
    timeout: float


@dataclass
class RunResult:
    target: str
    scenario: str
    size: int
    status: Status
    seconds: float = 0.0
    error: str | None = None
    report: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "scenario": self.scenario,
            "size": self.size,
            "status": self.status,
            "seconds": self.seconds,
            "error": self.error,
            "notes": self.notes,
            "report": self.report,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        return cls(
            target=data["target"],
            scenario=data["scenario"],
            size=int(data["size"]),
            status=data["status"],
            seconds=float(data.get("seconds") or 0.0),
            error=data.get("error"),
            report=data.get("report"),
            notes=list(data.get("notes") or []),
        )


def plan(targets: Sequence[str], scenarios: Sequence[str], sizes: Sizes) -> list[Job]:
    """Every job of a run, target by target within each scenario (so the ratios of one
    case are measured close together in time)."""
    jobs: list[Job] = []
    t = sizes.timeout

    def add(
        scenario: str, size: int, args: Sequence[str], timeout: float = t, rounds: int = 1
    ) -> None:
        for round_ in range(rounds):
            for target in targets:
                if round_ and target == "naive":
                    continue
                add_one(target, scenario, size, args, timeout)

    def add_one(target: str, scenario: str, size: int, args: Sequence[str], timeout: float) -> None:
        if target == "ssehub-info" and scenario.split("-")[0] not in INFO_SCENARIOS:
            return
        if scenario == "publish-hub" and target != "ssehub":
            return
        if scenario == "publish-http" and target not in ("ssehub", "ssehub-info", FLOOR):
            return
        if target == "ssehub-info" and scenario == "fanout" and size != sizes.fanout[0][0]:
            return
        jobs.append(Job(target, scenario, size, tuple(args), timeout))

    if "idle" in scenarios:
        n = sizes.idle_streams
        add("idle", n, ["-n", str(n), "--hold", f"{sizes.idle_hold:g}"])
    if "fanout" in scenarios:
        for n, events in sizes.fanout:
            event_timeout = max(5.0, n / 300)
            add(
                "fanout",
                n,
                [
                    "-n",
                    str(n),
                    "--events",
                    str(events),
                    "--rate",
                    "0",
                    "--event-timeout",
                    f"{event_timeout:g}",
                    "--drain-timeout",
                    f"{event_timeout:g}",
                ],
                rounds=sizes.fanout_rounds,
            )
    if "throughput" in scenarios:
        for n in sizes.throughput:
            # Several publisher connections for every target: uvicorn answers pipelined
            # requests on one connection one at a time, so with a durable log (a commit
            # per batch) two connections cap the publish rate, not the fan-out.
            args = ["-n", str(n), "--step-seconds", f"{sizes.step_seconds:g}"]
            args += ["--publishers", str(THROUGHPUT_PUBLISHERS)]
            if sizes.throughput_rates:
                args += ["--rates", ",".join(f"{r:g}" for r in sizes.throughput_rates)]
            else:
                start = max(1.0, round(sizes.start_deliveries / n))
                args += ["--start-rate", f"{start:g}", "--bisect-steps", str(sizes.bisect_steps)]
            add("throughput", n, args)
    if "churn" in scenarios:
        n = sizes.churn_cycles
        add("churn", n, ["--cycles", str(n), "--warmup", str(sizes.churn_warmup)])
    if "publish" in scenarios:
        add(
            "publish-http",
            sizes.publish_connections,
            [
                "--connections",
                str(sizes.publish_connections),
                "--seconds",
                f"{sizes.publish_seconds:g}",
            ],
            timeout=sizes.publish_seconds + 60,
        )
        add(
            "publish-hub",
            sizes.publish_events,
            [
                "--events",
                str(sizes.publish_events),
                "--chunk",
                str(sizes.publish_chunk),
                "--sequential",
                str(sizes.publish_sequential),
            ],
            timeout=sizes.timeout,
        )
    return jobs


@dataclass(frozen=True)
class Pinning:
    server: list[str]
    loadgen: list[str]
    description: str


def pinning() -> Pinning:
    """``taskset -c`` prefixes: the server on the first allowed CPU, the load generator on
    the second; none (with a warning) without taskset or a second CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None:
        warn("taskset (util-linux) not found: running without CPU pinning")
        return Pinning([], [], "none (taskset not found)")
    if len(cpus) < 2:
        warn("fewer than two CPUs available: running without CPU pinning")
        return Pinning([], [], "none (one CPU)")
    server, loadgen = cpus[0], cpus[1]
    return Pinning(
        ["taskset", "-c", str(server)],
        ["taskset", "-c", str(loadgen)],
        f"server on CPU {server}, load generator on CPU {loadgen} (taskset)",
    )


def warn(text: str) -> None:
    print(f"benchmarks: warning: {text}", file=sys.stderr, flush=True)


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft if soft != resource.RLIM_INFINITY else wanted
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft


def _raise_child_limit() -> None:  # pragma: no cover - runs in the child
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def target_command(target: str, port: int, workdir: Path) -> list[str]:
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if target in ("ssehub", "ssehub-info"):
        level = "info" if target == "ssehub-info" else "warning"
        return [
            PYTHON,
            "-m",
            "ssehub",
            "serve",
            *host,
            "--backend",
            f"sqlite:///{workdir / 'bench.db'}",
            "--max-streams",
            "20000",
            "--log-level",
            level,
        ]
    if target == "naive":
        return [PYTHON, str(HERE / "naive_app.py"), *host]
    if target == FLOOR:
        return [PYTHON, str(HERE / "floor_server.py"), *host]
    raise ValueError(f"unknown target {target!r}")


class Server:
    """A target process on a free loopback port, pinned, with its output in files."""

    def __init__(self, target: str, prefix: Sequence[str], workdir: Path) -> None:
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.stdout: IO[bytes] = open(workdir / "server.out", "wb")
        self.stderr: IO[bytes] = open(workdir / "server.err", "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSEHUB_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [*prefix, *target_command(target, self.port, workdir)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.stdout,
            stderr=self.stderr,
            preexec_fn=_raise_child_limit,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.target} exited with {self.proc.returncode} at start: {self.tail()}"
                )
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.target} did not answer /healthz in {timeout:g} s")
            time.sleep(0.05)

    def tail(self, lines: int = 3) -> str:
        self.stderr.flush()
        text = (self.workdir / "server.err").read_text(errors="replace").strip()
        return " | ".join(text.splitlines()[-lines:]) or "(no output)"

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a grace period; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stdout.close()
        self.stderr.close()
        return self.proc.returncode


def run_worker(command: list[str], timeout: float) -> tuple[dict[str, Any] | None, int, str, bool]:
    """Run a worker (the load generator or a publish worker) in its own process group;
    return (its JSON report, exit status, stderr tail, timed out). On a timeout the whole
    group (the worker and its own worker processes) is killed."""
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_raise_child_limit,
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    report: dict[str, Any] | None = None
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                report = json.loads(line)
            break
    tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
    return report, proc.returncode, tail, timed_out


def worker_command(job: Job, url: str, pid: int, pin: Pinning, workdir: Path) -> list[str]:
    """The worker process of a job: the load generator, or one of the publish workers."""
    if job.scenario == "publish-http":
        return [*pin.loadgen, PYTHON, __file__, "_publish-http", "--url", url, *job.args]
    if job.scenario == "publish-hub":
        return [
            *pin.server,
            PYTHON,
            __file__,
            "_publish-hub",
            "--db",
            str(workdir / "hub.db"),
            *job.args,
        ]
    return [
        *pin.loadgen,
        PYTHON,
        "-m",
        "ssehub.loadgen",
        job.scenario,
        "--url",
        url,
        "--json",
        "--quiet",
        "--server-pid",
        str(pid),
        "--timeout",
        f"{job.timeout:g}",
        *job.args,
    ]


def failure_reason(report: dict[str, Any]) -> str | None:
    """Why a load-generator run did not succeed (its exit status 1), or None."""
    if report.get("error"):
        return str(report["error"])
    reasons: list[str] = []
    connect = report.get("connect") or {}
    if connect.get("failed"):
        reasons.append(f"{connect['failed']} streams failed to open {connect.get('errors')}")
    scenario = report.get("scenario")
    if scenario == "fanout":
        for key in ("lost", "duplicated", "out_of_order"):
            if report.get(key):
                reasons.append(f"{report[key]} {key.replace('_', ' ')}")
    if scenario == "throughput" and report.get("max_rate_ok") is None:
        reasons.append("no rate passed (p99 < limit, nothing lost)")
    if scenario == "idle" and report.get("closed_by_server"):
        reasons.append(f"{report['closed_by_server']} streams closed by the server")
    if scenario == "publish-http":
        if not report.get("acknowledged"):
            reasons.append("no publish was acknowledged")
        if report.get("errors"):
            reasons.append(f"errors {report['errors']}")
    return "; ".join(reasons) or None


def run_job(job: Job, pin: Pinning) -> RunResult:
    """Start a fresh target, run the job's worker against it, stop the target."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"ssehub-bench-{job.target}-") as tmp:
        workdir = Path(tmp)
        if job.scenario == "publish-hub":  # in-process: no server at all
            command = worker_command(job, "", 0, pin, workdir)
            report, code, tail, timed_out = run_worker(command, job.timeout)
            return _result(job, report, code, tail, timed_out, started, None)
        server = Server(job.target, pin.server, workdir)
        exited: int | None = None
        try:
            try:
                server.wait_ready()
            except RuntimeError as exc:
                return RunResult(
                    job.target,
                    job.scenario,
                    job.size,
                    "crashed",
                    time.monotonic() - started,
                    str(exc),
                )
            command = worker_command(job, server.url, server.pid, pin, workdir)
            report, code, tail, timed_out = run_worker(command, job.timeout + 45)
            if server.proc.poll() is not None:
                exited = server.proc.returncode
                tail = f"{tail} | server: {server.tail()}"
        finally:
            server.stop()
        return _result(job, report, code, tail, timed_out, started, exited)


def _result(
    job: Job,
    report: dict[str, Any] | None,
    code: int,
    tail: str,
    timed_out: bool,
    started: float,
    exited: int | None,
) -> RunResult:
    seconds = time.monotonic() - started
    result = RunResult(job.target, job.scenario, job.size, "ok", seconds, None, report)
    if exited is not None:
        result.notes.append(f"the {job.target} process exited ({exited}) during the run")
    if report is None:
        result.status = "timeout" if timed_out else "crashed"
        result.error = (
            f"no result within {job.timeout:g} s" if timed_out else f"exit {code}: {tail}"
        )
        return result
    reason = failure_reason(report)
    if timed_out or "timed out" in (reason or ""):
        result.status = "timeout"
        result.error = reason or f"no result within {job.timeout:g} s"
    elif code != 0 or reason:
        result.status = "failed"
        result.error = reason or f"exit {code}: {tail}"
    return result


# -- the publish workers (run as subprocesses) -----------------------------------------------


def _percentiles_ms(values_ns: list[int]) -> dict[str, float | None]:
    if not values_ns:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values_ns)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] / 1e6, 3)

    return {"p50": rank(0.5), "p99": rank(0.99), "max": round(ordered[-1] / 1e6, 3)}


class _PublishConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that posts one event at a time until told to
    stop, counting the answers by status."""

    def __init__(self, request: bytes, stats: _PublishStats) -> None:
        self.request = request
        self.stats = stats
        self.buffer = bytearray()
        self.sent_ns = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if self.stats.stopping:
            self.transport.close()
            return
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            status = int(head[0].split(" ")[1])
            self.stats.answered(status, time.perf_counter_ns() - self.sent_ns)
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stats.stopping:
            self.stats.errors[f"closed: {exc}"] = self.stats.errors.get(f"closed: {exc}", 0) + 1
        if not self.done.done():
            self.done.set_result(None)


@dataclass
class _PublishStats:
    stopping: bool = False
    measuring: bool = False
    acknowledged: int = 0
    other: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def answered(self, status: int, latency_ns: int) -> None:
        if not self.measuring:
            return
        if status == 201:
            self.acknowledged += 1
            self.latencies_ns.append(latency_ns)
        else:
            self.other += 1
            key = f"HTTP {status}"
            self.errors[key] = self.errors.get(key, 0) + 1


async def publish_http(url: str, connections: int, seconds: float) -> dict[str, Any]:
    """``connections`` keep-alive connections posting events back to back for
    ``seconds`` (after a warm-up of up to a second): acknowledged (201) events per second."""
    host, _, port = url.removeprefix("http://").partition(":")
    body = b'{"data":{"n":1,"text":"benchmark event"}}'
    request = (
        f"POST /topics/{PUBLISH_TOPIC}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    stats = _PublishStats()
    loop = asyncio.get_running_loop()
    protocols: list[_PublishConnection] = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(
            lambda: _PublishConnection(request, stats), host, int(port)
        )
        protocols.append(protocol)
    await asyncio.sleep(min(1.0, seconds / 2))  # warm-up
    stats.measuring = True
    cpu_before = time.process_time()
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    stats.measuring = False
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    stats.stopping = True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await asyncio.gather(*(p.done for p in protocols))
    share = cpu / wall if wall > 0 else 0.0
    return {
        "scenario": "publish-http",
        "connections": connections,
        "seconds": round(wall, 3),
        "acknowledged": stats.acknowledged,
        "per_second": round(stats.acknowledged / wall, 1) if wall > 0 else None,
        "other_answers": stats.other,
        "errors": stats.errors,
        "latency_ms": _percentiles_ms(stats.latencies_ns),
        "client_cpu_share": round(share, 3),
        "loadgen_limited": share > 0.85,
    }


async def publish_hub(db: str, events: int, chunk: int, sequential: int) -> dict[str, Any]:
    """``await hub.publish`` in one process with the SQLite log: ``events`` events in
    gathers of ``chunk`` concurrent publishes (group commit), then ``sequential`` events
    one ``await`` after the other."""
    from ssehub import Hub

    hub = Hub(f"sqlite:///{db}")
    ids: set[int] = set()
    async with hub:
        await asyncio.gather(*(hub.publish(PUBLISH_TOPIC, {"warm": i}) for i in range(chunk)))
        started = time.perf_counter()
        done = 0
        while done < events:
            n = min(chunk, events - done)
            batch = await asyncio.gather(
                *(hub.publish(PUBLISH_TOPIC, {"n": done + i}) for i in range(n))
            )
            ids.update(event.id for event in batch)
            done += n
        gathered = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(sequential):
            event = await hub.publish(PUBLISH_TOPIC, {"n": events + i})
            ids.add(event.id)
        one_by_one = time.perf_counter() - started
    return {
        "scenario": "publish-hub",
        "events": events,
        "chunk": chunk,
        "gather_seconds": round(gathered, 3),
        "gather_per_second": round(events / gathered, 1) if gathered > 0 else None,
        "sequential": sequential,
        "sequential_seconds": round(one_by_one, 3),
        "sequential_per_second": round(sequential / one_by_one, 1) if one_by_one > 0 else None,
        "distinct_ids": len(ids),
    }


def _run_loop(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py " + argv[0])
    if argv[0] == "_publish-http":
        parser.add_argument("--url", required=True)
        parser.add_argument("--connections", type=int, default=32)
        parser.add_argument("--seconds", type=float, default=5.0)
        args = parser.parse_args(argv[1:])
        if not args.url.startswith("http://127.") or "/" in args.url[7:]:
            parser.error("--url must be http://127.x.x.x:PORT")
        report = _run_loop(publish_http(args.url, args.connections, args.seconds))
    else:
        parser.add_argument("--db", required=True)
        parser.add_argument("--events", type=int, default=200_000)
        parser.add_argument("--chunk", type=int, default=1_000)
        parser.add_argument("--sequential", type=int, default=20_000)
        args = parser.parse_args(argv[1:])
        report = _run_loop(publish_hub(args.db, args.events, args.chunk, args.sequential))
    print(json.dumps(report))
    return 0


# -- figures ---------------------------------------------------------------------------------


def _get(report: dict[str, Any] | None, *path: str) -> Any:
    value: Any = report
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


Better = Literal["lower", "higher"]


@dataclass(frozen=True)
class Figure:
    """One measured figure: where it comes from, its unit, and the issue's bar."""

    key: str
    title: str
    scenario: str
    unit: str
    better: Better
    extract: Callable[[RunResult], float | None]
    bar: str
    """The issue's target as text."""
    absolute: float | None = None
    """An absolute bar (lower: value <= it; higher: value >= it)."""
    ratio: float | None = None
    """A bar relative to the floor (lower: ratio <= it; higher: ratio >= it)."""
    judged: tuple[str, ...] = ("ssehub", "naive", "ssehub-info")
    """Targets held to the bar (the floor is the reference for ratios)."""
    case: Callable[[RunResult], str] = lambda r: f"{r.size:,}"
    digits: int = 1
    show_ratio: bool = True
    """False where a ratio to the floor means nothing (the floor's own figure is shown)."""
    zero_loss: bool = False
    notes: Callable[[RunResult], list[str]] = lambda r: []


def _kib_per_stream(r: RunResult) -> float | None:
    value = _get(r.report, "server", "rss_bytes_per_stream")
    return None if value is None else value / 1024


def _completion_spread(r: RunResult) -> float | None:
    p50 = _get(r.report, "fanout_completion_ms", "p50")
    p99 = _get(r.report, "fanout_completion_ms", "p99")
    return p99 / p50 if p50 and p99 is not None else None


def _latency_spread(r: RunResult) -> float | None:
    p50 = _get(r.report, "latency_ms", "p50")
    p99 = _get(r.report, "latency_ms", "p99")
    return p99 / p50 if p50 and p99 is not None else None


def _who(r: RunResult) -> str:
    return f"{r.target} ({r.size:,})"


def _loadgen_note(r: RunResult) -> list[str]:
    if _get(r.report, "loadgen_limited"):
        return [f"{_who(r)}: the load generator was CPU-bound (a lower bound)"]
    return []


def _throughput_notes(r: RunResult) -> list[str]:
    steps = _get(r.report, "steps") or []
    best = _get(r.report, "max_rate_ok")
    notes: list[str] = []
    passed = [s for s in steps if s.get("ok") and s.get("rate") == best]
    if passed and passed[-1].get("loadgen_limited"):
        notes.append(f"{_who(r)}: the load generator was CPU-bound at the best step")
    failing = [s for s in steps if not s.get("ok") and best is not None and s["rate"] > best]
    if failing:
        s = min(failing, key=lambda s: s["rate"])
        why = []
        if s.get("achieved_rate", 0) < 0.9 * s["rate"]:
            why.append(f"achieved {s['achieved_rate']:g}/s")
        latency = s.get("latency_ms") or {}
        if latency.get("p99") is not None:
            why.append(
                f"latency p50 {latency['p50']:g} ms, p99 {latency['p99']:g} ms, "
                f"max {latency['max']:g} ms"
            )
        if s.get("lost"):
            why.append(f"{s['lost']} lost")
        limited = " (load generator CPU-bound)" if s.get("loadgen_limited") else ""
        notes.append(
            f"{_who(r)}: the next step, {s['rate']:g} events/s, failed: "
            f"{', '.join(why) or 'see the JSON'}{limited}"
        )
    elif best is not None and steps:
        notes.append(f"{_who(r)}: every step passed up to {best:g} events/s (ramp ended)")
    return notes


def _throughput_case(r: RunResult) -> str:
    return f"{r.size:,} subscribers"


def _throughput_extract(r: RunResult) -> float | None:
    if _get(r.report, "max_rate_ok") is None:
        return None
    value = _get(r.report, "deliveries_per_second")
    return None if value is None else float(value)


def _churn_case(r: RunResult) -> str:
    warmup = _get(r.report, "warmup_cycles")
    return f"{r.size:,} cycles" + (f" after {warmup:,}" if warmup else "")


def _churn_growth(r: RunResult) -> float | None:
    """Steady growth: the smaller of the two halves' growth per cycle (a leak grows in
    both; a one-off step of the allocator shows in one), else the whole run's."""
    halves = _get(r.report, "bytes_per_cycle_halves")
    if isinstance(halves, list) and len(halves) == 2:
        return float(min(halves))
    return _opt_float(_get(r.report, "bytes_per_cycle"))


def _churn_growth_notes(r: RunResult) -> list[str]:
    halves = _get(r.report, "bytes_per_cycle_halves")
    whole = _get(r.report, "bytes_per_cycle")
    if not isinstance(halves, list) or len(halves) != 2 or whole is None:
        return []
    return [
        f"{_who(r)}: {whole:.2f} bytes per cycle over the whole run; "
        f"first half {halves[0]:.2f}, second half {halves[1]:.2f}"
    ]


def _churn_files(r: RunResult) -> float | None:
    value = _get(r.report, "open_files_delta")
    return None if value is None else float(value)


def _publish_http_notes(r: RunResult) -> list[str]:
    notes = []
    if r.target == FLOOR:
        notes.append("floor: no log, no validation beyond JSON: the HTTP client's ceiling")
    if _get(r.report, "loadgen_limited"):
        notes.append(f"{r.target}: the publishing client was CPU-bound")
    errors = _get(r.report, "errors")
    if errors:
        notes.append(f"{r.target}: errors {errors}")
    p99 = _get(r.report, "latency_ms", "p99")
    if p99 is not None:
        notes.append(
            f"{r.target}: publish latency p50 {_get(r.report, 'latency_ms', 'p50')} ms, "
            f"p99 {p99} ms"
        )
    return notes


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


FIGURES: Final[tuple[Figure, ...]] = (
    Figure(
        "idle_memory",
        "Idle memory per open stream",
        "idle",
        "KiB",
        "lower",
        _kib_per_stream,
        "≤ 12 KiB",
        absolute=12.0,
        judged=("ssehub", "naive", "ssehub-info", FLOOR),
        case=lambda r: f"{r.size:,} streams",
    ),
    Figure(
        "cpu_per_delivery",
        "Server CPU per delivery (one event to N subscribers)",
        "fanout",
        "µs",
        "lower",
        lambda r: _opt_float(_get(r.report, "server", "cpu_us_per_delivery")),
        "≤ 1.6x floor",
        ratio=1.6,
        case=lambda r: f"{r.size:,} subscribers",
        digits=2,
        zero_loss=True,
    ),
    Figure(
        "completion_p99",
        "Fan-out completion p99 (publish to the last subscriber)",
        "fanout",
        "ms",
        "lower",
        lambda r: _opt_float(_get(r.report, "fanout_completion_ms", "p99")),
        "≤ 2x floor",
        ratio=2.0,
        case=lambda r: f"{r.size:,} subscribers",
        digits=2,
        zero_loss=True,
        notes=_loadgen_note,
    ),
    Figure(
        "throughput",
        "Sustained deliveries/s with p99 < 50 ms and nothing lost",
        "throughput",
        "/s",
        "higher",
        _throughput_extract,
        "≥ 0.8x floor",
        ratio=0.8,
        case=_throughput_case,
        digits=0,
        notes=_throughput_notes,
    ),
    Figure(
        "opened_burst",
        "Streams opened per second (a burst of N, 200 at a time)",
        "idle",
        "/s",
        "higher",
        lambda r: _opt_float(_get(r.report, "connect", "per_second")),
        "≥ 0.5x floor",
        ratio=0.5,
        case=lambda r: f"{r.size:,} streams",
        digits=0,
        notes=_loadgen_note,
    ),
    Figure(
        "opened_churn",
        "Streams opened per second (open/close cycles, 50 at a time)",
        "churn",
        "/s",
        "higher",
        lambda r: _opt_float(_get(r.report, "cycles_per_second")),
        "≥ 0.5x floor",
        ratio=0.5,
        case=_churn_case,
        digits=0,
        notes=_loadgen_note,
    ),
    Figure(
        "churn_memory",
        "Memory growth per open/close cycle (after warm-up)",
        "churn",
        "bytes",
        "lower",
        _churn_growth,
        "≤ 1 byte",
        absolute=1.0,
        judged=("ssehub", "naive", "ssehub-info", FLOOR),
        case=_churn_case,
        digits=2,
        show_ratio=False,
        notes=_churn_growth_notes,
    ),
    Figure(
        "churn_files",
        "Open files after the cycles, minus before",
        "churn",
        "",
        "lower",
        _churn_files,
        "≤ 0 (back to baseline)",
        absolute=0.0,
        judged=("ssehub", "naive", "ssehub-info", FLOOR),
        case=_churn_case,
        digits=0,
        show_ratio=False,
    ),
    Figure(
        "publish_http",
        "Publish over HTTP, one worker, SQLite log: acknowledged events/s",
        "publish-http",
        "/s",
        "higher",
        lambda r: _opt_float(_get(r.report, "per_second")),
        "≥ 5,000/s",
        absolute=5_000.0,
        judged=("ssehub", "ssehub-info"),
        case=lambda r: f"{r.size} connections",
        digits=0,
        notes=_publish_http_notes,
    ),
    Figure(
        "publish_hub",
        "`await hub.publish`, SQLite log, 1,000 concurrent (group commit)",
        "publish-hub",
        "/s",
        "higher",
        lambda r: _opt_float(_get(r.report, "gather_per_second")),
        "≥ 50,000/s",
        absolute=50_000.0,
        judged=("ssehub",),
        case=lambda r: f"{r.size:,} events",
        digits=0,
    ),
    Figure(
        "publish_hub_sequential",
        "`await hub.publish`, SQLite log, one after the other (for reference)",
        "publish-hub",
        "/s",
        "higher",
        lambda r: _opt_float(_get(r.report, "sequential_per_second")),
        "—",
        judged=(),
        case=lambda r: f"{int(_get(r.report, 'sequential') or 0):,} events",
        digits=0,
    ),
    Figure(
        "gc_completion",
        "GC on: fan-out completion p99 / p50 (largest fanout)",
        "fanout-largest",
        "x",
        "lower",
        _completion_spread,
        "≤ 1.5",
        absolute=1.5,
        judged=("ssehub", "naive", "ssehub-info", FLOOR),
        case=lambda r: f"{r.size:,} subscribers",
        digits=2,
        show_ratio=False,
    ),
    Figure(
        "gc_latency",
        "GC on: delivery latency p99 / p50 (largest fanout, for reference)",
        "fanout-largest",
        "x",
        "lower",
        _latency_spread,
        "— (see the method)",
        judged=(),
        case=lambda r: f"{r.size:,} subscribers",
        digits=2,
        show_ratio=False,
    ),
)


@dataclass
class Row:
    case: str
    target: str
    value: float | None
    text: str
    ratio: float | None
    bar: str
    verdict: str


@dataclass
class Table:
    figure: Figure
    rows: list[Row]
    notes: list[str]


def _format(value: float, figure: Figure) -> str:
    unit = figure.unit
    if figure.digits == 0:
        text = f"{value:,.0f}"
    else:
        text = f"{value:,.{figure.digits}f}"
    if unit in ("", "x"):
        return text + unit
    if unit == "/s":
        return f"{text}/s"
    return f"{text} {unit}"


def _loss(r: RunResult) -> tuple[int, int]:
    return int(_get(r.report, "lost") or 0), int(_get(r.report, "duplicated") or 0)


def _runs_for(figure: Figure, runs: Sequence[RunResult]) -> list[RunResult]:
    if figure.scenario == "fanout-largest":
        fanouts = [r for r in runs if r.scenario == "fanout"]
        if not fanouts:
            return []
        largest = max(r.size for r in fanouts)
        return [r for r in fanouts if r.size == largest]
    return [r for r in runs if r.scenario == figure.scenario]


def _medians(figure: Figure, runs: Sequence[RunResult]) -> tuple[list[RunResult], dict[int, str]]:
    """One run per (target, size): a case run several times (fanout rounds) is shown by
    its run with the median figure (the lower middle of an even count); a failed run
    stands for the case if there is one, so a failure is never hidden by a good round.
    Also a note per median run listing every round's figure."""
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.target, r.size), []).append(r)
    chosen: list[RunResult] = []
    notes: dict[int, str] = {}
    for group in groups.values():
        measured = [(figure.extract(r), r) for r in group if r.status == "ok"]
        valued = sorted(
            ((v, r) for v, r in measured if v is not None and not any(_loss(r))),
            key=lambda pair: pair[0],
        )
        if len(group) == 1 or len(valued) < len(group):
            bad = [r for r in group if r.status != "ok" or any(_loss(r))]
            chosen.append(bad[0] if bad else group[0])
            continue
        _, median = valued[(len(valued) - 1) // 2]
        chosen.append(median)
        figures = ", ".join(_format(v, figure) for v, _ in valued)
        notes[id(median)] = f"median of {len(valued)} runs ({figures})"
    return chosen, notes


def build_tables(runs: Sequence[RunResult], targets: Sequence[str] = ALL_TARGETS) -> list[Table]:
    """One table per figure (skipping figures with no runs), rows in target order."""
    order = {t: i for i, t in enumerate(targets)}
    tables: list[Table] = []
    for figure in FIGURES:
        selected, medians = _medians(figure, _runs_for(figure, runs))
        selected.sort(key=lambda r: (r.size, order.get(r.target, len(order))))
        if not selected:
            continue
        floors = {
            r.size: figure.extract(r) for r in selected if r.target == FLOOR and r.status == "ok"
        }
        rows: list[Row] = []
        notes: list[str] = []
        for r in selected:
            value = figure.extract(r)
            lost, duplicated = _loss(r) if figure.zero_loss else (0, 0)
            text: str
            if value is None:
                text = r.status if r.status != "ok" else "n/a"
                if r.error:
                    notes.append(f"{_who(r)}: {r.status}: {r.error}")
            else:
                text = _format(value, figure)
                if r.status != "ok" and r.error:
                    text += f" ({r.status})"
                    notes.append(f"{_who(r)}: {r.status}: {r.error}")
            base = floors.get(r.size)
            ratio: float | None = None
            if figure.show_ratio and value is not None and base is not None and base > 0:
                ratio = value / base
            verdict = _verdict(figure, r, value, ratio, lost, duplicated)
            if lost or duplicated:
                notes.append(f"{_who(r)}: {lost} lost, {duplicated} duplicated")
            notes.extend(figure.notes(r) if r.report else [])
            notes.extend(f"{_who(r)}: {n}" for n in r.notes)
            if id(r) in medians:
                notes.append(f"{_who(r)}: {medians[id(r)]}")
            rows.append(Row(figure.case(r), r.target, value, text, ratio, figure.bar, verdict))
        tables.append(Table(figure, rows, list(dict.fromkeys(notes))))
    return tables


def _verdict(
    figure: Figure,
    r: RunResult,
    value: float | None,
    ratio: float | None,
    lost: int,
    duplicated: int,
) -> str:
    if r.target == FLOOR and figure.ratio is not None:
        return "reference"
    if r.target not in figure.judged:
        return "—"
    if value is None:
        return "**fail**"
    ok = True
    if figure.absolute is not None:
        if figure.better == "lower":
            ok = value <= figure.absolute
        else:
            ok = value >= figure.absolute
    if figure.ratio is not None:
        if ratio is None:
            return "n/a (no floor)"
        ok = ratio <= figure.ratio if figure.better == "lower" else ratio >= figure.ratio
    if lost or duplicated or r.status != "ok":
        ok = False
    return "pass" if ok else "**fail**"


# -- the document ----------------------------------------------------------------------------


def machine_info(pin: Pinning) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    versions: dict[str, str] = {}
    for package in ("ssehub", "uvicorn", "uvloop", "httptools", "fastapi", "starlette"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "pinning": pin.description,
    }


METHOD: Final = """\
Each target runs as a fresh process per scenario, pinned to one CPU; the load generator
(`python -m ssehub.loadgen`, raw-socket subscribers and publishers) runs pinned to the
other CPU and reads the server's RSS, open files and CPU time from `/proc/PID`. Ratios
compare a target with the raw floor measured in the same run (the machine is shared, so
ratios are steadier than absolute figures). ssehub runs as `ssehub serve` with the SQLite
log, heartbeats and metrics on, `--max-streams 20000` and `--log-level warning`
(`ssehub-info`: the same with `--log-level info`, access lines written to a file)."""


def render_markdown(
    meta: dict[str, Any], runs: Sequence[RunResult], targets: Sequence[str] = ALL_TARGETS
) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    load = meta.get("load_average")
    lines = [
        "# ssehub benchmark results",
        "",
        f"- Date: {meta.get('date', '?')}; mode: {meta.get('mode', '?')}; "
        f"took {meta.get('seconds', 0):.0f} s.",
        f"- Machine: {meta.get('nproc', '?')} CPUs ({meta.get('cpu_model', '?')}), "
        f"Linux {meta.get('kernel', '?')}, Python {meta.get('python', '?')}; {versions}.",
        f"- Pinning: {meta.get('pinning', '?')}. Load average at the start: "
        f"{', '.join(str(x) for x in load) if load else '?'} (a shared machine).",
        f"- Command: `{meta.get('command', 'python benchmarks/run.py')}`",
        "",
        "## Method",
        "",
        METHOD,
        "",
    ]
    for table in build_tables(runs, targets):
        lines += [f"## {table.figure.title}", ""]
        lines += [
            "| case | target | figure | ratio to floor | issue target | pass/fail |",
            "|---|---|---:|---:|---|---|",
        ]
        for row in table.rows:
            ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "—"
            lines.append(
                f"| {row.case} | {row.target} | {row.text} | {ratio} | {row.bar} | {row.verdict} |"
            )
        if table.notes:
            lines.append("")
            lines += [f"- {note}" for note in table.notes]
        lines.append("")
    lines += [
        "## Runs",
        "",
        "| target | scenario | size | status | seconds | error |",
        "|---|---|---:|---|---:|---|",
    ]
    for r in runs:
        error = (r.error or "").replace("|", "/")
        lines.append(
            f"| {r.target} | {r.scenario} | {r.size:,} | {r.status} | {r.seconds:.1f} | {error} |"
        )
    lines.append("")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def _names(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"choose from {', '.join(allowed)} (got {', '.join(unknown) or 'nothing'})"
            )
        return names

    return parse


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("positive integers expected")
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from exc
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("positive numbers expected")
    return values


def _fanout_cases(text: str) -> tuple[tuple[int, int], ...]:
    cases: list[tuple[int, int]] = []
    for part in text.split(","):
        n, _, events = part.partition(":")
        try:
            case = (int(n), int(events or 50))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{part!r} is not SUBSCRIBERS[:EVENTS]") from exc
        if min(case) < 1:
            raise argparse.ArgumentTypeError("positive sizes expected")
        cases.append(case)
    return tuple(cases)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Run the ssehub benchmarks (each target pinned to one CPU, the load "
        "generator on another) and write a Markdown table of figures and ratios to the "
        "raw floor.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "benchmarks-latest.md",
        help="Markdown output (default: docs/benchmarks-latest.md)",
    )
    parser.add_argument("--json", type=Path, help="also save the raw results here")
    parser.add_argument(
        "--targets",
        type=_names(ALL_TARGETS),
        default=DEFAULT_TARGETS,
        help=f"comma-separated, from {','.join(ALL_TARGETS)} (default: all)",
    )
    parser.add_argument(
        "--scenarios",
        type=_names(ALL_SCENARIOS),
        default=ALL_SCENARIOS,
        help=f"comma-separated, from {','.join(ALL_SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="do not run anything: render the table from a saved --json file",
    )
    sizes = parser.add_argument_group("sizes (override the full or --quick defaults)")
    sizes.add_argument("--idle-streams", type=int, metavar="N")
    sizes.add_argument("--idle-hold", type=float, metavar="SECONDS")
    sizes.add_argument("--fanout", type=_fanout_cases, metavar="N:EVENTS,...")
    sizes.add_argument(
        "--fanout-rounds", type=int, metavar="K", help="runs per fanout case and target"
    )
    sizes.add_argument("--throughput-subscribers", type=_ints, metavar="N,...")
    sizes.add_argument("--throughput-rates", type=_floats, metavar="EVENTS/S,...")
    sizes.add_argument("--step-seconds", type=float, metavar="SECONDS")
    sizes.add_argument("--churn-cycles", type=int, metavar="N")
    sizes.add_argument("--churn-warmup", type=int, metavar="N")
    sizes.add_argument("--publish-seconds", type=float, metavar="SECONDS")
    sizes.add_argument("--publish-events", type=int, metavar="N")
    sizes.add_argument("--publish-sequential", type=int, metavar="N")
    sizes.add_argument("--scenario-timeout", type=float, metavar="SECONDS", help="cap on one run")
    return parser


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    overrides = {
        "idle_streams": args.idle_streams,
        "idle_hold": args.idle_hold,
        "fanout": args.fanout,
        "fanout_rounds": args.fanout_rounds,
        "throughput": args.throughput_subscribers,
        "throughput_rates": args.throughput_rates,
        "step_seconds": args.step_seconds,
        "churn_cycles": args.churn_cycles,
        "churn_warmup": args.churn_warmup,
        "publish_seconds": args.publish_seconds,
        "publish_events": args.publish_events,
        "publish_sequential": args.publish_sequential,
        "timeout": args.scenario_timeout,
    }
    return replace(sizes, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_publish-http", "_publish-hub"):
        return worker_main(argv)
    args = build_parser().parse_args(argv)
    targets: tuple[str, ...] = args.targets
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        runs = [RunResult.from_json(r) for r in saved["runs"]]
        document = render_markdown(saved["meta"], runs, saved["meta"].get("targets", targets))
    else:
        document = run_all(args, targets, argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document)
    print(document)
    return 0


def run_all(args: argparse.Namespace, targets: tuple[str, ...], argv: Sequence[str]) -> str:
    sizes = sizes_from(args)
    limit = raise_open_file_limit()
    needed = max(sizes.idle_streams, *(n for n, _ in sizes.fanout)) + 500
    if limit < needed:
        warn(f"open-file limit {limit} is below {needed}: the largest cases may fail")
    pin = pinning()
    meta = machine_info(pin)
    meta["mode"] = "quick" if args.quick else "full"
    meta["command"] = " ".join(["python benchmarks/run.py", *argv])
    meta["targets"] = list(targets)
    jobs = plan(targets, args.scenarios, sizes)
    started = time.monotonic()
    runs: list[RunResult] = []
    for index, job in enumerate(jobs, 1):
        print(
            f"[{index}/{len(jobs)}] {job.target} {job.scenario} {job.size:,} ...",
            end="",
            file=sys.stderr,
            flush=True,
        )
        result = run_job(job, pin)
        runs.append(result)
        print(
            f" {result.status} ({result.seconds:.1f} s)"
            + (f": {result.error}" if result.error else ""),
            file=sys.stderr,
            flush=True,
        )
        meta["seconds"] = time.monotonic() - started
        if args.json is not None:
            save_json(args.json, meta, runs)
    meta["seconds"] = time.monotonic() - started
    if args.json is not None:
        save_json(args.json, meta, runs)
    return render_markdown(meta, runs, targets)


def save_json(path: Path, meta: dict[str, Any], runs: Sequence[RunResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "runs": [r.to_json() for r in runs]}
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
