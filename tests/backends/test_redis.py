"""Redis-specific behaviour: one sequence across nodes, wipes, floors, pub/sub, outages."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio
import redis.exceptions as redis_errors

from ssehub._exceptions import BackendError, BackendUnavailableError, ConfigError, HistoryGoneError
from ssehub._models import Event, NewEvent
from ssehub.backends import EventLog, Retention, SupportsHealth, SupportsSize, open_event_log
from ssehub.backends import redis as redis_backend
from ssehub.backends.redis import RedisStreamsEventLog, decode_announcement, map_redis_errors

from ..helpers import free_port
from ..redis_support import RedisServer, unique_prefix

pytestmark = pytest.mark.redis


def _guard(r: RedisStreamsEventLog) -> tuple[EventLog, SupportsHealth, SupportsSize]:
    """Static interface check (mypy)."""
    return r, r, r


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


OpenLog = Callable[..., Awaitable[RedisStreamsEventLog]]


@pytest.fixture
async def open_log(redis_url: str, redis_prefix: str) -> AsyncIterator[OpenLog]:
    """Start RedisStreamsEventLogs (by default on this test's prefix); close them after."""
    logs: list[RedisStreamsEventLog] = []

    async def open_(url: str = redis_url, prefix: str = redis_prefix, **kwargs: object):
        log = RedisStreamsEventLog(url, prefix=prefix, **kwargs)  # type: ignore[arg-type]
        logs.append(log)
        await log.start()
        return log

    yield open_
    for log in logs:
        await log.aclose()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def new(topic: str, data: str = "x", **fields: object) -> NewEvent:
    return NewEvent(topic, data, **fields)  # type: ignore[arg-type]


async def stream_ids(client: redis.asyncio.Redis, key: str) -> list[int]:
    entries: list[tuple[bytes, object]] = await client.xrange(key)  # type: ignore[assignment]
    return [int(entry_id.split(b"-")[0]) for entry_id, _ in entries]


# --------------------------------------------------------------------------------------
# one sequence for every node
# --------------------------------------------------------------------------------------


async def test_two_nodes_appending_concurrently_share_one_sequence(
    open_log: OpenLog, raw: redis.asyncio.Redis
) -> None:
    one = await open_log()
    two = await open_log()
    assert one.origin() == two.origin()

    async def publish(log: RedisStreamsEventLog, node: str) -> list[list[Event]]:
        return [
            await log.append([new("ab"[(i + j) % 2], f"{node}{i}.{j}") for j in range(3)])
            for i in range(20)
        ]

    batches_one, batches_two = await asyncio.gather(publish(one, "one"), publish(two, "two"))
    batches = batches_one + batches_two
    for batch in batches:  # each batch has consecutive ids
        assert [e.id for e in batch] == list(range(batch[0].id, batch[0].id + 3))
    stored = sorted((e for batch in batches for e in batch), key=lambda e: e.id)
    ids = [e.id for e in stored]
    assert len(set(ids)) == 120
    # Together the nodes used every id from the origin on: no gap, no duplicate.
    assert ids == list(range(one.origin() + 1, one.origin() + 121))

    # Storage order is id order, and each node reads what the other appended.
    for topic in "ab":
        assert await stream_ids(raw, one.topic_key(topic)) == [
            e.id for e in stored if e.topic == topic
        ]
    for log in (one, two):
        assert await log.read_after(["a", "b"], log.origin(), limit=1000) == stored
    assert await one.current_head() == ids[-1] == one.head()


async def test_head_is_this_nodes_view_and_current_head_asks_redis(open_log: OpenLog) -> None:
    one = await open_log()
    two = await open_log()
    stored = await two.append([new("a"), new("b")])
    assert one.head() == one.origin()  # one has not heard of it yet
    assert await one.read_after(["a"], one.origin(), limit=10) == stored[:1]
    assert one.head() == stored[-1].id  # a read brings the node's view up to date
    more = await two.append([new("a")])
    assert await one.current_head() == more[0].id == one.head()


async def test_a_read_checks_bounds_against_redis_not_the_cached_head(open_log: OpenLog) -> None:
    one = await open_log()
    two = await open_log()
    (event,) = await two.append([new("a")])
    # one.head() is stale, yet a resume point issued by the other node is not "future".
    assert await one.read_after(["a"], event.id, limit=10) == []
    with pytest.raises(HistoryGoneError) as caught:
        await one.read_after(["a"], event.id + 1, limit=10)
    assert caught.value.reason == "future"
    with pytest.raises(HistoryGoneError) as caught:
        await one.read_after(["a"], 2**63, limit=10)
    assert caught.value.reason == "future"


async def test_large_ids_are_written_exactly(open_log: OpenLog, raw: redis.asyncio.Redis) -> None:
    """Lua numbers are doubles: ids are formatted with %.0f, never tostring (4e+15)."""
    prefix = unique_prefix()
    start = 4_000_000_000_000_000
    await raw.mset({f"{prefix}:seq": start, f"{prefix}:origin": start})
    try:
        log = await open_log(prefix=prefix)
        stored = await log.append([new("a"), new("b"), new("a")])
        assert [e.id for e in stored] == [start + 1, start + 2, start + 3]
        assert await stream_ids(raw, log.topic_key("a")) == [start + 1, start + 3]
        assert await raw.get(f"{prefix}:seq") == str(start + 3).encode()
        assert await log.read_after(["a", "b"], start, limit=10) == stored
    finally:
        await raw.delete(*[key async for key in raw.scan_iter(match=f"{prefix}*")])


async def test_events_round_trip_every_field(open_log: OpenLog) -> None:
    log = await open_log()
    stored = await log.append(
        [
            new("a", "line 1\nline 2\r\n\u2028 ünïcødé ✓"),
            new("a", '{"n": 1}', event="tick", retry=0),
            new("a", "", retry=3000),
        ]
    )
    assert await log.read_after(["a"], log.origin(), limit=10) == stored


# --------------------------------------------------------------------------------------
# a wiped Redis
# --------------------------------------------------------------------------------------


async def test_a_wiped_redis_makes_old_ids_unknown_and_new_ids_higher(
    open_log: OpenLog, own_redis_url: str
) -> None:
    """On a Redis of the tests' own: FLUSHDB would wipe everyone's keys."""
    log = await open_log(own_redis_url, unique_prefix())
    old = await log.append([new("a"), new("b"), new("a")])
    old_origin = log.origin()
    client = redis.asyncio.Redis.from_url(own_redis_url)
    try:
        await client.flushdb()
        # A read finds the sequence gone, seeds it again, and refuses the old id.
        with pytest.raises(HistoryGoneError) as caught:
            await log.read_after(["a"], old[-1].id, limit=10)
        assert caught.value.reason == "unknown"
        assert log.origin() > old[-1].id > old_origin
        assert log.head() == log.origin()

        await client.flushdb()
        # An append seeds the sequence itself; its ids are above every old one.
        fresh = await log.append([new("a")])
        assert fresh[0].id > old[-1].id
        assert fresh[0].id == log.origin() + 1 == log.head()
        assert await log.read_after(["a"], log.origin(), limit=10) == fresh
        with pytest.raises(HistoryGoneError) as caught:
            await log.read_after(["a"], old[0].id, limit=10)
        assert caught.value.reason == "unknown"
    finally:
        await client.aclose()


async def test_a_lost_sequence_is_seeded_above_the_streams_left(
    open_log: OpenLog, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    log = await open_log()
    high = 8_000_000_000_000_000  # far above the clock, below 2**53
    await raw.mset({f"{redis_prefix}:seq": high, f"{redis_prefix}:origin": high})
    stored = await log.append([new("a"), new("a")])
    await raw.delete(f"{redis_prefix}:seq", f"{redis_prefix}:origin")
    (event,) = await log.append([new("b")])
    assert event.id == stored[-1].id + 1
    assert log.origin() == stored[-1].id
    with pytest.raises(HistoryGoneError) as caught:
        await log.read_after(["a"], stored[0].id, limit=10)
    assert caught.value.reason == "unknown"


async def test_a_topic_whose_stream_vanished_is_trimmed_not_empty(
    open_log: OpenLog, raw: redis.asyncio.Redis
) -> None:
    log = await open_log()
    await log.append([new("a"), new("b")])
    await raw.delete(log.topic_key("a"))  # e.g. evicted under memory pressure
    with pytest.raises(HistoryGoneError) as caught:
        await log.read_after(["a", "b"], log.origin(), limit=10)
    assert caught.value.reason == "trimmed"


# --------------------------------------------------------------------------------------
# retention
# --------------------------------------------------------------------------------------


async def test_trimming_by_count_records_the_floor(
    open_log: OpenLog, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    log = await open_log(retention=Retention(max_events=4))
    stored = await log.append([new("a", str(i)) for i in range(5)])
    assert await log.trim() == 1
    assert await raw.hget(f"{redis_prefix}:floors", "a") == str(stored[0].id).encode()
    assert await raw.xlen(log.topic_key("a")) == 4
    assert await log.read_after(["a"], stored[0].id, limit=10) == stored[1:]
    with pytest.raises(HistoryGoneError) as caught:
        await log.read_after(["a"], stored[0].id - 1, limit=10)
    assert caught.value.reason == "trimmed"
    assert str(stored[0].id) in caught.value.detail
    assert log.event_count() == 4


async def test_appends_keep_each_topic_near_max_events(open_log: OpenLog) -> None:
    log = await open_log(retention=Retention(max_events=20))
    for _ in range(10):
        await log.append([new("a") for _ in range(5)])
        assert 0 < log.event_count() <= 22  # at most 10 % over until the next trim
    assert await log.trim() <= 2
    assert log.event_count() == 20


async def test_trim_finishes_work_beyond_one_scripts_budget(
    open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_backend, "APPEND_TRIM_BUDGET", 2)
    monkeypatch.setattr(redis_backend, "TRIM_BUDGET", 3)
    monkeypatch.setattr(redis_backend, "TRIM_TOPICS_PER_CALL", 2)
    clock = FakeClock()
    log = await open_log(retention=Retention(max_events=3, max_age=60), clock=clock)
    stored = await log.append([new("a", str(i)) for i in range(12)])
    stored += await log.append([new(t) for t in "bcdef"])
    # The append removed only its budget; trim removes the rest exactly.
    assert await log.trim() == 12 - 3 - 2
    assert await log.read_after(["a"], stored[8].id, limit=10) == stored[9:12]
    with pytest.raises(HistoryGoneError):
        await log.read_after(["a"], stored[7].id, limit=10)

    clock.now += 61
    assert await log.trim() == 3 + 5
    assert log.event_count() == 0
    for topic in "abcdef":
        assert await log.read_after([topic], log.head(), limit=10) == []


async def test_the_background_trim_ages_out_idle_topics(open_log: OpenLog) -> None:
    clock = FakeClock()
    log = await open_log(retention=Retention(max_age=60), clock=clock, trim_interval=0.01)
    await log.append([new("idle")])
    clock.now += 61

    async def trimmed() -> bool:
        try:
            await log.read_after(["idle"], log.origin(), limit=10)
        except HistoryGoneError:
            return True
        return False

    deadline = time.monotonic() + 10
    while not await trimmed():  # polling the state in Redis, with a deadline
        assert time.monotonic() < deadline, "the background trim did not run"
        await asyncio.sleep(0.01)
    assert log.event_count() == 0


# --------------------------------------------------------------------------------------
# the announcement for other nodes
# --------------------------------------------------------------------------------------


async def test_each_append_is_published_with_its_ids(
    open_log: OpenLog, raw: redis.asyncio.Redis
) -> None:
    log = await open_log()
    pubsub = raw.pubsub()
    try:
        await pubsub.subscribe(log.channel)
        async with asyncio.timeout(5):
            confirmation = await pubsub.get_message(timeout=5)
        assert confirmation is not None and confirmation["type"] == "subscribe"

        first = await log.append([new("a", '{"x": [1, "é"]}', event="e", retry=10), new("b")])
        second = await log.append([new("a", "line\nline")])
        received: list[list[Event]] = []
        async with asyncio.timeout(5):
            while len(received) < 2:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                if message is not None:
                    received.append(decode_announcement(message["data"]))
        assert received == [first, second]
        assert received[1][0].id == received[0][-1].id + 1  # consecutive across batches
    finally:
        await pubsub.aclose()


# --------------------------------------------------------------------------------------
# outages and errors
# --------------------------------------------------------------------------------------


async def test_start_against_a_closed_port_is_unavailable() -> None:
    log = RedisStreamsEventLog(f"redis://127.0.0.1:{free_port()}/0", prefix=unique_prefix())
    with pytest.raises(BackendUnavailableError):
        await log.check_ready()
    began = time.monotonic()
    with pytest.raises(BackendUnavailableError) as caught:
        await log.start()
    assert time.monotonic() - began < 2.5
    assert isinstance(caught.value.__cause__, redis_errors.ConnectionError)
    await log.aclose()
    await log.aclose()


async def test_a_stopped_redis_fails_fast_and_a_frozen_one_times_out(
    open_log: OpenLog, start_redis: Callable[[], RedisServer]
) -> None:
    server = start_redis()
    log = await open_log(server.url, unique_prefix())
    await log.append([new("a")])
    await log.check_ready()

    server.pause()  # connections stay open, nothing answers
    try:
        began = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            await log.append([new("a")])
        assert time.monotonic() - began < 2.5
        began = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            await log.check_ready()
        assert time.monotonic() - began < 2.5
    finally:
        server.resume()
    await log.check_ready()
    head = await log.current_head()  # the timed-out append may or may not have run
    (event,) = await log.append([new("a")])
    assert event.id > head
    assert (await log.read_after(["a"], head, limit=10))[-1] == event

    server.stop()  # connection refused
    began = time.monotonic()
    with pytest.raises(BackendUnavailableError):
        await log.append([new("a")])
    with pytest.raises(BackendUnavailableError):
        await log.read_after(["a"], log.origin(), limit=10)
    with pytest.raises(BackendUnavailableError):
        await log.check_ready()
    assert time.monotonic() - began < 2.5


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (redis_errors.ConnectionError("refused"), BackendUnavailableError),
        (redis_errors.TimeoutError("slow"), BackendUnavailableError),
        (redis_errors.BusyLoadingError("loading"), BackendUnavailableError),
        (redis_errors.ReadOnlyError("replica"), BackendUnavailableError),
        (TimeoutError(), BackendUnavailableError),
        (redis_errors.ResponseError("WRONGTYPE"), BackendError),
        (redis_errors.AuthenticationError("bad password"), BackendError),
        (redis_errors.RedisError("other"), BackendError),
    ],
)
def test_map_redis_errors(error: Exception, expected: type[BackendError]) -> None:
    with pytest.raises(expected) as caught, map_redis_errors("doing it"):
        raise error
    assert type(caught.value) is expected
    assert caught.value.__cause__ is error
    assert "doing it" in caught.value.detail


def test_map_redis_errors_leaves_other_errors_alone() -> None:
    with pytest.raises(KeyError), map_redis_errors("doing it"):
        raise KeyError("x")


async def test_a_failing_script_is_a_backend_error_and_stores_nothing(
    open_log: OpenLog, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    log = await open_log()
    await raw.set(f"{redis_prefix}:seq", "not a number")
    with pytest.raises(BackendError) as caught:
        await log.append([new("a")])
    assert not isinstance(caught.value, BackendUnavailableError)
    assert isinstance(caught.value.__cause__, redis_errors.ResponseError)
    assert await raw.exists(log.topic_key("a")) == 0


async def test_a_client_that_decodes_responses_is_refused(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        log = RedisStreamsEventLog(client=client, prefix=unique_prefix())
        with pytest.raises(ConfigError, match="decode"):
            await log.start()
    finally:
        await client.aclose()


async def test_a_given_client_is_used_and_left_open(
    redis_url: str, redis_prefix: str, raw: redis.asyncio.Redis
) -> None:
    log = RedisStreamsEventLog(client=raw, prefix=redis_prefix)
    await log.start()
    stored = await log.append([new("a")])
    await log.aclose()
    assert await raw.xlen(log.topic_key("a")) == len(stored)  # still usable


# --------------------------------------------------------------------------------------
# open_event_log
# --------------------------------------------------------------------------------------


def test_open_event_log_builds_a_redis_log_from_the_url() -> None:
    log = open_event_log("redis://127.0.0.1:6399/2?prefix=myapp&max_events=7&max_age=30")
    assert isinstance(log, RedisStreamsEventLog)
    assert log.prefix == "myapp"
    assert log.channel == "myapp:events"
    assert log.topic_key("a/b") == "myapp:t:a/b"
    assert repr(log) == (
        "RedisStreamsEventLog(prefix='myapp', retention=Retention(max_events=7, max_age=30.0))"
    )

    default = open_event_log("rediss://cache.example:6380/0")
    assert isinstance(default, RedisStreamsEventLog) and default.prefix == "ssehub"
    with pytest.raises(ConfigError, match="stream_maxlen"):
        open_event_log("redis://127.0.0.1/0?stream_maxlen=5")


def test_open_event_log_without_redis_py_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "ssehub.backends.redis")
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigError, match=r"pip install 'ssehub\[redis\]'"):
        open_event_log("redis://127.0.0.1:6379/0")
