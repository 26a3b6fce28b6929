"""One contract suite for every EventLog: ids, replay, limits, resume bounds, retention."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ssehub._exceptions import BackendError, BackendUnavailableError, HistoryGoneError
from ssehub._models import Event, NewEvent
from ssehub.backends import EventLog, Retention, SupportsHealth
from ssehub.backends.memory import MemoryEventLog
from ssehub.backends.redis import RedisStreamsEventLog
from ssehub.backends.sqlite import SQLiteEventLog

AnyLog = MemoryEventLog | SQLiteEventLog | RedisStreamsEventLog
LogFactory = Callable[..., Awaitable[AnyLog]]


def _guard(
    m: MemoryEventLog, s: SQLiteEventLog, r: RedisStreamsEventLog
) -> tuple[EventLog, EventLog, EventLog]:
    """Static interface check (mypy): every class satisfies the EventLog protocol."""
    return m, s, r


def _health_guard(
    m: MemoryEventLog, s: SQLiteEventLog, r: RedisStreamsEventLog
) -> tuple[SupportsHealth, SupportsHealth, SupportsHealth]:
    return m, s, r


class FakeClock:
    """A wall clock (Unix seconds) that only moves when told to."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def make_log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LogFactory]:
    """Build started logs of the parametrized kind; all are closed after the test."""
    logs: list[AnyLog] = []
    numbers = itertools.count()

    async def make(
        retention: Retention | None = None, clock: Callable[[], float] = time.time
    ) -> AnyLog:
        log: AnyLog
        if request.param == "memory":
            log = MemoryEventLog(retention, clock=clock)
        elif request.param == "redis":
            # Each log its own sequence, under this test's prefix (deleted afterwards).
            url = request.getfixturevalue("redis_url")
            prefix = f"{request.getfixturevalue('redis_prefix')}:{next(numbers)}"
            log = RedisStreamsEventLog(url, prefix=prefix, retention=retention, clock=clock)
        else:
            log = SQLiteEventLog(str(tmp_path / f"log{next(numbers)}.db"), retention, clock=clock)
        logs.append(log)
        await log.start()
        return log

    yield make
    for log in logs:
        await log.aclose()


@pytest.fixture
async def event_log(make_log: LogFactory) -> AnyLog:
    return await make_log()


def new(topic: str, data: str = "x", **fields: object) -> NewEvent:
    return NewEvent(topic, data, **fields)  # type: ignore[arg-type]


async def read_all(log: AnyLog, topics: list[str], after: int) -> list[Event]:
    return await log.read_after(topics, after, limit=1_000_000)


# --------------------------------------------------------------------------------------
# append, head, origin
# --------------------------------------------------------------------------------------


async def test_append_assigns_consecutive_ids_across_topics(event_log: AnyLog) -> None:
    origin = event_log.origin()
    assert event_log.head() == origin
    before = time.time()
    stored = await event_log.append(
        [new("a", "1"), new("b", "2", event="tick", retry=500), new("a", '{"n": 3}')]
    )
    after = time.time()

    assert [e.id for e in stored] == [origin + 1, origin + 2, origin + 3]
    assert [(e.topic, e.data, e.event, e.retry) for e in stored] == [
        ("a", "1", None, None),
        ("b", "2", "tick", 500),
        ("a", '{"n": 3}', None, None),
    ]
    assert all(before <= e.time <= after for e in stored)
    assert event_log.head() == origin + 3

    more = await event_log.append([new("c"), new("b")])
    assert [e.id for e in more] == [origin + 4, origin + 5]
    assert event_log.head() == origin + 5
    assert event_log.origin() == origin


async def test_append_of_an_empty_batch_changes_nothing(event_log: AnyLog) -> None:
    head = event_log.head()
    assert await event_log.append([]) == []
    assert event_log.head() == head


async def test_origin_is_the_clock_in_microseconds(event_log: AnyLog) -> None:
    now_us = time.time_ns() // 1000
    assert now_us - 60_000_000 < event_log.origin() <= now_us


async def test_a_later_log_starts_above_every_id_of_an_earlier_one(make_log: LogFactory) -> None:
    first = await make_log()
    await first.append([new("a") for _ in range(3)])
    second = await make_log()
    assert second.origin() >= first.head()


