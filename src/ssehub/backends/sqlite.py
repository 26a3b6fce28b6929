"""SQLite EventLog: one file in WAL mode, every database call off the event loop.

Threads:

* one writer thread owns the writing connection and runs ``start``, ``append``,
  ``trim`` and the close, one after another (appends are group commits: a whole batch
  is one transaction);
* a small pool of reader threads, each with its own connection, serves ``read_after``;
  WAL lets them read while the writer writes, each read seeing one committed snapshot.

The id sequence lives in the ``meta`` table (``origin``, ``last_id``), so a reopened
file continues where it stopped; a new (or wiped) file seeds it from the clock in
microseconds, above any id an earlier file could have issued. Retention removes a
prefix of each topic and records the highest removed id per topic in ``topics``
(the floor), in the same transaction, so a resume point below it is refused.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from itertools import islice
from typing import Final, TypeVar, final

from .._exceptions import BackendError, BackendUnavailableError, ConfigError
from .._models import Event, NewEvent, Topic
from . import Retention
from .memory import _check_bounds, _check_limit, _trimmed

__all__ = ["SQLiteEventLog", "map_sqlite_errors"]

T = TypeVar("T")

BUSY_TIMEOUT_MS: Final = 5000
"""How long a connection waits for a lock held by another process before failing."""

READER_THREADS: Final = 2

TRIM_INTERVAL: Final = 1.0
"""Seconds between automatic retention passes (run after an append)."""

_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)",
    "CREATE TABLE IF NOT EXISTS events ("
    " id INTEGER PRIMARY KEY, topic TEXT NOT NULL, event TEXT, data TEXT NOT NULL,"
    " retry INTEGER, time REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_topic_id ON events (topic, id)",
    "CREATE TABLE IF NOT EXISTS topics (topic TEXT PRIMARY KEY, floor INTEGER NOT NULL)",
)
_INSERT: Final = (
    "INSERT INTO events (id, topic, event, data, retry, time) VALUES (?, ?, ?, ?, ?, ?)"
)
_SELECT_TOPIC: Final = (
    "SELECT id, topic, event, data, retry, time FROM events"
    " WHERE topic = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?"
)
_RAISE_FLOOR: Final = (
    "INSERT INTO topics (topic, floor) VALUES (?, ?)"
    " ON CONFLICT (topic) DO UPDATE SET floor = max(floor, excluded.floor)"
)
_MAX_PARAMS: Final = 500
"""Topics per ``IN (...)`` list, well under SQLite's bound-parameter limit."""


@contextmanager
def map_sqlite_errors(action: str) -> Iterator[None]:
    """Turn :mod:`sqlite3` errors raised inside the block into ssehub errors.

    A busy or locked database becomes :class:`~ssehub.BackendUnavailableError`
    (transient); any other :class:`sqlite3.Error` becomes :class:`~ssehub.BackendError`.
    """
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED):
            raise BackendUnavailableError(f"SQLite event log busy while {action}: {exc}") from exc
        raise BackendError(f"SQLite event log failed while {action}: {exc}") from exc


def _mapped(action: str, call: Callable[[], T]) -> T:
    with map_sqlite_errors(action):
        return call()


