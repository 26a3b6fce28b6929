"""SQLite-specific behaviour: persistence, WAL, staying off the loop, atomic batches, errors."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from pathlib import Path

import pytest

from ssehub._exceptions import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    HistoryGoneError,
)
from ssehub._models import NewEvent
from ssehub.backends import EventLog, Retention
from ssehub.backends.sqlite import SQLiteEventLog, map_sqlite_errors


def _guard(s: SQLiteEventLog) -> EventLog:
    """Static interface check (mypy)."""
    return s


OpenLog = Callable[..., Awaitable[SQLiteEventLog]]


@pytest.fixture
async def open_log(tmp_path: Path) -> AsyncIterator[OpenLog]:
    """Open SQLiteEventLogs; every one is closed after the test (even if already closed)."""
    logs: list[SQLiteEventLog] = []

    async def open_(path: Path, retention: Retention | None = None) -> SQLiteEventLog:
        log = SQLiteEventLog(str(path), retention)
        logs.append(log)
        await log.start()
        return log

    yield open_
    for log in logs:
        await log.aclose()


async def wait_until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def wipe(path: Path) -> None:
    """Delete a database file with its WAL and shared-memory files."""
    for leftover in path.parent.glob(path.name + "*"):
        leftover.unlink()


def raw_connect(path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(path))


# --------------------------------------------------------------------------------------
# persistence
# --------------------------------------------------------------------------------------


async def test_reopen_continues_the_sequence(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    log = SQLiteEventLog(str(path))
    await log.start()
    stored = await log.append([NewEvent("a", "1"), NewEvent("b", "2")])
    origin, head = log.origin(), log.head()
    await log.aclose()

    log = SQLiteEventLog(str(path))
    await log.start()
    try:
        assert (log.origin(), log.head()) == (origin, head)
        assert await log.read_after(["a", "b"], origin, limit=10) == stored
        (more,) = await log.append([NewEvent("a", "3")])
        assert more.id == head + 1
    finally:
        await log.aclose()


async def test_ids_are_never_reused_after_trimming_everything(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    log = SQLiteEventLog(str(path), Retention(max_events=1))
    await log.start()
    await log.append([NewEvent("a", "1"), NewEvent("a", "2")])
    # Remove every row behind the log's back: the sequence lives in `meta`, not in max(id).
    with raw_connect(path) as conn, conn:
        conn.execute("DELETE FROM events")
    head = log.head()
    await log.aclose()

    log = SQLiteEventLog(str(path), Retention(max_events=1))
    await log.start()
    try:
        assert log.head() == head
        (event,) = await log.append([NewEvent("a", "3")])
        assert event.id == head + 1
    finally:
        await log.aclose()


async def test_floors_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    log = SQLiteEventLog(str(path), Retention(max_events=2))
    await log.start()
    stored = await log.append([NewEvent("a", str(i)) for i in range(5)])
    await log.trim()
    await log.aclose()

    log = SQLiteEventLog(str(path), Retention(max_events=2))
    await log.start()
    try:
        with pytest.raises(HistoryGoneError) as caught:
            await log.read_after(["a"], log.origin(), limit=10)
        assert caught.value.reason == "trimmed"
        assert await log.read_after(["a"], stored[2].id, limit=10) == stored[3:]
    finally:
        await log.aclose()


async def test_a_wiped_file_starts_above_every_old_id(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    log = SQLiteEventLog(str(path), Retention(max_events=100_000))
    await log.start()
    await log.append([NewEvent("a", str(i)) for i in range(10_000)])
    old_head = log.head()
    await log.aclose()
    wipe(path)

    log = SQLiteEventLog(str(path))
    await log.start()
    try:
        assert log.origin() > old_head
        with pytest.raises(HistoryGoneError) as caught:
            await log.read_after(["a"], old_head, limit=10)
        assert caught.value.reason == "unknown"
    finally:
        await log.aclose()


# --------------------------------------------------------------------------------------
# WAL, threads, transactions
# --------------------------------------------------------------------------------------


async def test_wal_mode_is_on(tmp_path: Path, open_log: OpenLog) -> None:
    path = tmp_path / "hub.db"
    log = await open_log(path)
    await log.append([NewEvent("a", "1")])
    with raw_connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_large_append_does_not_block_the_event_loop(tmp_path: Path) -> None:
    log = SQLiteEventLog(str(tmp_path / "hub.db"), Retention(max_events=1_000_000))
    await log.start()
    batch = [NewEvent(f"t{i % 10}", "x" * 200) for i in range(20_000)]
    gaps: list[float] = []
    appending = True

    async def tick() -> None:
        last = time.perf_counter()
        while appending:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        await wait_until(lambda: len(gaps) >= 3)
        gaps.clear()
        started = time.perf_counter()
        stored = await log.append(batch)
        duration = time.perf_counter() - started
    finally:
        appending = False
        await ticker
        await log.aclose()

    assert len(stored) == 20_000
    # Run on the loop, the append would be one gap as long as itself.
    assert gaps, "the ticker never ran during the append"
    assert max(gaps) < duration / 2, (max(gaps), duration, len(gaps))


async def test_a_batch_is_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    log = SQLiteEventLog(str(path), Retention(max_events=1_000_000))
    await log.start()
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        with raw_connect(path) as conn:
            while not stop.is_set():
                seen.append(conn.execute("SELECT count(*) FROM events").fetchone()[0])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        await wait_until(lambda: len(seen) > 0)
        stored = await log.append([NewEvent(f"t{i % 7}", str(i)) for i in range(10_000)])
        await wait_until(lambda: 10_000 in seen)
    finally:
        stop.set()
        await asyncio.to_thread(watcher.join)
        await log.aclose()

    assert len(stored) == 10_000
    assert set(seen) == {0, 10_000}


async def test_a_cancelled_append_still_completes_and_moves_head(
    tmp_path: Path, open_log: OpenLog
) -> None:
    log = await open_log(tmp_path / "hub.db", Retention(max_events=1_000_000))
    origin = log.origin()
    task = asyncio.create_task(log.append([NewEvent("a", str(i)) for i in range(5000)]))
    await asyncio.sleep(0)  # let the append hand its batch to the writer thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await wait_until(lambda: log.head() == origin + 5000)
    (event,) = await log.append([NewEvent("a", "next")])
    assert event.id == origin + 5001
    assert len(await log.read_after(["a"], origin, limit=10_000)) == 5001


async def test_count_retention_runs_on_append_when_a_topic_is_well_over(
    tmp_path: Path, open_log: OpenLog
) -> None:
    log = await open_log(tmp_path / "hub.db", Retention(max_events=10))
    first = await log.append([NewEvent("a", str(i)) for i in range(11)])  # within 10 %
    assert len(await log.read_after(["a"], log.origin(), limit=100)) == 11
    second = await log.append([NewEvent("a", "12")])  # now more than 10 % over
    assert await log.read_after(["a"], first[1].id, limit=100) == first[2:] + second
    with pytest.raises(HistoryGoneError):
        await log.read_after(["a"], log.origin(), limit=100)


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


async def test_a_file_that_is_not_a_database_is_a_backend_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not an SQLite database\n" * 200)
    log = SQLiteEventLog(str(path))
    try:
        with pytest.raises(BackendError) as caught:
            await log.start()
    finally:
        await log.aclose()
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    assert "not a database" in caught.value.detail


async def test_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    log = SQLiteEventLog(str(tmp_path / "missing" / "hub.db"))
    try:
        with pytest.raises(ConfigError, match="does not exist"):
            await log.start()
    finally:
        await log.aclose()


@pytest.mark.parametrize("path", ["", ":memory:", "file:hub.db?mode=memory"])
def test_a_non_file_path_is_refused(path: str) -> None:
    with pytest.raises(ConfigError):
        SQLiteEventLog(path)


async def test_use_before_start_is_an_error(tmp_path: Path) -> None:
    log = SQLiteEventLog(str(tmp_path / "hub.db"))
    try:
        with pytest.raises(BackendError, match="start"):
            await log.append([NewEvent("a", "1")])
        with pytest.raises(BackendError, match="start"):
            log.head()
        with pytest.raises(BackendUnavailableError):
            await log.check_ready()
    finally:
        await log.aclose()


def _sqlite_error(code: int, message: str) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorcode = code
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_sqlite_error(5, "database is locked"), BackendUnavailableError),
        (_sqlite_error(6, "database table is locked"), BackendUnavailableError),
        (_sqlite_error(5 | (1 << 8), "database is locked"), BackendUnavailableError),
        (_sqlite_error(10, "disk I/O error"), BackendError),
        (sqlite3.IntegrityError("UNIQUE constraint failed"), BackendError),
    ],
)
def test_map_sqlite_errors(exc: sqlite3.Error, expected: type[BackendError]) -> None:
    with pytest.raises(expected) as caught, map_sqlite_errors("testing"):
        raise exc
    assert type(caught.value) is expected
    assert caught.value.__cause__ is exc
    assert "testing" in caught.value.detail


def test_other_errors_pass_through_map_sqlite_errors() -> None:
    with pytest.raises(KeyError), map_sqlite_errors("testing"):
        raise KeyError("x")


async def test_a_locked_database_is_reported_as_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real SQLITE_BUSY from another process's write lock maps to BackendUnavailableError."""
    monkeypatch.setattr("ssehub.backends.sqlite.BUSY_TIMEOUT_MS", 50)
    path = tmp_path / "hub.db"
    log = SQLiteEventLog(str(path))
    await log.start()
    try:
        with raw_connect(path) as other:
            other.isolation_level = None
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(BackendUnavailableError) as caught:
                await log.append([NewEvent("a", "1")])
            other.execute("ROLLBACK")
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        (event,) = await log.append([NewEvent("a", "1")])  # the log recovers
        assert event.id == log.origin() + 1
    finally:
        await log.aclose()