# --------------------------------------------------------------------------------------
# read_after
# --------------------------------------------------------------------------------------


async def test_read_after_returns_one_topic_in_order(event_log: AnyLog) -> None:
    stored = await event_log.append([new("a", str(i)) for i in range(5)])
    await event_log.append([new("b")])
    assert await read_all(event_log, ["a"], event_log.origin()) == stored
    assert await read_all(event_log, ["a"], stored[1].id) == stored[2:]


async def test_read_after_merges_topics_in_id_order(event_log: AnyLog) -> None:
    stored = await event_log.append([new(t, str(i)) for i, t in enumerate("abcabcaab")])
    stored += await event_log.append([new("b"), new("c"), new("a")])
    wanted = [e for e in stored if e.topic in ("a", "b")]

    got = await read_all(event_log, ["b", "a"], event_log.origin())
    assert got == wanted
    # A topic named twice does not duplicate its events.
    assert await read_all(event_log, ["a", "b", "a"], event_log.origin()) == wanted
    assert await read_all(event_log, ["a", "b"], stored[4].id) == [
        e for e in wanted if e.id > stored[4].id
    ]


async def test_read_after_many_topics(event_log: AnyLog) -> None:
    topics = [f"t{i}" for i in range(600)]
    stored = await event_log.append([new(t) for t in topics] + [new(t) for t in topics])
    got = await event_log.read_after(topics, event_log.origin(), limit=1000)
    assert got == stored[:1000]


async def test_unknown_topic_reads_empty(event_log: AnyLog) -> None:
    await event_log.append([new("a")])
    assert await read_all(event_log, ["nobody"], event_log.origin()) == []
    assert await read_all(event_log, [], event_log.origin()) == []


async def test_limit_is_honoured_and_paging_has_no_gap_or_duplicate(event_log: AnyLog) -> None:
    stored = await event_log.append([new("ab"[i % 3 % 2], str(i)) for i in range(25)])
    stored += await event_log.append([new("c")])
    wanted = [e for e in stored if e.topic != "c"]

    pages: list[list[Event]] = []
    after = event_log.origin()
    while page := await event_log.read_after(["a", "b"], after, limit=7):
        assert len(page) <= 7
        pages.append(page)
        after = page[-1].id
    assert [len(p) for p in pages] == [7, 7, 7, 4]
    assert [e for p in pages for e in p] == wanted

    single = await event_log.read_after(["a"], event_log.origin(), limit=3)
    assert single == [e for e in wanted if e.topic == "a"][:3]


async def test_limit_must_be_positive(event_log: AnyLog) -> None:
    with pytest.raises(ValueError, match="limit"):
        await event_log.read_after(["a"], event_log.origin(), limit=0)


async def test_after_origin_returns_everything_and_after_head_nothing(event_log: AnyLog) -> None:
    assert await read_all(event_log, ["a"], event_log.origin()) == []
    stored = await event_log.append([new("a"), new("a")])
    assert await read_all(event_log, ["a"], event_log.origin()) == stored
    assert await read_all(event_log, ["a"], event_log.head()) == []


async def test_after_below_origin_is_unknown(event_log: AnyLog) -> None:
    await event_log.append([new("a")])
    with pytest.raises(HistoryGoneError) as caught:
        await event_log.read_after(["a"], event_log.origin() - 1, limit=10)
    assert caught.value.reason == "unknown"
    with pytest.raises(HistoryGoneError) as caught:
        await event_log.read_after(["a"], 0, limit=10)
    assert caught.value.reason == "unknown"


async def test_after_above_head_is_future(event_log: AnyLog) -> None:
    await event_log.append([new("a")])
    with pytest.raises(HistoryGoneError) as caught:
        await event_log.read_after(["a"], event_log.head() + 1, limit=10)
    assert caught.value.reason == "future"
    assert str(event_log.head()) in caught.value.detail


# --------------------------------------------------------------------------------------
# retention
# --------------------------------------------------------------------------------------


