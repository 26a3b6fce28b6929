"""In-process EventLog: per-topic lists in memory, one id sequence, gone on restart.

Each process mints its own id range: the origin is the wall clock in microseconds at
construction, so a restarted hub never re-issues an id an earlier process handed out,
and resume points from an earlier process are older than the origin ("unknown").
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import islice
from operator import attrgetter
from typing import Final, final

from .._exceptions import BackendError, BackendUnavailableError, HistoryGoneError
from .._models import Event, NewEvent, Topic
from . import Retention

__all__ = ["MemoryEventLog"]

_event_id: Final = attrgetter("id")

_COMPACT_AFTER: Final = 64
"""Removed entries kept at the front of a topic's list before it is compacted."""


class _TopicLog:
    """One topic's retained events: ``events[first:]``, in id order."""

    __slots__ = ("events", "first", "floor")

    def __init__(self, floor: int) -> None:
        self.events: list[Event] = []
        self.first = 0
        """Index of the oldest retained event (entries before it are removed)."""
        self.floor = floor
        """The highest id removed by retention (the log's origin while none was)."""

    def remove_before(self, index: int) -> int:
        """Remove the retained events before ``index``; return how many went."""
        removed = index - self.first
        if removed <= 0:
            return 0
        events = self.events
        self.floor = events[index - 1].id
        if index == len(events):
            events.clear()
            self.first = 0
        elif index > _COMPACT_AFTER and index > len(events) - index:
            # Amortised O(1): compacting moves at most as many entries as were removed.
            del events[:index]
            self.first = 0
        else:
            self.first = index
        return removed

    def remove_older_than(self, cutoff: float) -> int:
        """Remove retained events whose time is before ``cutoff`` (a prefix)."""
        events = self.events
        index = self.first
        end = len(events)
        while index < end and events[index].time < cutoff:
            index += 1
        return self.remove_before(index)


@final
class MemoryEventLog:
    """An :class:`~ssehub.backends.EventLog` held in this process's memory.

    Retention by count is applied on every append (the oldest events of a topic go as
    new ones arrive); retention by age is applied by :meth:`trim` and, cheaply, when a
    topic receives an event. ``clock`` (Unix seconds) stamps events; tests may replace it.
    """

    def __init__(
        self,
        retention: Retention | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._retention = retention or Retention()
        self._clock = clock
        self._origin = time.time_ns() // 1000
        self._head = self._origin
        self._topics: dict[Topic, _TopicLog] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"MemoryEventLog(retention={self._retention!r})"

    async def start(self) -> None:
        """Nothing to open; present for the protocol."""
        self._check_open()

    async def append(self, events: Sequence[NewEvent]) -> list[Event]:
        """Append ``events`` in order with consecutive ids (synchronous, atomic)."""
        self._check_open()
        now = self._clock()
        first = self._head + 1
        # Build every Event before touching any state, so a bad item changes nothing.
        stored = [
            Event(first + i, new.topic, new.data, new.event, new.retry, now)
            for i, new in enumerate(events)
        ]
        if not stored:
            return stored
        max_events = self._retention.max_events
        max_age = self._retention.max_age
        cutoff = now - max_age if max_age else float("-inf")
        topics = self._topics
        origin = self._origin
        for event in stored:
            log = topics.get(event.topic)
            if log is None:
                log = topics[event.topic] = _TopicLog(origin)
            kept = log.events
            kept.append(event)
            if len(kept) - log.first > max_events:
                log.remove_before(len(kept) - max_events)
            if kept[log.first].time < cutoff:
                log.remove_older_than(cutoff)
        self._head = stored[-1].id
        return stored

    async def read_after(self, topics: Sequence[Topic], after: int, *, limit: int) -> list[Event]:
        """Events of ``topics`` with ``id > after``, in id order, at most ``limit``.

        Raises :class:`~ssehub.HistoryGoneError` as the protocol describes.
        """
        self._check_open()
        _check_limit(limit)
        _check_bounds(after, self._origin, self._head)
        slices: list[list[Event]] = []
        for topic in dict.fromkeys(topics):
            log = self._topics.get(topic)
            if log is None:
                continue
            if log.floor > after:
                raise _trimmed(topic, after, log.floor)
            kept = log.events
            start = bisect_right(kept, after, lo=log.first, key=_event_id)
            if start < len(kept):
                slices.append(kept[start : start + limit])
        if not slices:
            return []
        if len(slices) == 1:
            return slices[0]
        return list(islice(heapq.merge(*slices, key=_event_id), limit))

    def event_count(self) -> int:
        """Events retained over all topics (SupportsSize)."""
        return sum(len(log.events) - log.first for log in self._topics.values())

    def head(self) -> int:
        """The last id issued (the origin before the first append)."""
        return self._head

    def origin(self) -> int:
        """The id just before the first one this log issues (µs since the epoch)."""
        return self._origin

    async def trim(self) -> int:
        """Apply retention by count and by age now; return the number of events removed."""
        self._check_open()
        max_events = self._retention.max_events
        max_age = self._retention.max_age
        cutoff = self._clock() - max_age if max_age else None
        removed = 0
        for log in self._topics.values():
            excess = len(log.events) - log.first - max_events
            if excess > 0:
                removed += log.remove_before(log.first + excess)
            if cutoff is not None:
                removed += log.remove_older_than(cutoff)
        return removed

    async def check_ready(self) -> None:
        """Return while open; raise :class:`~ssehub.BackendUnavailableError` once closed."""
        if self._closed:
            raise BackendUnavailableError("the memory event log is closed")

    async def aclose(self) -> None:
        """Drop every event. Idempotent; the log refuses further use."""
        self._closed = True
        self._topics.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("the memory event log is closed")


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")


def _check_bounds(after: int, origin: int, head: int) -> None:
    """Raise :class:`HistoryGoneError` unless ``origin <= after <= head``.

    Shared by the EventLog implementations in this package.
    """
    if after < origin:
        raise HistoryGoneError(
            "unknown",
            f"event id {after} was not issued by this event log "
            f"(its ids start after {origin}; the current id is {head})",
        )
    if after > head:
        raise HistoryGoneError(
            "future",
            f"event id {after} is ahead of the current id {head}",
        )


def _trimmed(topic: Topic, after: int, floor: int) -> HistoryGoneError:
    return HistoryGoneError(
        "trimmed",
        f"events of topic {topic!r} after id {after} are no longer retained "
        f"(retention removed ids up to {floor})",
    )