@final
class SQLiteEventLog:
    """An :class:`~ssehub.backends.EventLog` stored in one SQLite file.

    Retention runs in :meth:`trim` and automatically after appends: at most every
    :data:`TRIM_INTERVAL` seconds, or at once for a topic more than 10 % over
    ``max_events``. ``clock`` (Unix seconds) stamps events; tests may replace it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        retention: Retention | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        path = os.fspath(path)
        if not path or path == ":memory:" or path.startswith("file:"):
            raise ConfigError(
                f"the SQLite event log needs a file path, not {path!r} (use memory:// instead)"
            )
        self._path = path
        self._retention = retention or Retention()
        self._clock = clock
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssehub-sqlite-w")
        self._readers = ThreadPoolExecutor(
            max_workers=READER_THREADS, thread_name_prefix="ssehub-sqlite-r"
        )
        # Loop-side state: what head()/origin() answer and read_after checks against.
        self._origin = 0
        self._head = 0
        self._started = False
        self._closed = False
        self._close_task: asyncio.Future[None] | None = None
        # Writer-thread state.
        self._conn: sqlite3.Connection | None = None
        self._origin_w = 0
        self._last_id = 0
        self._counts: dict[Topic, int] = {}
        self._counts_stale = False
        self._event_count = 0
        self._last_trim = 0.0
        # Reader-thread state.
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteEventLog({self._path!r}, retention={self._retention!r})"

    # -- EventLog -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or create) the file and load the id sequence."""
        self._check_not_closed()
        if self._started:
            return
        origin, last_id = await self._run(self._writer, "opening the database", self._open_sync)
        self._origin = origin
        self._head = last_id
        self._started = True

    async def append(self, events: Sequence[NewEvent]) -> list[Event]:
        """Append ``events`` as one transaction with consecutive ids; return them stored.

        The write finishes even if the caller is cancelled meanwhile (``head()`` then
        still moves past it), so ids are never handed out twice.
        """
        self._check_usable()
        batch = tuple(events)
        if not batch:
            return []
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._writer, _mapped, "appending", partial(self._append_sync, batch)
        )
        future.add_done_callback(self._appended)
        return await asyncio.shield(future)

    async def read_after(self, topics: Sequence[Topic], after: int, *, limit: int) -> list[Event]:
        """Events of ``topics`` with ``id > after``, in id order, at most ``limit``.

        Only events up to ``head()`` at the time of the call are returned. Raises
        :class:`~ssehub.HistoryGoneError` as the protocol describes; the floor check and
        the read use one snapshot, so a concurrent trim cannot open a silent gap.
        """
        self._check_usable()
        _check_limit(limit)
        head = self._head
        _check_bounds(after, self._origin, head)
        wanted = list(dict.fromkeys(topics))
        if not wanted or after == head:
            return []
        return await self._run(
            self._readers, "reading events", partial(self._read_sync, wanted, after, head, limit)
        )

    def event_count(self) -> int:
        """Events retained over all topics, as of the last append or trim (SupportsSize)."""
        return self._event_count

    def head(self) -> int:
        """The last id issued (the origin before the first append)."""
        self._check_started()
        return self._head

    def origin(self) -> int:
        """The id just before the first id this file issued."""
        self._check_started()
        return self._origin

    async def trim(self) -> int:
        """Apply retention by count and age now; return the number of events removed."""
        self._check_usable()
        return await self._run(self._writer, "trimming", self._trim_sync)

    async def check_ready(self) -> None:
        """Run a trivial query on a reader connection; raise BackendUnavailableError if not."""
        if self._closed or not self._started:
            raise BackendUnavailableError("the SQLite event log is not open")
        try:
            await self._run(self._readers, "checking readiness", self._ping_sync)
        except BackendUnavailableError:
            raise
        except BackendError as exc:
            raise BackendUnavailableError(exc.detail) from exc

    async def aclose(self) -> None:
        """Finish queued writes, stop the threads and close every connection. Idempotent."""
        self._closed = True
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    # -- loop side ----------------------------------------------------------------------

    async def _run(self, executor: ThreadPoolExecutor, action: str, call: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, _mapped, action, call)

    def _appended(self, future: asyncio.Future[list[Event]]) -> None:
        # Runs on the loop before the appending task resumes (or after it was cancelled).
        if future.cancelled() or future.exception() is not None:
            return
        stored = future.result()
        self._head = max(self._head, stored[-1].id)

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        # Queued behind any pending append or trim, so those finish first.
        await loop.run_in_executor(self._writer, self._close_writer_sync)
        await asyncio.to_thread(self._shutdown_sync)

    def _check_not_closed(self) -> None:
        if self._closed:
            raise BackendError("the SQLite event log is closed")

    def _check_started(self) -> None:
        if not self._started:
            raise BackendError("the SQLite event log is not started; call start() first")

    def _check_usable(self) -> None:
        self._check_not_closed()
        self._check_started()

    # -- writer thread ------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # explicit BEGIN/COMMIT only
            check_same_thread=False,  # created and closed from different threads
            cached_statements=256,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_sync(self) -> tuple[int, int]:
        directory = os.path.dirname(os.path.abspath(self._path))
        if self._conn is not None:  # start() called twice concurrently
            return self._origin_w, self._last_id
        if not os.path.isdir(directory):
            raise ConfigError(
                f"cannot open the SQLite event log {self._path!r}: "
                f"directory {directory!r} does not exist"
            )
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            (max_id,) = conn.execute("SELECT max(id) FROM events").fetchone()
            origin, last_id = meta.get("origin"), meta.get("last_id")
            if not isinstance(origin, int) or not isinstance(last_id, int):
                # A new file: seed from the clock so no earlier file's ids come back.
                origin = last_id = max(time.time_ns() // 1000, max_id or 0)
            last_id = max(last_id, max_id or 0)
            conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (("origin", origin), ("last_id", last_id)),
            )
            counts = dict(conn.execute("SELECT topic, count(*) FROM events GROUP BY topic"))
            conn.execute("COMMIT")
        except BaseException:
            conn.close()  # rolls back an open transaction
            raise
        self._conn = conn
        self._origin_w = origin
        self._last_id = last_id
        self._counts = counts
        self._event_count = sum(counts.values())
        self._last_trim = time.monotonic()
        return origin, last_id

    def _append_sync(self, batch: tuple[NewEvent, ...]) -> list[Event]:
        conn = self._writer_conn()
        now = self._clock()
        first = self._last_id + 1
        stored = [
            Event(first + i, new.topic, new.data, new.event, new.retry, now)
            for i, new in enumerate(batch)
        ]
        last = stored[-1].id
        added = Counter(event.topic for event in stored)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                _INSERT, [(e.id, e.topic, e.event, e.data, e.retry, e.time) for e in stored]
            )
            conn.execute("UPDATE meta SET value = ? WHERE key = 'last_id'", (last,))
            counts = self._counts
            for topic, n in added.items():
                counts[topic] = counts.get(topic, 0) + n
            self._auto_trim(added, now)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._last_id = last
        self._event_count = sum(self._counts.values())
        return stored

    def _auto_trim(self, added: Iterable[Topic], now: float) -> None:
        """Inside the append's transaction: keep retention roughly in force."""
        mono = time.monotonic()
        if mono - self._last_trim >= TRIM_INTERVAL:
            self._trim_all(now)
            self._last_trim = mono
            return
        max_events = self._retention.max_events
        limit = max_events + max(1, max_events // 10)
        counts = self._counts
        for topic in added:
            if counts.get(topic, 0) > limit:
                self._trim_topic(topic)

    def _trim_sync(self) -> int:
        conn = self._writer_conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            removed = self._trim_all(self._clock())
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._last_trim = time.monotonic()
        self._event_count = sum(self._counts.values())
        return removed

    def _trim_all(self, now: float) -> int:
        removed = 0
        if self._retention.max_age:
            removed += self._trim_age(now - self._retention.max_age)
        max_events = self._retention.max_events
        for topic in [t for t, n in self._counts.items() if n > max_events]:
            removed += self._trim_topic(topic)
        return removed

    def _trim_topic(self, topic: Topic) -> int:
        """Keep the newest ``max_events`` events of ``topic``."""
        conn = self._writer_conn()
        row = conn.execute(
            "SELECT id FROM events WHERE topic = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
            (topic, self._retention.max_events),
        ).fetchone()
        if row is None:
            return 0
        (cut,) = row
        removed: int = conn.execute(
            "DELETE FROM events WHERE topic = ? AND id <= ?", (topic, cut)
        ).rowcount
        conn.execute(_RAISE_FLOOR, (topic, cut))
        self._counts[topic] = self._counts.get(topic, 0) - removed
        return removed

    def _trim_age(self, cutoff: float) -> int:
        """Remove the events older than ``cutoff``: the ids below the first newer one."""
        conn = self._writer_conn()
        # Rowid order from the oldest event; stops at the first one young enough.
        row = conn.execute(
            "SELECT id FROM events WHERE time >= ? ORDER BY id LIMIT 1", (cutoff,)
        ).fetchone()
        if row is None:
            (cut,) = conn.execute("SELECT max(id) FROM events").fetchone()
            if cut is None:
                return 0
        else:
            cut = row[0] - 1
        groups = conn.execute(
            "SELECT topic, count(*), max(id) FROM events NOT INDEXED WHERE id <= ? GROUP BY topic",
            (cut,),
        ).fetchall()
        if not groups:
            return 0
        conn.executemany(_RAISE_FLOOR, [(topic, floor) for topic, _, floor in groups])
        conn.execute("DELETE FROM events WHERE id <= ?", (cut,))
        counts = self._counts
        removed = 0
        for topic, n, _ in groups:
            removed += n
            left = counts.get(topic, 0) - n
            if left > 0:
                counts[topic] = left
            else:
                counts.pop(topic, None)
        return removed

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original error is the one worth reporting
        self._counts_stale = True

    def _writer_conn(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            raise BackendError("the SQLite event log is not open")
        if self._counts_stale:
            # After a rollback the in-memory counts may be off: reload them.
            self._counts = dict(conn.execute("SELECT topic, count(*) FROM events GROUP BY topic"))
            self._counts_stale = False
        return conn

    def _close_writer_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _shutdown_sync(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._reader_lock:
            conns, self._reader_conns = self._reader_conns, []
        for conn in conns:
            conn.close()

    # -- reader threads -----------------------------------------------------------------

    def _reader_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            try:
                conn.execute("PRAGMA query_only = ON")
            except BaseException:
                conn.close()
                raise
            with self._reader_lock:
                self._reader_conns.append(conn)
            self._local.conn = conn
        return conn

    def _read_sync(self, topics: list[Topic], after: int, head: int, limit: int) -> list[Event]:
        conn = self._reader_conn()
        cursors: list[sqlite3.Cursor] = []
        conn.execute("BEGIN")  # one snapshot for the floor check and the read
        try:
            for start in range(0, len(topics), _MAX_PARAMS):
                chunk = topics[start : start + _MAX_PARAMS]
                marks = ", ".join("?" * len(chunk))
                row = conn.execute(
                    f"SELECT topic, floor FROM topics WHERE floor > ? AND topic IN ({marks})"
                    " LIMIT 1",
                    (after, *chunk),
                ).fetchone()
                if row is not None:
                    raise _trimmed(row[0], after, row[1])
            if len(topics) == 1:
                rows = conn.execute(_SELECT_TOPIC, (topics[0], after, head, limit)).fetchall()
            else:
                # One lazy cursor per topic (each walks the (topic, id) index), merged by
                # id: only about ``limit`` rows are fetched whatever the topic count.
                for topic in topics:
                    cursors.append(conn.execute(_SELECT_TOPIC, (topic, after, head, limit)))
                rows = list(islice(heapq.merge(*cursors), limit))
        finally:
            for cursor in cursors:
                cursor.close()
            if conn.in_transaction:
                conn.execute("COMMIT")
        return [Event(r[0], r[1], r[3], r[2], r[4], r[5]) for r in rows]

    def _ping_sync(self) -> None:
        self._reader_conn().execute("SELECT 1").fetchone()