async def test_retention_by_count_keeps_the_newest(make_log: LogFactory) -> None:
    log = await make_log(Retention(max_events=5))
    stored: list[Event] = []
    for size in (1, 3, 8):
        stored += await log.append([new("a", str(i)) for i in range(size)])
    await log.trim()

    kept = stored[-5:]
    floor = stored[-6].id
    assert await read_all(log, ["a"], floor) == kept
    assert await read_all(log, ["a"], kept[2].id) == kept[3:]
    for after in (log.origin(), floor - 1):
        with pytest.raises(HistoryGoneError) as caught:
            await log.read_after(["a"], after, limit=10)
        assert caught.value.reason == "trimmed"
        assert "'a'" in caught.value.detail


async def test_trimming_one_topic_leaves_another_resumable(make_log: LogFactory) -> None:
    log = await make_log(Retention(max_events=3))
    quiet = await log.append([new("quiet", "1"), new("quiet", "2")])
    busy = await log.append([new("busy", str(i)) for i in range(10)])
    await log.trim()

    assert await read_all(log, ["quiet"], log.origin()) == quiet
    assert await read_all(log, ["busy"], busy[-4].id) == busy[-3:]
    assert await read_all(log, ["quiet", "busy"], busy[-4].id) == busy[-3:]
    with pytest.raises(HistoryGoneError) as caught:
        await log.read_after(["quiet", "busy"], log.origin(), limit=100)
    assert caught.value.reason == "trimmed"


async def test_retention_by_age(make_log: LogFactory) -> None:
    clock = FakeClock()
    log = await make_log(Retention(max_age=60), clock=clock)
    old = await log.append([new("a", "old1"), new("b", "old"), new("a", "old2")])
    assert all(e.time == clock.now for e in old)
    clock.now += 30
    young = await log.append([new("a", "young")])
    assert await log.trim() == 0
    assert await read_all(log, ["a", "b"], log.origin()) == old + young

    clock.now += 31  # the old events are now 61 s old, the young one 31 s
    assert await log.trim() == 3
    assert await read_all(log, ["a"], old[2].id) == young
    assert await read_all(log, ["b"], old[1].id) == []
    for topic in ("a", "b"):
        with pytest.raises(HistoryGoneError) as caught:
            await log.read_after([topic], log.origin(), limit=10)
        assert caught.value.reason == "trimmed"

    clock.now += 30
    assert await log.trim() == 1
    with pytest.raises(HistoryGoneError):
        await log.read_after(["a"], old[2].id, limit=10)
    assert await read_all(log, ["a"], young[0].id) == []


async def test_retention_by_age_with_the_real_clock(make_log: LogFactory) -> None:
    log = await make_log(Retention(max_age=0.05))
    (event,) = await log.append([new("a")])
    deadline = time.monotonic() + 5
    while time.time() <= event.time + 0.05:  # wait until the event is old enough
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert await log.trim() == 1
    with pytest.raises(HistoryGoneError) as caught:
        await log.read_after(["a"], log.origin(), limit=10)
    assert caught.value.reason == "trimmed"
    assert await read_all(log, ["a"], event.id) == []


async def test_zero_max_age_keeps_events_regardless_of_age(make_log: LogFactory) -> None:
    clock = FakeClock()
    log = await make_log(Retention(max_age=0), clock=clock)
    stored = await log.append([new("a")])
    clock.now += 10 * 365 * 24 * 3600
    assert await log.trim() == 0
    assert await read_all(log, ["a"], log.origin()) == stored


# --------------------------------------------------------------------------------------
# health and closing
# --------------------------------------------------------------------------------------


async def test_check_ready_and_aclose_is_idempotent(event_log: AnyLog) -> None:
    assert isinstance(event_log, SupportsHealth)
    await event_log.check_ready()
    await event_log.append([new("a")])
    head = event_log.head()

    await event_log.aclose()
    await event_log.aclose()
    assert event_log.head() == head
    with pytest.raises(BackendUnavailableError):
        await event_log.check_ready()
    with pytest.raises(BackendError):
        await event_log.append([new("a")])
    with pytest.raises(BackendError):
        await event_log.read_after(["a"], event_log.origin(), limit=10)
